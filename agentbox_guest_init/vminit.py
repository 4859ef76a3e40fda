"""PID 1 inside qemu guests: ``agentbox-guest-init vm-init /run/agentbox/launch.conf``.

What libkrun does natively for its guests, done here for qemu: mount the
kernel filesystems, bring up the network (qemu user-mode: 10.0.2.15/24 via
10.0.2.2, DNS 10.0.2.3), read launch.conf, run ``exec_path`` with ``argv``
and ``env`` in ``workdir`` as the session leader of the command console
(``hvc0``), reap every orphan, and when the command exits write
``exit=N`` (or ``signal=N``) to the ``org.agentbox.status`` port, sync and
power off.

A snapshot template (kernel command line ``agentbox.launch=port``) stops short
of the launch: with its kernel filesystems, modules and network up, PID 1
writes ``ready`` on the ``org.agentbox.launch`` port and blocks reading one
JSON line there. The host saves the guest at that point; each guest restored
from it receives its own line (:func:`receive_launch`) and, before anything
else runs, reseeds the kernel RNG from the host's seed, steps the clock to the
host's time and gets a fresh machine-id, then waits for its hot-added disks.
Every guest, cold or restored, gets a random ``contract.INSTANCE_ID_PATH``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import struct
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

from agentbox_guest_init import contract, instance_id
from agentbox_guest_init.launch_config import LaunchConfig, decode

STATUS_PORT = "org.agentbox.status"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
MOUNTS = (
    ("proc", "/proc", "proc", "nosuid,nodev,noexec"),
    ("sysfs", "/sys", "sysfs", "nosuid,nodev,noexec"),
    ("devpts", "/dev/pts", "devpts", "gid=5,mode=620,ptmxmode=666"),
    ("tmpfs", "/dev/shm", "tmpfs", "mode=1777"),
    ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", ""),
)


def log(msg: str) -> None:
    """A line on the kernel console (ttyS0 → console.log on the host)."""
    try:
        with open("/dev/ttyS0", "w") as tty:
            tty.write(f"agentbox-vminit: {msg}\n")
    except OSError:
        print(f"agentbox-vminit: {msg}", file=sys.stderr)


def stamp(phase: str) -> None:
    """A boot-phase stamp on the kernel console (see ``contract.PHASE_MARK``)."""
    try:
        uptime = Path("/proc/uptime").read_text().split()[0]
    except (OSError, IndexError):
        return
    log_raw(f"{contract.PHASE_MARK} {phase} {uptime}")


def log_raw(line: str) -> None:
    try:
        with open("/dev/ttyS0", "w") as tty:
            tty.write(line + "\n")
    except OSError:
        pass


MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}


def mount(source: str, target: str, fstype: str, opts: str) -> bool:
    """mount(2) through libc (a fork and exec of mount(8) costs ~0.1 s each under TCG)."""
    flags, data = 0, []
    for opt in filter(None, opts.split(",")):
        if opt in FLAGS:
            flags |= FLAGS[opt]
        else:
            data.append(opt)
    libc = ctypes.CDLL(None, use_errno=True)
    rc: int = libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                    ",".join(data).encode() if data else None)
    return rc == 0


def mount_all() -> None:
    for source, target, fstype, opts in MOUNTS:
        Path(target).mkdir(parents=True, exist_ok=True)
        if not mount(source, target, fstype, opts) and fstype != "cgroup2":
            log(f"mount {target} failed: {os.strerror(ctypes.get_errno())}")
    for link, target in (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
                         ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2"),
                         ("/dev/ptmx", "pts/ptmx")):
        if not os.path.lexists(link):
            os.symlink(target, link)
    Path("/run/user").mkdir(parents=True, exist_ok=True)
    Path("/run/lock").mkdir(parents=True, exist_ok=True)


def load_late_modules() -> subprocess.Popen[bytes] | None:
    """Start ``modprobe -a`` of :data:`contract.LATE_MODULES` in the background (reaped as an orphan by
    the PID 1 loop); the kernel loads any of them on demand meanwhile."""
    try:
        return subprocess.Popen(["modprobe", "-a", *contract.LATE_MODULES], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as exc:
        log(f"modprobe failed: {exc}")
        return None


NETWORK = """link set lo up
link set eth0 up
addr add 10.0.2.15/24 dev eth0
route add default via 10.0.2.2
"""


def network() -> None:
    """qemu user-mode networking, in one ``ip -batch`` run."""
    try:
        proc = subprocess.run(["ip", "-force", "-batch", "-"], input=NETWORK, text=True, capture_output=True,
                              timeout=10)
        if proc.returncode != 0:
            log(f"network setup: {proc.stderr.strip()[-300:]}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"network setup failed: {exc}")
    try:
        Path("/etc/resolv.conf").unlink(missing_ok=True)
        Path("/etc/resolv.conf").write_text("nameserver 10.0.2.3\n")
    except OSError:
        pass


def find_port(name: str) -> str | None:
    """The /dev node of a named virtio-serial port."""
    base = Path("/sys/class/virtio-ports")
    if base.is_dir():
        for port in base.iterdir():
            try:
                if (port / "name").read_text().strip() == name:
                    return f"/dev/{port.name}"
            except OSError:
                continue
    return None


def report(status: str) -> None:
    dev = find_port(STATUS_PORT)
    if dev is None:
        log(f"no {STATUS_PORT} port; status {status}")
        return
    with open(dev, "w") as port:
        port.write(status + "\n")
        port.flush()


def console_device() -> str:
    return "/dev/hvc0" if os.path.exists("/dev/hvc0") else "/dev/console"


def start_command(cfg: LaunchConfig) -> int:
    """Start the launch command on the console as a session leader; its pid."""
    env = {"PATH": BASE_PATH, "HOME": "/root", "TERM": os.environ.get("TERM", "linux")}
    env.update(cfg.env_dict())
    tty_path = console_device()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            fd = os.open(tty_path, os.O_RDWR)
            fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
            for target in (0, 1, 2):
                os.dup2(fd, target)
            if fd > 2:
                os.close(fd)
            try:
                os.chdir(cfg.workdir)
            except OSError:
                os.chdir("/")
            argv = list(cfg.argv) or [cfg.exec_path]
            os.execve(cfg.exec_path, argv, env)
        except BaseException as exc:  # noqa: BLE001 - child must never return
            log(f"cannot exec {cfg.exec_path}: {exc}")
            os._exit(127)
    return pid


def reap_until(main_pid: int) -> str:
    """Reap children until ``main_pid`` exits; its status as ``exit=N``/``signal=N``."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return "exit=127"
        except InterruptedError:
            continue
        if pid == main_pid:
            if os.WIFSIGNALED(status):
                return f"signal={os.WTERMSIG(status)}"
            return f"exit={os.WEXITSTATUS(status)}"


