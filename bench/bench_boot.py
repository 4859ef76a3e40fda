"""Boot to the first guest command: cold boot versus snapshot restore, and the runtime versus bare qemu.

Three figures, each the median of ``--rounds`` (default 5), measured in one run:

- ``cold_to_first_command_s``: :class:`QemuDriver` boots the image's kernel over a task rootfs (an overlay over
  ``localhost/agentbox:latest``) until the guest command's marker is on the kernel console;
- ``restore_to_first_command_s``: :class:`~agentbox_runtime.vmm.snapshot.SnapshotDriver` restores the same guest
  from its template (built before the timed rounds, not counted) until the same marker;
- ``restore_to_ready_s`` (and ``cold_to_ready_s``): a harness-shaped task (:class:`MicrovmTask`, the agent
  as its command) until the workspace is mounted and the nix and Podman preps report ready.

``restore_over_cold`` is the ratio of the first two. ``--bare`` adds the old comparison of the runtime
with bare qemu command lines (PVH+qboot and bzImage); ``--machines pc,q35`` adds bare bzImage runs on
other machine types. Prints JSON.

    .venv/bin/python bench/bench_boot.py [--rounds 5] [--accel tcg] [--bare] [--machines pc]
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
from agentbox_runtime.microvm.image_cache import validate_rootfs
from agentbox_runtime.microvm.task import MicrovmOptions, MicrovmTask
from agentbox_runtime.state import StateLayout
from agentbox_runtime.vmm import snapshot
from agentbox_runtime.vmm.host import cache_dir, qemu_binary, tail
from agentbox_runtime.vmm.qemu import CMDLINE, QemuDriver, fast_boot

IMAGE = "localhost/agentbox:latest"
MARKER = "AGENTBOX-BENCH-FIRST-COMMAND"
TIMEOUT_S = 600.0
AGENT_COMMAND = ("agentbox-guest-init", "agent", "--port", contract.AGENT_PORT_NAME)


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


def via_snapshot(drv: snapshot.SnapshotDriver, rootfs: Path, cfg: LaunchConfig, task: Path, accel: str) -> float:
    started = time.monotonic()
    handle = drv.start(VmSpec(rootfs=rootfs, launch=cfg, task_dir=task, accel=accel))
    if handle.boot != "restore":
        raise RuntimeError(f"the snapshot driver booted cold: {drv.fallback}")
    return wait_marker(handle.proc, handle.console_log, started)


def to_ready(boot: str, tmp: Path, name: str) -> float:
    """A harness-shaped task until its agent answers and the nix and Podman preps are ready."""
    ws = tmp / f"ready-{name}"
    ws.mkdir()
    layout = StateLayout.resolve(ws, {"XDG_STATE_HOME": str(tmp / f"state-{name}"), "HOME": str(tmp)}).ensure()
    opts = MicrovmOptions(workspace=ws, image=IMAGE, vmm="qemu", command=AGENT_COMMAND, root=True,
                          interactive=False, boot=boot, state=layout, memory_mib=2048, cpus=2)
    started = time.monotonic()
    with MicrovmTask(opts) as task:
        assert task.handle is not None
        if task.handle.boot != boot:
            raise RuntimeError(f"asked for a {boot} boot, got {task.handle.boot}")
        agent = task.handle.agent_client(TIMEOUT_S)
        try:
            agent.wait_ready(TIMEOUT_S)
            for kind in ("nix", "podman"):
                r = agent.run(["agentbox-guest-init", "status", "--wait", kind, "--timeout", "600"], timeout=TIMEOUT_S)
                if r.exit_status != 0:
                    raise RuntimeError(f"{kind} prep not ready: {r.stdout!r} {r.stderr!r}")
            return time.monotonic() - started
        finally:
            agent.close()


def bare_rounds(rootfs: Path, cfg: LaunchConfig, tmp: Path, args: argparse.Namespace) -> dict[str, object]:
    kernel = initramfs.find_kernel(rootfs)
    version = initramfs.kernel_version(rootfs, kernel)
    base = initramfs.cached_base(rootfs, version, cache_dir() / "initramfs")
    initrd = initramfs.task_initrd(base, encode(cfg), tmp / "bare-initrd.img")
    fast_kernel, firmware = fast_boot(kernel)
    fast_s: list[float] = []
    bare_s: dict[str, list[float]] = {m: [] for m in args.machines.split(",")}
    for i in range(args.rounds):
        fast_s.append(bare(rootfs, initrd, fast_kernel, tmp / f"fast{i}", "pc", args.accel, firmware))
        for machine, times in bare_s.items():
            times.append(bare(rootfs, initrd, kernel, tmp / f"bare-{machine}{i}", machine, args.accel))
    return {"bare_fast_s": round(statistics.median(fast_s), 3),
            "bare_qemu_s": {m: round(statistics.median(t), 3) for m, t in bare_s.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--machines", default="pc", help="bare machine types, comma separated (with --bare)")
    parser.add_argument("--accel", default="tcg", choices=["tcg", "kvm"])
    parser.add_argument("--bare", action="store_true", help="also time bare qemu command lines")
    parser.add_argument("--no-ready", action="store_true", help="skip the to-ready figures")
    args = parser.parse_args()
    out: dict[str, object] = {"benchmark": "boot_to_first_command", "accel": args.accel, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "rootfs").mkdir()
        (tmp / "ws").mkdir()
        lower = Path(subprocess.run(["podman", "image", "mount", IMAGE], capture_output=True, text=True, check=True,
                                    timeout=300).stdout.strip())
        digest = "sha256:" + subprocess.run(["podman", "image", "inspect", "-f", "{{.Id}}", IMAGE], capture_output=True,
                                            text=True, check=True, timeout=60).stdout.strip()
        drv = snapshot.SnapshotDriver(image_rootfs=lower, image_digest=digest, guest_init=validate_rootfs(lower))
        with image_rootfs(tmp / "rootfs") as rootfs:
            cfg = launch(rootfs, tmp / "ws")
            built = time.monotonic()
            snapshot.ensure(drv.inputs(VmSpec(rootfs=lower, launch=cfg, task_dir=tmp / "t", accel=args.accel)))
            out["template_ensure_s"] = round(time.monotonic() - built, 3)
            cold_s: list[float] = []
            restore_s: list[float] = []
            for i in range(args.rounds):
                cold_s.append(via_runtime(rootfs, cfg, tmp / f"rt{i}", args.accel))
                restore_s.append(via_snapshot(drv, lower, cfg, tmp / f"rs{i}", args.accel))
            out["guest_phases_cold_s"] = durations((tmp / f"rt{args.rounds - 1}" / "console.log").read_text(
                errors="replace"), None)
            if args.bare:
                out.update(bare_rounds(rootfs, cfg, tmp, args))
        cold, restore = statistics.median(cold_s), statistics.median(restore_s)
        out.update({"cold_to_first_command_s": round(cold, 3), "restore_to_first_command_s": round(restore, 3),
                    "restore_over_cold": round(restore / cold, 3),
                    "cold_rounds_s": [round(x, 3) for x in cold_s], "restore_rounds_s": [round(x, 3) for x in restore_s]})
        if not args.no_ready:
            ready_cold = [to_ready("cold", tmp, f"c{i}") for i in range(args.rounds)]
            ready_restore = [to_ready("restore", tmp, f"r{i}") for i in range(args.rounds)]
            out.update({"cold_to_ready_s": round(statistics.median(ready_cold), 3),
                        "restore_to_ready_s": round(statistics.median(ready_restore), 3),
                        "restore_over_cold_ready": round(statistics.median(ready_restore)
                                                         / statistics.median(ready_cold), 3)})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
