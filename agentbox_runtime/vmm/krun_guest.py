"""Boot a directory as a libkrun-style guest with qemu: what ``krun_start_enter`` does, in Python.

Used by the QEMU-backed libkrun stand-in (``suites/standins/libkrun``) and by the
QEMU-backed OCI runtime (:mod:`agentbox_runtime.oci`). A :class:`GuestSpec` says what
libkrun's context would hold (root directory, disks, shares, command, console
fds); :func:`boot` boots the root's own kernel (``/boot/vmlinuz-*``, entered
through PVH) with a generated initramfs and a busybox PID 1 in init.krun's role:

- mounts the kernel filesystems libkrun's init mounts (``/proc``, ``/sys``, cgroup2,
  ``/dev/pts``, ``/dev/shm``), loads the late modules from the root;
- configures the network: qemu user-mode networking (10.0.2.15 via 10.0.2.2), TSI-like: 10.0.2.2
  itself is unreachable, as under libkrun's TSI
  or, on a tap device, the address, MAC and gateway it is given;
- takes the command as libkrun's init does (:mod:`agentbox_runtime.vmm.krun_init`): given
  (``krun_set_exec``: :attr:`GuestSpec.exec_path`), or else from ``/.krun_config.json`` in the root,
  which crun's krun handler writes (args, env, cwd, hostname; ``process.user`` is not read, the
  command runs as root);
- runs it with its stdio on the console ports ``krun-stdin``/``krun-stdout``/``krun-stderr``
  (one ``hvc0`` when the caller's stdio is a terminal), and writes its status to the status port.

The root is one 9p share (``multidevs=remap``: a container's tree spans several filesystems, its
volumes and tmpfs mounts included, as the virtio-fs root crun hands libkrun does). The exit status
is the command's; 125 when init cannot set up the guest, 126 or 127 when the command cannot be
executed or found (libkrun's codes). qemu runs under the share filter it inherits from its caller
when the caller loaded one.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agentbox_guest_init import contract
from agentbox_runtime.retry import retry
from agentbox_runtime.vmm import host_share, initramfs, krun_init, qemu
from agentbox_runtime.vmm.console_log import ConsoleRecorder
from agentbox_runtime.vmm.host import cache_dir, die_with_parent
from agentbox_runtime.vmm.qemu_opts import opts

INIT_FAILED = 125
CONNECT_TIMEOUT_S = 30.0
DRAIN_S = 2.0
STDIO_PORTS = ("krun-stdin", "krun-stdout", "krun-stderr")
SUBMOUNT_9P = "trans=virtio,version=9p2000.L,msize=262144,access=client"  # no cache: host writes seen at once
DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/", "TERM=linux")


@dataclass(frozen=True)
class Disk:
    """A virtio-blk disk: ``id`` is its serial (``/dev/disk/by-id``), in the order given."""

    id: str
    path: str
    read_only: bool = False
    format: str = "raw"


@dataclass(frozen=True)
class Share:
    """A host directory under 9p tag ``tag``: a ``krun_add_virtiofs`` share the guest mounts itself, or,
    with ``mount_at``, a directory submount of the root tree that PID 1 mounts at that guest path
    (served like the root: the same files, passthrough, ``multidevs=remap``)."""

    tag: str
    path: str
    read_only: bool = False
    mount_at: str | None = None


@dataclass(frozen=True)
class VsockListen:
    """A guest vsock ``port`` the VMM bridges host connections to, listening on unix socket ``path``
    (``krun_add_vsock_port2(..., listen=true)``). qemu here has no virtio-vsock: the port travels as
    the virtio-serial port :func:`agentbox_guest_init.contract.vsock_port_name`, one connection at a time."""

    port: int
    path: str


@dataclass(frozen=True)
class TapNetwork:
    """The guest's eth0 on tap device ``ifname`` (in the caller's network namespace)."""

    ifname: str
    mac: str
    address: str  # "10.88.0.5/16"
    gateway: str | None


@dataclass
class GuestSpec:
    """What a libkrun context holds.

    ``exec_path`` is ``krun_set_exec``'s path (``argv`` its arguments, ``env`` its whole environment,
    ``workdir`` ``krun_set_workdir``'s directory); None, as with crun's krun handler, means libkrun's
    init takes the command, environment and directory from ``/.krun_config.json`` in ``root``."""

    vcpus: int
    ram_mib: int
    root: Path
    exec_path: str | None = None
    argv: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    workdir: str = "/"
    disks: list[Disk] = field(default_factory=list)
    shares: list[Share] = field(default_factory=list)
    vsock_listen: list[VsockListen] = field(default_factory=list)
    console: tuple[int, int, int] = (0, 1, 2)
    hostname: str | None = None  # with exec_path; from /.krun_config.json's HOSTNAME otherwise
    network: TapNetwork | None = None
    kernel_log: Path | None = None  # where ttyS0 goes (capped); None: the stderr fd
    #: With non-TTY stdio, libkrun hands console text (kernel and hvc0) to its logger as error records
    #: (target ``init_or_kernel``); False when that logger drops them (level 0 without RUST_LOG).
    console_logged: bool = True
    accel: str = "auto"


def _q(text: str) -> str:
    return shlex.quote(text)


def _network(spec: GuestSpec) -> str:
    net = spec.network
    if net is None:
        # TSI-like: qemu's user network carries the traffic, but the guest gets no 10.0.2.2, the
        # host-loopback alias only qemu has; under libkrun's TSI a guest reaches the host at the
        # host's own addresses (docs/libkrun-fidelity.md 3d), and so it must here
        addresses = ("$bb ip link set eth0 up && $bb ip addr add 10.0.2.15/24 dev eth0 && "
                     "$bb ip route add default via 10.0.2.2 && $bb ip route add blackhole 10.0.2.2/32")
        if spec.exec_path is None:  # a container's /etc/resolv.conf is its own (Podman's file, bind-mounted)
            return addresses
        return addresses + "\n$bb rm -f /etc/resolv.conf 2>/dev/null; echo nameserver 10.0.2.3 >/etc/resolv.conf 2>/dev/null"
    route = f" && $bb ip route add default via {_q(net.gateway)}" if net.gateway else ""
    return (f"$bb ip link set eth0 address {_q(net.mac)} && $bb ip link set eth0 up && "
            f"$bb ip addr add {_q(net.address)} dev eth0{route} || log 'cannot configure eth0'")


def _submounts(spec: GuestSpec) -> str:
    """Mount each submount share at its guest path, parents first. libkrun's virtio-fs announces a
    directory that is another mount on the host (``FUSE_ATTR_SUBMOUNT``, v1.18.0
    ``src/devices/src/virtio/fs/linux/passthrough.rs`` ``do_lookup``) and the guest kernel mounts it
    there; 9p has no such thing, so PID 1 mounts the same directory, shared on its own."""
    lines = []
    for share in spec.shares:
        if share.mount_at:
            lines.append(f"$bb mkdir -p {_q(share.mount_at)} 2>/dev/null; $bb mount -t 9p -o {SUBMOUNT_9P} "
                         f"{_q(share.tag)} {_q(share.mount_at)} || log {_q(f'cannot mount {share.mount_at}')}\n")
    return "".join(lines)


def _command(spec: GuestSpec) -> str:
    """The lines that decide the command, its environment and directory (see :mod:`krun_init`)."""
    if spec.exec_path is None:
        return krun_init.config_mode_lines()
    hostname = f"$bb hostname {_q(spec.hostname)}\n" if spec.hostname else ""
    return (hostname + krun_init.exec_mode_lines(spec.exec_path, spec.argv, [*DEFAULT_ENV, *spec.env])
            + f"cd {_q(spec.workdir)} 2>/dev/null || {{ log {_q(f'cannot enter workdir {spec.workdir}')}; "
              f"finish {INIT_FAILED}; }}\n")


def pid1_script(spec: GuestSpec, tty: bool) -> str:
    """The guest's PID 1 (busybox sh), in init.krun's role: mounts, network, the command, its status."""
    if tty:
        stdio = "<>/dev/hvc0 >&0 2>&0"
        setsid = "$bb setsid -c"
    else:
        stdio = '<"${in:-/dev/null}" >"${out:-/dev/hvc0}" 2>"${err:-/dev/hvc0}"'
        setsid = "$bb setsid"
    # a container's /tmp is what crun mounted there (Podman's --tmpfs); the krun-direct stand-in keeps its own
    tmp = "" if spec.exec_path is None else "\n$bb mkdir -p /tmp && $bb mount -t tmpfs -o mode=1777 tmpfs /tmp"
    return f"""bb=/run/agentbox/busybox