def power_off() -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(OSError):
            os.kill(-1, sig)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.05)
            except ChildProcessError:
                break
    os.sync()
    subprocess.run(["umount", "-a", "-r"], capture_output=True, timeout=20)
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(LINUX_REBOOT_CMD_POWER_OFF)
    os._exit(0)


RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
DISK_WAIT_S = 20.0


def port_launch() -> bool:
    """True for a snapshot template: the launch config comes over the launch port."""
    try:
        return "agentbox.launch=port" in Path("/proc/cmdline").read_text().split()
    except OSError:
        return False


def reseed(seed: bytes) -> None:
    """Mix ``seed`` into the kernel's input pool, credited, and force a reseed of the CRNG, so that
    guests restored from one snapshot draw different random bytes from their first read on."""
    with open("/dev/urandom", "wb", buffering=0) as rnd:
        fcntl.ioctl(rnd.fileno(), RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(rnd.fileno(), RNDRESEEDCRNG)


def step_clock(time_ns: int) -> None:
    """Set CLOCK_REALTIME to the host's time (a restored guest's clock resumes at the save)."""
    time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)


def fresh_machine_id() -> None:
    """A new /etc/machine-id (the root's upper layer is this guest's own tmpfs)."""
    with contextlib.suppress(OSError):
        Path("/etc/machine-id").write_text(os.urandom(16).hex() + "\n")


def wait_for_disks(serials: list[str], timeout: float = DISK_WAIT_S) -> None:
    """Wait until a virtio-blk disk with each serial is probed (the host hot-adds them after a
    restore); logs the ones still missing at the timeout."""
    deadline = time.monotonic() + timeout
    missing = set(serials)
    while missing:
        for block in Path("/sys/block").glob("vd*"):
            with contextlib.suppress(OSError):
                missing.discard((block / "serial").read_text().strip())
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if missing:
        log(f"hot-added disks not seen within {timeout:.0f}s: {sorted(missing)}")


def read_line(fd: int, limit: int = 1 << 20) -> bytes:
    """One line from the launch port ``fd`` (at most ``limit`` bytes). A virtio-serial port reads
    as end-of-file while no host is connected (right after a restore, before the host connects):
    that is waited out, not taken as the end."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            time.sleep(0.005)
            continue
        data += chunk
        if len(data) > limit:
            raise ValueError(f"launch message longer than {limit} bytes")
    return data


def receive_launch(path: str) -> None:
    """The snapshot template's launch: say ``ready`` on the launch port, block until the host sends
    its line (the template is saved meanwhile; every restored guest resumes here), then apply it and
    write the launch config to ``path``."""
    dev = None
    deadline = time.monotonic() + 10.0
    while dev is None and time.monotonic() < deadline:
        dev = find_port(contract.LAUNCH_PORT_NAME)
        if dev is None:
            time.sleep(0.02)
    if dev is None:
        raise RuntimeError(f"no {contract.LAUNCH_PORT_NAME} port")
    fd = os.open(dev, os.O_RDWR)
    try:
        os.write(fd, b"ready\n")
        message = json.loads(read_line(fd))
        reseed(bytes.fromhex(message["seed"]))
        step_clock(int(message["time_ns"]))
        fresh_machine_id()
        stamp("restore")
        wait_for_disks([str(s) for s in message.get("disks", [])])
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(message["launch"])
        os.write(fd, b"launched\n")
    finally:
        os.close(fd)


def template_modules(loader: subprocess.Popen[bytes] | None) -> None:
    """A template waits for its late modules: the saved guest has them all."""
    if loader is not None:
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            loader.wait(60)


def main(argv: list[str]) -> int:
    """Entry point: ``vm-init [LAUNCH_CONF]`` (default /run/agentbox/launch.conf)."""
    path = argv[0] if argv else "/run/agentbox/launch.conf"
    if os.getpid() != 1:
        print("agentbox-guest-init vm-init must run as PID 1 inside a qemu guest", file=sys.stderr)
        return 2
    status = "exit=1"
    try:
        mount_all()
        loader = load_late_modules()
        stamp("init")
        network()
        if port_launch():
            template_modules(loader)
            receive_launch(path)
        instance_id.write()
        cfg = decode(Path(path).read_text())
        status = reap_until(start_command(cfg))
    except Exception as exc:  # noqa: BLE001 - PID 1 must always power off
        log(f"vm-init failed: {exc}")
    try:
        report(status)
    finally:
        power_off()
    return 0
