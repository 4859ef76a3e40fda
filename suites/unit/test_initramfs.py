"""The Python-generated initramfs: module closure and order, decompression, archive contents."""

from __future__ import annotations

import gzip
import lzma
import shutil
import stat
import subprocess
from pathlib import Path

import libarchive
import pytest

from agentbox_guest_init import contract
from agentbox_runtime.vmm import initramfs

VERSION = "6.1.0-99-amd64"
# A synthetic modules.dep shaped like Debian's: btrfs needs libcrc32c (which needs a crc32c
# implementation loaded first although modules.dep does not say so), 9pnet_virtio needs 9pnet.
MODULES_DEP = """\
kernel/fs/btrfs/btrfs.ko.xz: kernel/crypto/xor.ko kernel/lib/raid6/raid6_pq.ko kernel/lib/libcrc32c.ko
kernel/crypto/xor.ko:
kernel/lib/raid6/raid6_pq.ko:
kernel/lib/libcrc32c.ko:
kernel/crypto/crc32c_generic.ko:
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko
kernel/fs/9p/9p.ko.gz: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/drivers/block/virtio_blk.ko:
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/unused/unused.ko:
"""
BUILTIN = "kernel/drivers/virtio/virtio_pci.ko\nkernel/fs/fuse/fuse.ko\n"


def payload(path: str) -> bytes:
    return f"ELF {path}".encode()


@pytest.fixture()
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    moddir = root / "lib/modules" / VERSION
    for line in MODULES_DEP.splitlines():
        rel = line.split(":")[0]
        target = moddir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        plain = payload(rel)
        target.write_bytes(lzma.compress(plain) if rel.endswith(".xz")
                           else gzip.compress(plain) if rel.endswith(".gz") else plain)
    (moddir / "modules.dep").write_text(MODULES_DEP)
    (moddir / "modules.builtin").write_text(BUILTIN)
    (root / "bin").mkdir()
    (root / "bin/busybox").write_bytes(b"BUSYBOX")
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{VERSION}").write_bytes(b"KERNEL")
    return root


def entries(archive: Path) -> dict[str, tuple[int, bytes]]:
    """{path: (mode, contents)} of a cpio archive, read back through libarchive."""
    found: dict[str, tuple[int, bytes]] = {}
    with libarchive.file_reader(str(archive)) as reader:
        for entry in reader:
            found[entry.pathname.removeprefix("./")] = (entry.mode, b"".join(entry.get_blocks()))
    return found


def test_closure_loads_dependencies_first_and_crc32c_before_libcrc32c() -> None:
    deps = initramfs.parse_modules_dep(MODULES_DEP)
    builtin = {initramfs.module_name(p) for p in BUILTIN.split()}
    order = initramfs.closure(initramfs.WANTED, deps, builtin)
    names = [initramfs.module_name(p) for p in order]
    # WANTED order, each module after its dependencies, crc32c_generic hoisted to the front
    assert names == ["virtio_blk", "9pnet", "netfs", "9p", "9pnet_virtio"]
    assert "unused" not in names and "virtio_pci" not in names and "btrfs" not in names
    full = initramfs.closure([*initramfs.WANTED, "btrfs", "overlay", "crc32c_generic"], deps, builtin)
    assert [initramfs.module_name(p) for p in full] == [
        "crc32c_generic", "virtio_blk", "9pnet", "netfs", "9p", "9pnet_virtio", "xor", "raid6_pq", "libcrc32c",
        "btrfs", "overlay"]  # each after its dependencies, crc32c_generic hoisted to the front


def test_closure_ignores_dependency_cycles() -> None:
    deps = {"a.ko": ["b.ko"], "b.ko": ["a.ko"]}
    assert initramfs.closure(["a"], deps, set()) == ["b.ko", "a.ko"]


def test_module_names_normalise_dashes_and_compression() -> None:
    assert initramfs.module_name("kernel/x/virtio-net.ko.zst") == "virtio_net"
    assert initramfs.module_name("kernel/fs/btrfs/btrfs.ko.xz") == "btrfs"


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd tool (apt-get install zstd)")
def test_zstd_modules_are_decompressed(tmp_path: Path) -> None:
    plain = tmp_path / "m.ko"
    plain.write_bytes(b"\x7fELF module body")
    subprocess.run(["zstd", "-q", str(plain), "-o", str(tmp_path / "m.ko.zst")], check=True, timeout=60)
    assert initramfs.read_module(tmp_path / "m.ko.zst") == b"\x7fELF module body"


def test_base_archive_contents(rootfs: Path, tmp_path: Path) -> None:
    out = tmp_path / "base.cpio"
    loaded = initramfs.write_base(rootfs, VERSION, out, wanted=(*initramfs.WANTED, "crc32c_generic", "btrfs",
                                                                 "overlay"))
    files = entries(out)
    assert loaded[0] == "crc32c_generic" and loaded[-1] == "overlay"
    mode, init = files["init"]
    assert stat.S_ISREG(mode) and mode & 0o111 == 0o111
    assert init.decode() == initramfs.INIT
    assert f"{contract.ROOTFS_TAG} /newroot" in initramfs.INIT
    assert f"switch_root /newroot {contract.GUEST_INIT_PATH} vm-init" in initramfs.INIT
    assert files["bin/busybox"][1] == b"BUSYBOX"
    order = files["modules.order"][1].decode().split()
    assert order == [f"{name}.ko" for name in loaded]
    # compressed modules are stored decompressed (busybox insmod cannot inflate them)
    assert files["lib/modules/btrfs.ko"][1] == payload("kernel/fs/btrfs/btrfs.ko.xz")
    assert files["lib/modules/9p.ko"][1] == payload("kernel/fs/9p/9p.ko.gz")
    assert "lib/modules/unused.ko" not in files