log() {{ echo "krun init: $*" >/dev/ttyS0; }}
$bb mount -t proc -o nosuid,nodev,noexec proc /proc
$bb mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
$bb mkdir -p /dev/pts /dev/shm /run/user /run/lock
$bb mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$bb mount -t tmpfs -o mode=1777 tmpfs /dev/shm{tmp}
$bb mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
# libkrunfw's kernel has its drivers built in; this root's kernel loads the rest from the root
[ -x /sbin/modprobe ] && /sbin/modprobe -a {" ".join(contract.LATE_MODULES)} </dev/null >/dev/null 2>&1 &
echo "{contract.PHASE_MARK} init $($bb cut -d' ' -f1 /proc/uptime)" >/dev/ttyS0
for l in fd:/proc/self/fd stdin:/proc/self/fd/0 stdout:/proc/self/fd/1 stderr:/proc/self/fd/2 ptmx:pts/ptmx; do
  [ -e /dev/${{l%%:*}} ] || $bb ln -s ${{l#*:}} /dev/${{l%%:*}}
done
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
$bb ip link set lo up
{_network(spec)}
{_submounts(spec)}{_command(spec)}krun_setsid="{setsid}"
{krun_init.LAUNCH_FUNCTIONS}krun_start {stdio}
finish $?
"""


class LogLines:
    """Console text as libkrun's env_logger writes it (containers/libkrun v1.18
    ``src/devices/src/virtio/console/port_io.rs`` ``PortOutputLog``): one error record per line."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        """The complete lines of ``pending + data`` as records; a partial line waits for its end."""
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        return b"".join(self._record(line) for line in lines)

    def flush(self) -> bytes:
        """The last partial line, marked as libkrun marks it."""
        tail, self.pending = self.pending, b""
        return self._record(b"[missing newline]" + tail) if tail else b""

    @staticmethod
    def _record(line: bytes) -> bytes:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1000000:06d}Z"
        return f"[{stamp} ERROR init_or_kernel] ".encode() + line.rstrip(b"\r") + b"\n"


class Relay:
    """Copies bytes from each source to its sink on a thread per route (any fd kind: tty, pipe,
    socket, regular file, /dev/null); EOF on a source half-closes a socket sink."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def route(self, src: socket.socket | int, dst: socket.socket | int, *, as_log: bool = False) -> None:
        """Copy ``src`` to ``dst``; ``as_log``: line by line as libkrun's logger writes console text
        (``[time ERROR init_or_kernel] line``)."""
        t = threading.Thread(target=self._copy, args=(src, dst, LogLines() if as_log else None), daemon=True)
        t.start()
        self.threads.append(t)

    @staticmethod
    def _copy(src: socket.socket | int, dst: socket.socket | int, log: LogLines | None) -> None:
        fd = src if isinstance(src, int) else src.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            data = chunk if log is None else (log.feed(chunk) if chunk else log.flush())
            if data:
                Relay._write(dst, data)
            if not chunk:
                break
        if isinstance(dst, socket.socket):
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    @staticmethod
    def _write(dst: socket.socket | int, data: bytes) -> None:
        try:
            if isinstance(dst, socket.socket):
                dst.sendall(data)
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(dst, view):]
        except OSError:
            pass  # the reader went away: drop output, as a closed console would

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the guest-side routes to reach EOF."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))


