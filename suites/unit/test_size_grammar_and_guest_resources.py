"""Size grammar (5.4), --mem (4.1), memory and CPU defaults (4.2-4.4)."""

import pytest

from agentbox_runtime.errors import AgentboxError, InputError
from agentbox_runtime.size_grammar import parse_resize_size
from agentbox_runtime.guest_resources import (default_cpus, default_libkrun_mem_gib, meminfo_total_bytes,
                            microvm_ram_mib, parse_mem_gib)

GIB, TIB = 1 << 30, 1 << 40


@pytest.mark.parametrize("text,expected", [
    ("128", 128 * GIB), ("128G", 128 * GIB), ("128GiB", 128 * GIB), ("128g", 128 * GIB),
    ("128gib", 128 * GIB), ("2T", 2 * TIB), ("2TiB", 2 * TIB), ("2t", 2 * TIB), (" 64 ", 64 * GIB),
])
def test_resize_size_accepts_binary_gib_and_tib(text: str, expected: int) -> None:
    assert parse_resize_size(text) == expected


@pytest.mark.parametrize("text,message", [
    ("0", "size must be greater than zero"),
    ("-1", "must be a positive integer size like 128, 128G, 128GiB, or 2TiB"),
    ("1.5G", "must be a positive integer size like"),
    ("10M", "must be a positive integer size like"),
    ("99999999999T", "size is too large"),
    ("", "must be a positive integer size like"),
    ("abc", "must be a positive integer size like"),
    ("G", "must be a positive integer size like"),
    ("8Gib", "must be a positive integer size like"),
])
def test_resize_size_rejects_with_accepted_forms(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        parse_resize_size(text)
    assert info.value.exit_code == 2
    assert repr(text)[1:-1] in str(info.value)


@pytest.mark.parametrize("text,message", [
    ("0", "must be at least 1 GiB"), ("8g", "must be a positive integer number of GiB"),
    ("1.5", "must be a positive integer number of GiB"), ("4194304", "must be at most 4194303 GiB"),
])
def test_mem_rejects(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_mem_gib(text)


def test_mem_accepts_integer_gib() -> None:
    assert parse_mem_gib("8") == 8
    assert microvm_ram_mib(None) == 4096 and microvm_ram_mib(2) == 2048


def test_default_memory_is_eighty_percent_floored() -> None:
    assert default_libkrun_mem_gib(10 * GIB) == 8
    assert default_libkrun_mem_gib(2 * GIB) == 1
    with pytest.raises(AgentboxError, match="too small"):
        default_libkrun_mem_gib(1 * GIB)


def test_meminfo_parsing() -> None:
    assert meminfo_total_bytes("MemFree: 1 kB\nMemTotal:   10485760 kB\n") == 10 * GIB
    with pytest.raises(AgentboxError, match="MemTotal missing"):
        meminfo_total_bytes("MemFree: 1 kB\n")
    with pytest.raises(AgentboxError, match="expected MemTotal in kB, got MB"):
        meminfo_total_bytes("MemTotal: 10 MB\n")
    with pytest.raises(AgentboxError, match="unit missing"):
        meminfo_total_bytes("MemTotal: 10\n")


@pytest.mark.parametrize("available,expected", [(1, 1), (6, 6), (7, 5), (8, 6), (16, 14), (32, 30)])
def test_cpu_rule(available: int, expected: int) -> None:
    assert default_cpus(available) == expected
