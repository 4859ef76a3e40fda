"""What ``krun_start_enter`` of the QEMU-backed libkrun stand-in execs into.

``python launcher.py --config-fd N`` reads the context the library recorded
(JSON on fd N: vm config, root, disks, shares, workdir, exec, env, console
fds), boots the root's own kernel with qemu-system through the building blocks
of :mod:`runtime.vmm.qemu`, relays the console to the recorded fds the way
libkrun's default virtio console does, and exits with the guest command's
status. See the header of ``libkrun_qemu.c`` for what differs from libkrun.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guest_init import contract
from runtime.private_dir import runtime_dir
from runtime.vmm import host_share, initramfs, qemu
from runtime.vmm.host import die_with_parent

INIT_FAILED = 125  # libkrun: "init" cannot set up the environment inside the microVM
CONNECT_TIMEOUT_S = 30.0
DRAIN_S = 2.0
STDIO_PORTS = ("krun-stdin", "krun-stdout", "krun-stderr")
DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/", "TERM=linux")


def say(msg: str) -> None:
    print(f"krun-standin: {msg}", file=sys.stderr, flush=True)


@dataclass
class Config:
    """The recorded libkrun context."""

    vcpus: int
    ram_mib: int
    root: Path
    workdir: str
    exec_path: str
    argv: list[str]
    env: list[str]
    disks: list[dict[str, Any]]
    shares: list[dict[str, Any]]
    console: tuple[int, int, int]

    @classmethod
    def read(cls, fd: int) -> Config:
        with os.fdopen(fd, "r") as f:
            raw = json.load(f)
        return cls(vcpus=int(raw["vcpus"]), ram_mib=int(raw["ram_mib"]), root=Path(raw["root"]),
                   workdir=raw.get("workdir") or "/", exec_path=raw["exec_path"], argv=list(raw["argv"]),
                   env=list(raw["env"]), disks=list(raw["disks"]), shares=list(raw["shares"]),
                   console=tuple(raw["console"]) if raw.get("console") else (0, 1, 2))  # type: ignore[arg-type]


def pid1_script(cfg: Config, tty: bool) -> str:
    """The guest's PID 1 (busybox sh), in init.krun's role: mounts, network, the command, its status."""
    q = shlex.quote
    env = " ".join(q(e) for e in (*DEFAULT_ENV, *cfg.env))
    command = " ".join(q(a) for a in (cfg.exec_path, *cfg.argv))
    if tty:
        stdio = "<>/dev/hvc0 >&0 2>&0"
        setsid = "$bb setsid -c"
    else:
        stdio = '<"${in:-/dev/null}" >"${out:-/dev/hvc0}" 2>"${err:-/dev/hvc0}"'
        setsid = "$bb setsid"
    return f"""bb=/run/agentbox/busybox
log() {{ echo "krun-standin init: $*" >/dev/ttyS0; }}
$bb mount -t proc -o nosuid,nodev,noexec proc /proc
$bb mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
$bb mkdir -p /dev/pts /dev/shm /tmp /run/user /run/lock
$bb mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$bb mount -t tmpfs -o mode=1777 tmpfs /dev/shm
$bb mount -t tmpfs -o mode=1777 tmpfs /tmp
$bb mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
# libkrunfw's kernel has its drivers built in; this root's kernel loads the rest from the root
[ -x /sbin/modprobe ] && /sbin/modprobe -a {" ".join(contract.LATE_MODULES)} </dev/null >/dev/null 2>&1 &
echo "{contract.PHASE_MARK} init $($bb cut -d' ' -f1 /proc/uptime)" >/dev/ttyS0
for l in fd:/proc/self/fd stdin:/proc/self/fd/0 stdout:/proc/self/fd/1 stderr:/proc/self/fd/2 ptmx:pts/ptmx; do
  [ -e /dev/${{l%%:*}} ] || $bb ln -s ${{l#*:}} /dev/${{l%%:*}}
done
$bb ip link set lo up
$bb ip link set eth0 up && $bb ip addr add 10.0.2.15/24 dev eth0 && $bb ip route add default via 10.0.2.2
$bb rm -f /etc/resolv.conf 2>/dev/null; echo nameserver 10.0.2.3 >/etc/resolv.conf 2>/dev/null
port() {{
  for p in /sys/class/virtio-ports/*; do
    [ "$($bb cat $p/name 2>/dev/null)" = "$1" ] && {{ echo /dev/${{p##*/}}; return; }}
  done
}}
status=$(port {qemu.STATUS_PORT})
in=$(port krun-stdin); out=$(port krun-stdout); err=$(port krun-stderr)
finish() {{
  [ -n "$status" ] && echo "exit=$1" >"$status"
  $bb kill -TERM -1 2>/dev/null; $bb sleep 0.3; $bb kill -KILL -1 2>/dev/null
  $bb sync; $bb umount -a -r 2>/dev/null; $bb sync
  $bb poweroff -f
}}
exe={q(cfg.exec_path)}
[ -e "$exe" ] || {{ log "cannot find $exe"; finish 127; }}
[ -x "$exe" ] || {{ log "cannot execute $exe"; finish 126; }}
cd {q(cfg.workdir)} 2>/dev/null || {{ log "cannot enter workdir {cfg.workdir}"; finish {INIT_FAILED}; }}
{setsid} $bb env -i {env} {command} {stdio}
finish $?
"""


class Relay:
    """Copies bytes from each source to its sink on a thread per route (any fd kind: tty, pipe,
    socket, regular file, /dev/null); EOF on a source half-closes a socket sink."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def route(self, src: socket.socket | int, dst: socket.socket | int) -> None:
        t = threading.Thread(target=self._copy, args=(src, dst), daemon=True)
        t.start()
        self.threads.append(t)

    @staticmethod
    def _copy(src: socket.socket | int, dst: socket.socket | int) -> None:
        fd = src if isinstance(src, int) else src.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                break
            try:
                if isinstance(dst, socket.socket):
                    dst.sendall(data)
                else:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(dst, view):]
            except OSError:
                pass  # the reader went away: drop output, as a closed console would
        if isinstance(dst, socket.socket):
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the guest-side routes to reach EOF."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))


def listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def accept(lst: socket.socket, proc: subprocess.Popen[bytes]) -> socket.socket:
    lst.settimeout(0.2)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            conn, _ = lst.accept()
            conn.setblocking(True)
            return conn
        except TimeoutError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu did not connect to {lst.getsockname()} (qemu exit {proc.poll()})") from None


def qemu_argv(cfg: Config, work: Path, kernel: Path, initrd: Path, accel: str, tty: bool) -> list[str]:
    boot_kernel, firmware = qemu.fast_boot(kernel)
    argv = qemu.machine_args(ram_mib=cfg.ram_mib, vcpus=cfg.vcpus, kernel=boot_kernel, initrd=initrd, accel=accel,
                             firmware=firmware)
    argv += ["-chardev", f"socket,id=kcon,path={work / 'ttyS0.sock'},server=off", "-serial", "chardev:kcon",
             "-device", "virtio-serial-pci,id=vser"]
    argv += qemu.port_args(f"file,path={work / 'status'}", "status", qemu.STATUS_PORT)
    if tty:
        argv += qemu.port_args("stdio,signal=off", "con", "", console=True)
    else:
        argv += qemu.port_args(f"socket,path={work / 'hvc0.sock'},server=off", "con", "", console=True)
        for name in STDIO_PORTS:
            argv += qemu.port_args(f"socket,path={work / (name + '.sock')},server=off", name, name)
    argv += qemu.share_args("root", cfg.root, contract.ROOTFS_TAG, model=qemu.ROOTFS_MODEL)
    for i, share in enumerate(cfg.shares):
        argv += qemu.share_args(f"fs{i}", share["path"], share["tag"], read_only=bool(share["read_only"]))
    for i, disk in enumerate(cfg.disks):
        argv += qemu.disk_args(i, disk["id"], disk["path"], read_only=bool(disk["read_only"]), fmt=disk["format"])
    return argv + qemu.net_args()


def boot(cfg: Config, work: Path) -> int:
    in_fd, out_fd, err_fd = cfg.console
    tty = os.isatty(in_fd) and os.isatty(out_fd)
    if not cfg.root.is_dir():
        say(f"root {cfg.root} is not a directory")
        return INIT_FAILED
    kernel = initramfs.find_kernel(cfg.root)
    base = initramfs.cached_base(cfg.root, initramfs.kernel_version(cfg.root, kernel), qemu.cache_dir() / "initramfs")
    initrd = initramfs.task_initrd(base, "", work / "initrd.img", files={initramfs.PID1_PATH: pid1_script(cfg, tty)})
    accel = qemu.QemuDriver().choose_accel(os.environ.get("AGENTBOX_QEMU_ACCEL", "auto"), kernel, base)
    names = ["ttyS0"] + ([] if tty else ["hvc0", *STDIO_PORTS])
    listeners = {n: listener(work / f"{n}.sock") for n in names}
    argv = qemu_argv(cfg, work, kernel, initrd, accel, tty)
    proc = subprocess.Popen(argv, stdin=None if tty else subprocess.DEVNULL, stdout=None if tty else subprocess.DEVNULL,
                            stderr=err_fd, preexec_fn=die_with_parent,
                            pass_fds=host_share.fds_in([str(share["path"]) for share in cfg.shares]))
    def terminate(signum: int, _frame: object) -> None:
        proc.kill()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, terminate)
    try:
        return _run(proc, listeners, cfg, work, tty)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run(proc: subprocess.Popen[bytes], listeners: dict[str, socket.socket], cfg: Config, work: Path,
         tty: bool) -> int:
    in_fd, out_fd, err_fd = cfg.console
    try:
        conns = {n: accept(lst, proc) for n, lst in listeners.items()}
    except RuntimeError as exc:
        say(str(exc))
        return INIT_FAILED
    relay, stdin_relay = Relay(), Relay()
    relay.route(conns["ttyS0"], err_fd)
    if not tty:
        stdin_relay.route(in_fd, conns["krun-stdin"])
        relay.route(conns["krun-stdout"], out_fd)
        relay.route(conns["krun-stderr"], err_fd)
        relay.route(conns["hvc0"], err_fd)
    proc.wait()
    relay.drain(DRAIN_S)
    try:
        status = qemu.parse_status(qemu.tail_bytes(work / "status", 4096).decode(errors="replace"))
    except OSError:
        status = None
    if status is None:
        say(f"the guest stopped without reporting an exit status (qemu exit {proc.returncode})")
        return INIT_FAILED
    return status


def main() -> int:
    p = argparse.ArgumentParser(prog="krun-standin-launcher")
    p.add_argument("--config-fd", type=int, required=True)
    cfg = Config.read(p.parse_args().config_fd)
    work = Path(tempfile.mkdtemp(prefix="k", dir=runtime_dir("krun", for_sockets=True)))
    try:
        return boot(cfg, work)
    except (OSError, RuntimeError, initramfs.InitramfsError) as exc:
        say(f"{type(exc).__name__}: {exc}")
        if os.environ.get("KRUN_STANDIN_DEBUG"):
            import traceback

            traceback.print_exc()
        return INIT_FAILED
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
