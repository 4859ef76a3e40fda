"""The guest kernel as an uncompressed ELF that qemu enters through PVH (cached per kernel digest).

A distribution bzImage decompresses itself at boot, which under TCG costs most
of the kernel phase (about 10 s against 4 s measured here). When the kernel
was built with ``CONFIG_PVH`` its ELF ``vmlinux`` carries the Xen
``PHYS32_ENTRY`` note and qemu's ``-kernel`` boots it directly, skipping the
decompressor and the real-mode setup. :func:`pvh_kernel` extracts that ELF
from the bzImage payload once per kernel digest; a kernel without the note (or
a payload this module cannot decompress) keeps booting as the bzImage.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
XEN_ELFNOTE_PHYS32_ENTRY = 18
MAGICS = ((b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b\x08", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))
NEGATIVE = b"no-pvh\n"


def has_pvh_note(elf: bytes) -> bool:
    """Whether an ELF image carries the ``Xen`` PHYS32_ENTRY note (PVH entry point)."""
    return any(struct.pack("<III", 4, descsz, XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" in elf for descsz in (4, 8))


def _decompress(data: bytes, offset: int, kind: str) -> bytes | None:
    try:
        if kind == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[offset:])
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[offset:])
        if shutil.which("zstd") is None:
            return None
        proc = subprocess.run(["zstd", "-dc"], input=data[offset:], capture_output=True, timeout=120)
        return proc.stdout or None
    except (lzma.LZMAError, zlib.error, EOFError, subprocess.SubprocessError, OSError):
        return None


def extract_elf(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage payload, or None."""
    for magic, kind in MAGICS:
        start = bzimage.find(magic)
        while start >= 0:
            out = _decompress(bzimage, start, kind)
            if out and out.startswith(ELF_MAGIC):
                return out
            start = bzimage.find(magic, start + 1)
    return None


def pvh_kernel(kernel: Path, cache: Path) -> Path | None:
    """The cached PVH-bootable ELF of ``kernel``, extracting it on first use; None when the kernel has
    no PVH entry (or cannot be decompressed here): boot the bzImage then."""
    data = kernel.read_bytes()
    if data.startswith(ELF_MAGIC):
        return kernel if has_pvh_note(data) else None
    key = hashlib.sha256(data).hexdigest()[:24]
    cache.mkdir(parents=True, exist_ok=True)
    out, negative = cache / f"vmlinux-{key}.elf", cache / f"vmlinux-{key}.none"
    if out.exists():
        return out
    if negative.exists():
        return None
    elf = extract_elf(data)
    if elf is None or not has_pvh_note(elf):
        negative.write_bytes(NEGATIVE)
        return None
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(elf)
    os.replace(tmp, out)
    return out