def _listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def _accept(lst: socket.socket, proc: subprocess.Popen[bytes]) -> socket.socket:
    """qemu's connection to ``lst`` (it connects at start-up), within CONNECT_TIMEOUT_S."""
    lst.settimeout(0.2)
    conns: list[socket.socket] = []

    def accepted(last_try: bool) -> bool:
        try:
            conn, _ = lst.accept()
        except TimeoutError:
            if proc.poll() is not None or last_try:
                raise RuntimeError(f"qemu did not connect to {lst.getsockname()} (qemu exit {proc.poll()})") from None
            return False
        conn.setblocking(True)
        conns.append(conn)
        return True

    retry(accepted, timeout=CONNECT_TIMEOUT_S, interval=0.0)
    return conns[0]


def libkrun_disk_serial(path: str | Path) -> str:
    """The virtio-blk serial libkrun gives a disk: the decimal ``st_dev``, ``st_rdev`` and ``st_ino``
    of the image file, concatenated and cut to 20 bytes (containers/libkrun v1.10-v1.19,
    ``src/devices/src/virtio/block/device.rs`` ``build_device_id``, kvmtool's scheme). The block id
    given to ``krun_add_disk`` is libkrun's internal name only; the guest never sees it."""
    st = os.stat(path)
    return f"{st.st_dev}{st.st_rdev}{st.st_ino}"[:20]


