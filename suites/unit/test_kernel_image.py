"""The PVH fast path: the ELF inside a bzImage payload, kept only when it carries the PVH note."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from agentbox_runtime.vmm import qemu
from agentbox_runtime.vmm.kernel_image import XEN_ELFNOTE_PHYS32_ENTRY, extract_elf, has_pvh_note, pvh_kernel

NOTE = struct.pack("<III", 4, 4, XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + struct.pack("<I", 0x1000000)
ELF_PVH = b"\x7fELF" + b"\0" * 60 + NOTE + b"kernel text" * 100
ELF_PLAIN = b"\x7fELF" + b"\0" * 60 + b"kernel text" * 100


def bzimage(payload: bytes, compress: str = "xz") -> bytes:
    packed = lzma.compress(payload, format=lzma.FORMAT_XZ) if compress == "xz" else gzip.compress(payload)
    return b"MZ setup code \x1f\x8b not-a-stream " + b"\0" * 512 + packed + b"\0" * 64


@pytest.mark.parametrize("compress", ["xz", "gzip"])
def test_the_elf_is_extracted_from_the_payload(compress: str) -> None:
    assert extract_elf(bzimage(ELF_PVH, compress)) == ELF_PVH


def test_pvh_note_detection() -> None:
    assert has_pvh_note(ELF_PVH) and not has_pvh_note(ELF_PLAIN)


def test_pvh_kernel_is_cached_per_kernel_digest(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(ELF_PVH))
    elf = pvh_kernel(kernel, tmp_path / "cache")
    assert elf is not None and elf.read_bytes() == ELF_PVH
    first = elf.stat().st_mtime_ns
    assert pvh_kernel(kernel, tmp_path / "cache") == elf and elf.stat().st_mtime_ns == first


def test_a_kernel_without_pvh_keeps_booting_as_bzimage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(ELF_PLAIN))
    assert pvh_kernel(kernel, tmp_path / "cache") is None
    junk = tmp_path / "junk"
    junk.write_bytes(b"MZ nothing compressed here")
    assert pvh_kernel(junk, tmp_path / "cache") is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert qemu.fast_boot(kernel) == (kernel, [])


def test_fast_boot_uses_the_elf_and_qboot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(ELF_PVH))
    boot, firmware = qemu.fast_boot(kernel)
    assert boot.read_bytes() == ELF_PVH
    assert firmware == (["-bios", str(qemu.QBOOT)] if qemu.QBOOT.exists() else [])
    monkeypatch.setenv("AGENTBOX_QEMU_FAST_BOOT", "0")
    assert qemu.fast_boot(kernel) == (kernel, [])
