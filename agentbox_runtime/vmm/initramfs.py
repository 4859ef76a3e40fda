"""The qemu backend's initramfs, generated in Python (newc cpio through libarchive).

It holds the rootfs's static busybox, the kernel modules the boot needs (the
closure from ``modules.dep``, dependencies first; compressed modules are
decompressed here because busybox ``insmod`` cannot), and an ``/init`` script
that loads them, mounts the task rootfs from the 9p tag ``agentbox-root``,
copies the task's launch.conf to ``/run/agentbox/launch.conf`` and
switch_roots into ``agentbox-guest-init vm-init``.

The base archive is cached per (kernel version, module set, generator
version); a task appends a tiny second archive holding its launch.conf (the
kernel unpacks concatenated archives in order).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import libarchive

from agentbox_guest_init import contract
from agentbox_runtime.rootfs_paths import EscapesRoot, relative_entry, resolve_in_root

GENERATOR_VERSION = "6"
WANTED = ("virtio_pci", "virtio_blk", "virtio_console", "virtio_net", "9p", "9pnet_virtio")
"""What the initramfs loads: only what mounting the root and the first steps of PID 1 need. The rest
(:data:`agentbox_guest_init.contract.LATE_MODULES`: btrfs, overlay, fuse, tun, ...) PID 1 loads from the root
in the background, in parallel with its own start (btrfs's raid6/xor benchmarks alone cost ~1 s)."""
SNAPSHOT_WANTED = (*WANTED, "virtio_scsi", "sd_mod", "crc32c_generic", "ext4", "overlay")
"""A snapshot template's initramfs also mounts its root from the read-only ext4 image on virtio-scsi
(``/dev/sda``, so the persistent disks hot-added after a restore keep ``vda``/``vdb``) under an
overlay whose upper layer is a tmpfs in guest memory (:mod:`agentbox_runtime.vmm.snapshot`)."""
# modules that must be loaded before others although modules.dep does not say so
SOFT_FIRST = ("crc32c_generic",)
LAUNCH_PATH = "agentbox/launch.conf"
PID1_PATH = "agentbox/pid1"
"""An alternative PID 1 (a busybox sh script) a task archive may carry instead of launch.conf."""
PROBE_MARKER = "AGENTBOX-INITRAMFS-PROBE-OK"

INIT = f"""#!/bin/busybox sh
bb=/bin/busybox
$bb mkdir -p /proc /sys /dev /newroot /tmp
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
stamp() {{ echo "{contract.PHASE_MARK} $1 $($bb cut -d' ' -f1 /proc/uptime)" >/dev/ttyS0; }}
stamp kernel
for m in $($bb cat /modules.order); do
  $bb insmod /lib/modules/$m 2>/dev/null || echo "agentbox-initramfs: insmod $m failed" >/dev/ttyS0
done
stamp modules
if $bb grep -q agentbox.probe=1 /proc/cmdline; then
  echo {PROBE_MARKER} >/dev/ttyS0
  $bb poweroff -f
fi
if $bb grep -q agentbox.root=blk /proc/cmdline; then
  $bb mkdir -p /lower /rw
  n=0
  while [ ! -b /dev/sda ] && [ $n -lt 400 ]; do $bb usleep 25000; n=$((n+1)); done
  if ! $bb mount -t ext4 -o ro /dev/sda /lower; then
    echo "agentbox-initramfs: cannot mount the snapshot root image (/dev/sda)" >/dev/ttyS0
    $bb dmesg | $bb tail -5 >/dev/ttyS0
    $bb poweroff -f
  fi
  $bb mount -t tmpfs -o mode=0755 tmpfs /rw
  $bb mkdir -p /rw/upper /rw/work
  if ! $bb mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot; then
    echo "agentbox-initramfs: cannot mount the snapshot root overlay" >/dev/ttyS0
    $bb poweroff -f
  fi
elif ! $bb mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,access=client \\
    {contract.ROOTFS_TAG} /newroot; then
  echo "agentbox-initramfs: cannot mount the task rootfs (9p tag {contract.ROOTFS_TAG})" >/dev/ttyS0
  $bb poweroff -f
fi
stamp root
$bb mount -t tmpfs -o mode=0755 tmpfs /newroot/run
$bb mkdir -p /newroot/run/agentbox /newroot/dev
$bb mount --move /dev /newroot/dev
$bb umount /sys /proc
if [ -f /{PID1_PATH} ]; then
  $bb cp /bin/busybox /newroot/run/agentbox/busybox
  $bb cp /{PID1_PATH} /newroot/run/agentbox/pid1
  exec $bb switch_root /newroot /run/agentbox/busybox sh /run/agentbox/pid1
fi
$bb cp /{LAUNCH_PATH} /newroot/run/agentbox/launch.conf
exec $bb switch_root /newroot {contract.GUEST_INIT_PATH} vm-init /run/agentbox/launch.conf
"""


class InitramfsError(RuntimeError):
    """The rootfs lacks what the initramfs needs (kernel modules, busybox)."""


def image_path(rootfs: Path, path: str) -> Path:
    """Guest path ``path`` of the untrusted image as a host path that stays inside ``rootfs``."""
    try:
        return resolve_in_root(rootfs, path)
    except EscapesRoot as exc:
        raise InitramfsError(str(exc)) from None


def kernel_version(rootfs: Path, kernel: Path | None = None) -> str:
    """The module directory name that goes with the kernel (newest if not given)."""
    moddirs = image_path(rootfs, "lib/modules")
    versions = sorted(p.name for p in moddirs.iterdir()
                      if image_path(rootfs, f"lib/modules/{p.name}/modules.dep").is_file()) \
        if moddirs.is_dir() else []
    if kernel is not None:
        name = kernel.name.removeprefix("vmlinuz-")
        if name in versions:
            return name
    if not versions:
        raise InitramfsError(f"no kernel modules under {rootfs}/lib/modules (is linux-image installed in the image?)")
    return versions[-1]


def find_kernel(rootfs: Path) -> Path:
    """The newest ``/boot/vmlinuz-*`` in the rootfs."""
    kernels = sorted(k for k in image_path(rootfs, "boot").glob("vmlinuz-*")
                     if image_path(rootfs, f"boot/{k.name}").is_file())
    if not kernels:
        raise InitramfsError(f"no kernel at {rootfs}/boot/vmlinuz-* (install linux-image-amd64 in the image "
                             "or pass --kernel)")
    return image_path(rootfs, f"boot/{kernels[-1].name}")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``modules.dep`` as {module path: [dependency paths]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" in line:
            mod, _, rest = line.partition(":")
            deps[mod.strip()] = rest.split()
    return deps


def module_name(path: str) -> str:
    base = os.path.basename(path)
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base.replace("-", "_")


def closure(wanted: Iterable[str], deps: dict[str, list[str]], builtin: set[str]) -> list[str]:
    """Module paths to load, each after its dependencies; builtins and unknowns skipped."""
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in order or path in stack:
            return
        for dep in deps.get(path, []):
            visit(dep, stack + (path,))
        order.append(path)

    for name in SOFT_FIRST:
        if name in [w.replace("-", "_") for w in wanted] and name in by_name:
            visit(by_name[name], ())
    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin or key not in by_name:
            continue
        visit(by_name[key], ())
    return order


def read_module(path: Path) -> bytes:
    """A module's ELF bytes (decompressing .xz/.gz/.zst)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return _unzstd(path, data)
    return data


def _unzstd(path: Path, data: bytes) -> bytes:
    """Decompress a .ko.zst (the standard library has no zstd: the ``zstd`` tool does it)."""
    if shutil.which("zstd") is None:
        raise InitramfsError(f"module {path} is zstd-compressed and the zstd tool is missing "
                             "(apt-get install zstd)")
    proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise InitramfsError(f"cannot decompress {path}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _plain_name(path: str) -> str:
    """``kernel/fs/btrfs/btrfs.ko.xz`` -> ``btrfs.ko`` (stored decompressed)."""
    return os.path.basename(path).split(".ko")[0] + ".ko"


def base_key(rootfs: Path, version: str, wanted: tuple[str, ...] = WANTED) -> str:
    h = hashlib.sha256(f"{GENERATOR_VERSION}\0{version}\0{' '.join(wanted)}".encode())
    h.update(image_path(rootfs, f"lib/modules/{version}/modules.dep").read_bytes())
    h.update(INIT.encode())
    return h.hexdigest()[:20]


def write_base(rootfs: Path, version: str, out: Path, wanted: tuple[str, ...] = WANTED) -> list[str]:
    """Write the base archive to ``out``; return the module load order (names)."""
    moddir = f"lib/modules/{relative_entry(version, 'kernel version')}"
    deps = parse_modules_dep(image_path(rootfs, f"{moddir}/modules.dep").read_text())
    builtin_file = image_path(rootfs, f"{moddir}/modules.builtin")
    builtin = {module_name(p) for p in builtin_file.read_text().split()} if builtin_file.is_file() else set()
    order = closure(wanted, deps, builtin)
    try:
        for p in order:
            relative_entry(p, "modules.dep")
    except EscapesRoot as exc:
        raise InitramfsError(str(exc)) from None
    busybox = image_path(rootfs, "bin/busybox")
    if not busybox.is_file():
        raise InitramfsError(f"no static busybox at {busybox} (install busybox-static in the image)")
    loads = [_plain_name(p) for p in order]
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        (stage / "bin").mkdir()
        shutil.copyfile(busybox, stage / "bin/busybox")
        (stage / "bin/busybox").chmod(0o755)
        (stage / "init").write_text(INIT)
        (stage / "init").chmod(0o755)
        mods = stage / "lib/modules"
        mods.mkdir(parents=True)
        for p, name in zip(order, loads, strict=True):
            (mods / name).write_bytes(read_module(image_path(rootfs, f"{moddir}/{p}")))
        (stage / "modules.order").write_text("\n".join(loads) + "\n")
        (stage / "agentbox").mkdir()
        _write_cpio(stage, out)
    return [module_name(p) for p in order]


def _write_cpio(stage: Path, out: Path) -> None:
    cwd = os.getcwd()
    os.chdir(stage)
    try:
        with libarchive.file_writer(str(out), "cpio_newc") as archive:
            archive.add_files(*sorted(os.listdir(".")))
    finally:
        os.chdir(cwd)


def task_archive(files: dict[str, str]) -> bytes:
    """A per-task newc archive holding ``files`` (archive path -> text), e.g. ``{LAUNCH_PATH: ...}``."""
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        for rel, text in files.items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_text(text)
        out = stage.parent / (stage.name + ".cpio")
        try:
            _write_cpio(stage, out)
            buf.write(out.read_bytes())
        finally:
            out.unlink(missing_ok=True)
    return buf.getvalue()


def launch_archive(launch_text: str) -> bytes:
    """The per-task archive with ``/agentbox/launch.conf``."""
    return task_archive({LAUNCH_PATH: launch_text})


def cached_base(rootfs: Path, version: str, cache: Path, wanted: tuple[str, ...] = WANTED) -> Path:
    """The base archive for this kernel loading ``wanted`` (and their dependencies), built once per
    key under ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"initramfs-{version}-{base_key(rootfs, version, wanted)}.cpio"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        write_base(rootfs, version, tmp, wanted)
        os.replace(tmp, path)
    return path


def task_initrd(base: Path, launch_text: str, out: Path, *, files: dict[str, str] | None = None) -> Path:
    """Concatenate the base archive and the task's archive (launch.conf, or ``files``) into ``out``."""
    with open(out, "wb") as f:
        with open(base, "rb") as b:
            shutil.copyfileobj(b, f)
        f.write(task_archive(files) if files is not None else launch_archive(launch_text))
    return out