def test_launch_archive_is_appended_after_the_base(rootfs: Path, tmp_path: Path) -> None:
    base = initramfs.cached_base(rootfs, VERSION, tmp_path / "cache")
    out = initramfs.task_initrd(base, "task_rootfs=2f\n", tmp_path / "initrd.img")
    data = out.read_bytes()
    assert data.startswith(base.read_bytes())
    tail = tmp_path / "tail.cpio"
    tail.write_bytes(data[len(base.read_bytes()):])
    assert entries(tail)[initramfs.LAUNCH_PATH][1] == b"task_rootfs=2f\n"


def test_base_archive_is_cached_per_key(rootfs: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = initramfs.cached_base(rootfs, VERSION, cache)
    first_mtime = first.stat().st_mtime_ns
    assert initramfs.cached_base(rootfs, VERSION, cache) == first
    assert first.stat().st_mtime_ns == first_mtime
    moddep = rootfs / "lib/modules" / VERSION / "modules.dep"
    moddep.write_text(MODULES_DEP.replace("kernel/drivers/unused/unused.ko:\n", ""))
    assert initramfs.cached_base(rootfs, VERSION, cache) != first


def test_kernel_and_version_lookup(rootfs: Path) -> None:
    assert initramfs.find_kernel(rootfs) == rootfs / "boot" / f"vmlinuz-{VERSION}"
    assert initramfs.kernel_version(rootfs, initramfs.find_kernel(rootfs)) == VERSION


def test_missing_pieces_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(initramfs.InitramfsError, match="install linux-image-amd64"):
        initramfs.find_kernel(tmp_path)
    with pytest.raises(initramfs.InitramfsError, match="no kernel modules under"):
        initramfs.kernel_version(tmp_path)


def test_missing_busybox_names_the_package(rootfs: Path, tmp_path: Path) -> None:
    (rootfs / "bin/busybox").unlink()
    with pytest.raises(initramfs.InitramfsError, match="install busybox-static"):
        initramfs.write_base(rootfs, VERSION, tmp_path / "x.cpio")


@pytest.mark.parametrize("entry", ["/etc/shadow", "../../../../../etc/shadow", "kernel/../../../../etc/shadow"])
def test_a_modules_dep_entry_outside_the_image_is_refused(rootfs: Path, tmp_path: Path, entry: str) -> None:
    moddir = rootfs / "lib/modules" / VERSION
    (moddir / "modules.dep").write_text(f"kernel/drivers/block/virtio_blk.ko: {entry}\n")
    out = tmp_path / "x.cpio"
    with pytest.raises(initramfs.InitramfsError, match="image paths must be relative and stay inside the image"):
        initramfs.write_base(rootfs, VERSION, out)
    assert not out.exists()


def test_a_symlinked_busybox_never_copies_a_host_file(rootfs: Path, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"HOST SECRET")
    (rootfs / "bin/busybox").unlink()
    (rootfs / "bin/busybox").symlink_to(secret)  # absolute: resolved inside the image, where it is missing
    with pytest.raises(initramfs.InitramfsError, match="no static busybox"):
        initramfs.write_base(rootfs, VERSION, tmp_path / "a.cpio")
    (rootfs / "bin/busybox").unlink()
    (rootfs / "bin/busybox").symlink_to("../" * 12 + str(secret).lstrip("/"))
    with pytest.raises(initramfs.InitramfsError, match="leaves the image root"):
        initramfs.write_base(rootfs, VERSION, tmp_path / "b.cpio")


def test_symlinks_inside_the_image_resolve_against_the_image_root(rootfs: Path, tmp_path: Path) -> None:
    (rootfs / "usr/bin").mkdir(parents=True)
    (rootfs / "bin/busybox").rename(rootfs / "usr/bin/busybox")
    (rootfs / "bin/busybox").symlink_to("/usr/bin/busybox")  # absolute, as images often have
    out = tmp_path / "ok.cpio"
    initramfs.write_base(rootfs, VERSION, out)
    assert entries(out)["bin/busybox"][1] == b"BUSYBOX"


def test_a_module_symlink_pointing_out_of_the_image_is_refused(rootfs: Path, tmp_path: Path) -> None:
    module = rootfs / "lib/modules" / VERSION / "kernel/drivers/block/virtio_blk.ko"
    module.unlink()
    module.symlink_to("../" * 20 + "etc/hostname")
    with pytest.raises(initramfs.InitramfsError, match="leaves the image root"):
        initramfs.write_base(rootfs, VERSION, tmp_path / "m.cpio")