def tree_share_args(fsid: str, path: str | Path, tag: str, *, read_only: bool = False) -> list[str]:
    """A piece of the guest's own tree as a 9p share: guest ids land unchanged (passthrough), and
    ``multidevs=remap`` keeps inode numbers unique across the filesystems of a container's tree
    (rootfs, volumes, tmpfs, bind-mounted files), which the guest would otherwise confuse."""
    return ["-fsdev", opts("local", id=fsid, path=path, security_model=qemu.ROOTFS_MODEL, multidevs="remap",
                           readonly="on" if read_only else None),
            "-device", opts("virtio-9p-pci", fsdev=fsid, mount_tag=tag)]


def root_share_args(root: Path) -> list[str]:
    """The guest's root as one 9p share (:func:`tree_share_args`)."""
    return tree_share_args("root", root, contract.ROOTFS_TAG)


def qemu_argv(spec: GuestSpec, work: Path, kernel: Path, initrd: Path, accel: str, tty: bool) -> list[str]:
    """The qemu command line for ``spec`` (sockets under ``work``)."""
    boot_kernel, firmware = qemu.fast_boot(kernel)
    argv = qemu.machine_args(ram_mib=spec.ram_mib, vcpus=spec.vcpus, kernel=boot_kernel, initrd=initrd,
                             accel=accel, firmware=firmware)
    argv += ["-chardev", opts("socket", id="kcon", path=work / "ttyS0.sock", server="off"), "-serial", "chardev:kcon",
             "-device", "virtio-serial-pci,id=vser"]
    argv += qemu.port_args("status", qemu.STATUS_PORT, "socket", path=work / qemu.STATUS_SOCKET, server="off")
    if tty:
        argv += qemu.port_args("con", "", "stdio", console=True, signal="off")
    else:
        argv += qemu.port_args("con", "", "socket", console=True, path=work / "hvc0.sock", server="off")
        for name in STDIO_PORTS:
            argv += qemu.port_args(name, name, "socket", path=work / f"{name}.sock", server="off")
    for i, vsock in enumerate(spec.vsock_listen):
        argv += qemu.port_args(f"vsock{i}", contract.vsock_port_name(vsock.port), "socket", path=vsock.path,
                               server="on", wait="off")
    argv += root_share_args(spec.root)
    for i, share in enumerate(spec.shares):
        if share.mount_at is None:
            argv += qemu.share_args(f"fs{i}", share.path, share.tag, read_only=share.read_only)
        else:
            argv += tree_share_args(f"fs{i}", share.path, share.tag, read_only=share.read_only)
    for i, disk in enumerate(spec.disks):
        argv += qemu.disk_args(i, libkrun_disk_serial(disk.path), disk.path, read_only=disk.read_only,
                               fmt=disk.format)
    if spec.network is None:
        return argv + qemu.net_args()
    return argv + ["-netdev", opts("tap", id="n0", ifname=spec.network.ifname, script="no", downscript="no"),
                   "-device", opts("virtio-net-pci", netdev="n0", mac=spec.network.mac, romfile=""),
                   "-device", "virtio-rng-pci"]


