"""Memory and CPU sizing for guests (reference section 4)."""

from __future__ import annotations

import os
from pathlib import Path

from agentbox_runtime.errors import AgentboxError, InputError

MAX_MEM_GIB = 4194303  # u32::MAX / 1024
MICROVM_DEFAULT_MIB = 4096


def parse_mem_gib(text: str) -> int:
    """``--mem``: a positive whole number of GiB, at most 4194303."""
    value = text.strip()
    if not (value.isascii() and value.isdigit()):
        raise InputError(f"invalid --mem '{text}': must be a positive integer number of GiB")
    gib = int(value)
    if gib == 0:
        raise InputError(f"invalid --mem '{text}': must be at least 1 GiB")
    if gib > MAX_MEM_GIB:
        raise InputError(f"invalid --mem '{text}': must be at most {MAX_MEM_GIB} GiB")
    return gib


def meminfo_total_bytes(text: str) -> int:
    """``MemTotal`` of a ``/proc/meminfo`` text, in bytes."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()[1:]
            if not fields:
                raise AgentboxError("host memory detection failed: MemTotal value missing")
            if len(fields) < 2:
                raise AgentboxError("host memory detection failed: MemTotal unit missing")
            if fields[1] != "kB":
                raise AgentboxError(
                    f"host memory detection failed: expected MemTotal in kB, got {fields[1]}")
            if not fields[0].isdigit():
                raise AgentboxError(
                    f"host memory detection failed: invalid MemTotal value {fields[0]}")
            total = int(fields[0]) * 1024
            if total >= 1 << 64:
                raise AgentboxError("host memory detection failed: MemTotal overflows bytes")
            return total
    raise AgentboxError("host memory detection failed: MemTotal missing from /proc/meminfo")


def default_libkrun_mem_gib(total_bytes: int) -> int:
    """80% of host memory, floored to whole GiB (at least 1)."""
    eighty = (total_bytes // 5) * 4 + ((total_bytes % 5) * 4) // 5
    gib = eighty >> 30
    if gib == 0:
        raise AgentboxError(
            "host memory is too small to derive a libkrun --mem default of at least 1 GiB")
    return gib


def libkrun_ram_mib(mem_gib: int | None, meminfo: Path = Path("/proc/meminfo")) -> int:
    """RAM for a libkrun task: the explicit ``--mem`` or 80% of the host."""
    if mem_gib is not None:
        return mem_gib * 1024
    try:
        text = meminfo.read_text()
    except OSError as exc:
        raise AgentboxError(f"failed to read host memory from {meminfo}: {exc}") from None
    return default_libkrun_mem_gib(meminfo_total_bytes(text)) * 1024


def microvm_ram_mib(mem_gib: int | None) -> int:
    """RAM for a microvm: the explicit ``--mem`` or 4 GiB."""
    return MICROVM_DEFAULT_MIB if mem_gib is None else mem_gib * 1024


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), like Rust's ``available_parallelism``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count()
        if count is None:
            raise AgentboxError("failed to detect available CPUs for libkrun krun.cpus default") from None
        return count


def default_cpus(available: int | None = None) -> int:
    """Guest vCPUs: all available CPUs up to 6, else all but two (1->1, 6->6, 7->5, 32->30)."""
    n = available if available is not None else available_cpus()
    return n if n <= 6 else n - 2
