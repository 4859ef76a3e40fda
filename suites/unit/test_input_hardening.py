"""Bad input stays bad input: config files that are not small regular files, sizes past off_t,
control characters in values — each one clear line, exit 2, nothing read forever."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.config import MAX_CONFIG_BYTES, load_config
from runtime.errors import InputError
from runtime.sizes import MAX_SIZE, parse_resize_size

REPO = Path(__file__).resolve().parents[2]


def test_a_fifo_config_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "conf.fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is not a regular file"):
        load_config({"AGENTBOX_CONFIG": str(fifo)})


def test_a_device_config_is_refused_without_reading_it() -> None:
    with pytest.raises(InputError, match="'/dev/zero' is not a regular file"):
        load_config({"AGENTBOX_CONFIG": "/dev/zero"})


def test_an_oversized_config_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "agentbox.toml"
    big.write_text("#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(InputError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        load_config({"AGENTBOX_CONFIG": str(big)})


def test_a_newline_in_a_config_value_gives_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "agentbox.toml"
    conf.write_text('[state]\nlocation = "/no/such\\nplace"\n')
    work = tmp_path / "project"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", "libkrun", "resize", "--target", "nix", "--size", "1G"],
                          cwd=work, env={**os.environ, "AGENTBOX_CONFIG": str(conf), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "/no/such\\nplace" in proc.stderr


@pytest.mark.parametrize("text", ["8388609T", "8388608T", str(1 << 40) + "T", "9223372036854775808G"])
def test_sizes_past_off_t_are_one_clear_error(text: str) -> None:
    with pytest.raises(InputError, match="size is too large .at most 9223372036854775807 bytes"):
        parse_resize_size(text)


def test_the_largest_size_below_off_t_parses() -> None:
    assert parse_resize_size("8388607T") == 8388607 << 40 <= MAX_SIZE