def boot(spec: GuestSpec, work: Path) -> int:
    """Boot ``spec`` (sockets and files under ``work``) and return the guest command's status.

    SIGTERM, SIGINT and SIGHUP stop the guest (qemu is killed); the status is then 128+signal."""
    in_fd, out_fd, err_fd = spec.console
    tty = os.isatty(in_fd) and os.isatty(out_fd)
    if not spec.root.is_dir():
        raise RuntimeError(f"root {spec.root} is not a directory")
    for vsock in spec.vsock_listen:
        if os.path.lexists(vsock.path):
            raise RuntimeError(f"vsock port {vsock.port}: {vsock.path} already exists")
    kernel = initramfs.find_kernel(spec.root)
    base = initramfs.cached_base(spec.root, initramfs.kernel_version(spec.root, kernel),
                                 cache_dir() / "initramfs")
    initrd = initramfs.task_initrd(base, "", work / "initrd.img",
                                   files={initramfs.PID1_PATH: pid1_script(spec, tty)})
    accel = qemu.QemuDriver().choose_accel(os.environ.get("AGENTBOX_QEMU_ACCEL", spec.accel), kernel, base)
    names = ["ttyS0", "status"] + ([] if tty else ["hvc0", *STDIO_PORTS])
    listeners = {n: _listener(work / f"{n}.sock") for n in names}
    argv = qemu_argv(spec, work, kernel, initrd, accel, tty)
    proc = subprocess.Popen(argv, stdin=None if tty else subprocess.DEVNULL,
                            stdout=None if tty else subprocess.DEVNULL, stderr=err_fd,
                            preexec_fn=die_with_parent,
                            pass_fds=host_share.fds_in([share.path for share in spec.shares]))
    stopped_by: list[int] = []

    def terminate(signum: int, _frame: object) -> None:
        stopped_by.append(signum)
        proc.kill()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, terminate)
    try:
        status = _run(proc, listeners, spec, work, tty)
    except RuntimeError:
        if not stopped_by:
            raise
        status = 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return 128 + stopped_by[0] if stopped_by else status


def _run(proc: subprocess.Popen[bytes], listeners: dict[str, socket.socket], spec: GuestSpec, work: Path,
         tty: bool) -> int:
    in_fd, out_fd, err_fd = spec.console
    conns = {n: _accept(lst, proc) for n, lst in listeners.items()}
    relay, stdin_relay = Relay(), Relay()
    status_recorder = ConsoleRecorder(work / "status", cap=qemu.STATUS_CAP).start(conns["status"])
    # console text: on a terminal as it is; otherwise libkrun's logger records it, or drops it
    console = err_fd if tty or spec.console_logged else os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    if spec.kernel_log is not None:
        ConsoleRecorder(spec.kernel_log).start(conns["ttyS0"])
    else:
        relay.route(conns["ttyS0"], console, as_log=not tty)
    if not tty:
        stdin_relay.route(in_fd, conns["krun-stdin"])
        relay.route(conns["krun-stdout"], out_fd)
        relay.route(conns["krun-stderr"], err_fd)
        relay.route(conns["hvc0"], console, as_log=True)
    proc.wait()
    relay.drain(DRAIN_S)
    if console != err_fd:
        os.close(console)
    status_recorder.join(DRAIN_S)
    status = qemu.read_status(work / "status")
    if status is None:
        raise RuntimeError(f"the guest stopped without reporting an exit status (qemu exit {proc.returncode})")
    return status
