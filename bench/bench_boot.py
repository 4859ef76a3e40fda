"""Boot to the first guest command: agentbox_runtime.vmm.qemu versus bare qemu command lines.

All boot the same initramfs (with the same launch.conf) and task rootfs (an
overlay over ``localhost/agentbox:latest``) and are timed until the guest
command's marker appears on the kernel console. The bare lines have only what
the boot needs (9p root, serial file): ``bare_qemu_s`` boots the bzImage
through SeaBIOS (the old path), ``bare_fast_s`` the decompressed kernel through
PVH with qboot (the path the runtime takes); ``--machines pc,q35`` adds bare
bzImage runs on other machine types. Prints JSON with the medians, the ratios
(runtime / bare fast, runtime / bare bzImage) and the runtime's guest phases
(kernel, modules, root, init: from the guest's own stamps).

    .venv/bin/python bench/bench_boot.py [--rounds 3] [--machines pc] [--accel tcg]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agentbox_guest_init import contract
from agentbox_guest_init.launch_config import LaunchConfig, encode
from agentbox_runtime.vmm import initramfs
from agentbox_runtime.vmm.base import VmSpec
from agentbox_runtime.vmm.boot_phases import durations
from agentbox_runtime.vmm.qemu import CMDLINE, QemuDriver, cache_dir, fast_boot, qemu_binary, tail

IMAGE = "localhost/agentbox:latest"
MARKER = "AGENTBOX-BENCH-FIRST-COMMAND"
TIMEOUT_S = 600.0


@contextmanager
def image_rootfs(base: Path) -> Iterator[Path]:
    """An overlay over the mounted guest image; unmounted on exit."""
    lower = subprocess.run(["podman", "image", "mount", IMAGE], capture_output=True, text=True,
                           check=True, timeout=300).stdout.strip()
    merged = base / "merged"
    for d in ("merged", "upper", "work"):
        (base / d).mkdir()
    try:
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={base / 'upper'},workdir={base / 'work'}", str(merged)],
                       check=True, timeout=60)
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], capture_output=True, timeout=60)
        subprocess.run(["podman", "image", "unmount", IMAGE], capture_output=True, timeout=60)


def wait_marker(proc: subprocess.Popen[bytes], log: Path, started: float) -> float:
    """Seconds from ``started`` until MARKER is on the console; kills the VM afterwards."""
    try:
        while time.monotonic() - started < TIMEOUT_S:
            if log.exists() and MARKER in log.read_text(errors="replace"):
                return time.monotonic() - started
            if proc.poll() is not None:
                raise RuntimeError(f"qemu exited {proc.returncode} before the marker:\n{tail(log)}")
            time.sleep(0.02)
        raise TimeoutError(f"no marker within {TIMEOUT_S:.0f}s:\n{tail(log)}")
    finally:
        proc.kill()
        proc.wait(30)


def launch(rootfs: Path, ws: Path) -> LaunchConfig:
    return LaunchConfig(
        task_rootfs=str(rootfs), workspace_source=str(ws), workspace_tag=contract.WORKSPACE_TAG,
        workspace_target="/workspace", ram_mib=1024, vcpus=2, workdir="/", exec_path="/bin/sh",
        argv=("sh", "-c", f"echo {MARKER} > /dev/ttyS0"))


def via_runtime(rootfs: Path, cfg: LaunchConfig, task: Path, accel: str) -> float:
    started = time.monotonic()
    handle = QemuDriver().start(VmSpec(rootfs=rootfs, launch=cfg, task_dir=task, accel=accel))
    return wait_marker(handle.proc, handle.console_log, started)


def bare(rootfs: Path, initrd: Path, kernel: Path, task: Path, machine: str, accel: str,
         firmware: list[str] | None = None) -> float:
    task.mkdir(parents=True, exist_ok=True)
    log = task / "console.log"
    argv = [qemu_binary(), "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-machine", machine, "-accel", accel, "-m", "1024", "-smp", "2", *(firmware or []),
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", CMDLINE,
            "-serial", f"file:{log}",
            "-fsdev", f"local,id=root,path={rootfs},security_model=passthrough",
            "-device", f"virtio-9p-pci,fsdev=root,mount_tag={contract.ROOTFS_TAG}"]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return wait_marker(proc, log, started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--machines", default="pc", help="bare machine types, comma separated")
    parser.add_argument("--accel", default="tcg", choices=["tcg", "kvm"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "rootfs").mkdir()
        (tmp / "ws").mkdir()
        with image_rootfs(tmp / "rootfs") as rootfs:
            cfg = launch(rootfs, tmp / "ws")
            kernel = initramfs.find_kernel(rootfs)
            version = initramfs.kernel_version(rootfs, kernel)
            base = initramfs.cached_base(rootfs, version, cache_dir() / "initramfs")
            initrd = initramfs.task_initrd(base, encode(cfg), tmp / "bare-initrd.img")
            fast_kernel, firmware = fast_boot(kernel)
            runtime_s: list[float] = []
            fast_s: list[float] = []
            bare_s: dict[str, list[float]] = {m: [] for m in args.machines.split(",")}
            for i in range(args.rounds):
                runtime_s.append(via_runtime(rootfs, cfg, tmp / f"rt{i}", args.accel))
                fast_s.append(bare(rootfs, initrd, fast_kernel, tmp / f"fast{i}", "pc", args.accel, firmware))
                for machine, times in bare_s.items():
                    times.append(bare(rootfs, initrd, kernel, tmp / f"bare-{machine}{i}", machine, args.accel))
            phases = durations((tmp / f"rt{args.rounds - 1}" / "console.log").read_text(errors="replace"), None)
    rt, fast = statistics.median(runtime_s), statistics.median(fast_s)
    medians = {m: round(statistics.median(t), 3) for m, t in bare_s.items()}
    ref = statistics.median(bare_s["pc"]) if "pc" in bare_s else None
    print(json.dumps({"benchmark": "boot_to_first_command", "accel": args.accel, "rounds": args.rounds,
                      "runtime_qemu_s": round(rt, 3), "bare_fast_s": round(fast, 3), "bare_qemu_s": medians,
                      "overhead_ratio": round(rt / fast, 3),
                      "speedup_vs_bzimage_ratio": round(ref / rt, 3) if ref else None,
                      "runtime_guest_phases_s": phases}, indent=2))


if __name__ == "__main__":
    main()
