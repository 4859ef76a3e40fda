"""A 1 GiB file through the agent both ways (chunked, size- and sha256-checked): nightly, since a
gigabyte of base64 over a virtio-serial port under TCG takes minutes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.nightly]
GIB = 1 << 30


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_a_gigabyte_round_trips(microvm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(GIB >> 20):
            f.write(block[i % 7:] + block[:i % 7])  # no two MiB alike at the same offset
    microvm.copy_to(src, "/home/dev/big.bin", timeout=1800)
    assert microvm.succeed("sha256sum /home/dev/big.bin | cut -d' ' -f1", timeout=300).strip() == _digest(src)
    back = tmp_path / "back.bin"
    microvm.copy_from("/home/dev/big.bin", back, timeout=1800)
    assert back.stat().st_size == GIB and _digest(back) == _digest(src)
