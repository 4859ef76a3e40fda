"""The host side of the libkrun stand-in loaded by a real crun's krun handler (see ``crun_bridge.c``).

``python crun_bridge.py --name NAME --alive-fd 3 --ready-fd 4`` is started, detached, by the
library's constructor in ``crun create``, whose working directory is the bundle. It

1. reads the bundle's ``config.json``, enters the container's network namespace (the path given
   there; none: the caller's), listens on the abstract unix socket ``NAME`` and writes ``ready``,
   or one line saying why it cannot, to the ready fd;
2. waits for ``krun_start_enter`` in the container to connect. The write end of the alive fd is
   held only by crun's processes; once it reaches EOF nobody can ask any more, and the host side
   leaves when no request came within :data:`GRACE_S`;
3. takes the peer's pid (``SO_PEERCRED``; a peer whose root is not the bundle's ``root.path`` is
   turned away: anyone sharing the network namespace can read the name in ``/proc/net/unix``), the
   recorded context and the peer's stdin, stdout and stderr (``SCM_RIGHTS``) and builds the guest
   as libkrun would: the root is the container's own ``/`` (``/proc/<pid>/root``); a context
   without ``krun_set_exec`` (crun 1.21 never calls it) leaves the command to the guest's init,
   which reads ``/.krun_config.json`` there as libkrun v1.18.0's init does
   (:mod:`agentbox_runtime.vmm.krun_init`); libkrun's logger sees ``RUST_LOG`` of the container's
   environment (``process.env``), where crun calls ``krun_set_log_level``;
4. boots it with :func:`agentbox_runtime.vmm.krun_guest.boot`, qemu in the container's network
   namespace, and sends back the guest's status (a native ``int32``). When the peer dies first
   the VM is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentbox_runtime.beneath import lstat_beneath
from agentbox_runtime.errors import AgentboxError, one_line
from agentbox_runtime.oci.bundle import read_config
from agentbox_runtime.oci.network import enter_netns
from agentbox_runtime.private_dir import runtime_dir
from agentbox_runtime.vmm import initramfs
from agentbox_runtime.vmm.krun_guest import INIT_FAILED, GuestSpec, boot
from launcher import console_logged, say

REQUEST = b"agentbox-krun-standin-request 1\n"
GRACE_S = 30.0
"""How long after the alive fd's EOF a request may still come (the container's init closes its
descriptors just before it calls libkrun) before the host side gives up."""
REQUEST_TIMEOUT_S = 10.0


class HostSideError(AgentboxError):
    """The guest cannot be set up; one line for the container's stderr."""


# -- the bundle -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """What the host side takes from the bundle's ``config.json``."""

    netns: str | None  # the container's network namespace (None: crun's own, it creates none)
    root: tuple[int, int]  # (st_dev, st_ino) of ``root.path``: the peer must have it as its root
    rust_log: str | None  # ``RUST_LOG`` in ``process.env`` (what libkrun's env_logger reads there)


def read_bundle(bundle: Path) -> Bundle:
    """The network namespace path, the rootfs identity and ``RUST_LOG`` of the OCI bundle ``bundle``."""
    try:
        data = json.loads(read_config(bundle))
        namespaces = data.get("linux", {}).get("namespaces", [])
        root_path = data["root"]["path"]
        env = data.get("process", {}).get("env", [])
    except (ValueError, AttributeError, KeyError, TypeError):
        raise HostSideError("config.json is not an OCI config with root.path") from None
    netns = None
    for ns in namespaces if isinstance(namespaces, list) else []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            netns = ns.get("path")
            if not isinstance(netns, str) or not netns:
                raise HostSideError("the container gets a network namespace of its own (no path in config.json), "
                                    "where the stand-in's VMM side cannot listen; give it one (Podman does)")
    st = os.stat(bundle / str(root_path))
    rust_log = [str(e)[len("RUST_LOG="):] for e in env if str(e).startswith("RUST_LOG=")] if isinstance(env, list) else []
    return Bundle(netns, (st.st_dev, st.st_ino), rust_log[-1] if rust_log else None)


# -- the guest ------------------------------------------------------------------------------------


def container_root(pid: int, root: str) -> Path:
    """The host path of the container's directory ``root`` (what ``krun_set_root`` was given inside
    the container): ``/proc/<pid>/root`` itself for ``/``; below it, only a path that has no
    symlink on the way (a link there would resolve against the host's root)."""
    base = Path(f"/proc/{pid}/root")
    if not root.startswith("/"):
        raise HostSideError(f"krun_set_root({root!r}): not an absolute path")
    rel = root.strip("/")
    if not rel:
        return base
    fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = lstat_beneath(fd, rel)
    finally:
        os.close(fd)
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise HostSideError(f"krun_set_root({root!r}): no such directory in the container (or a symlink on the way)")
    return base / rel


def guest_spec(raw: dict[str, Any], pid: int, bundle: Bundle) -> GuestSpec:
    """The recorded context of the container process ``pid`` as a guest spec (stdio on 0, 1, 2)."""
    if raw.get("disks") or raw.get("shares") or raw.get("vsock_listen"):
        raise HostSideError("disks, virtio-fs shares and vsock ports are not offered by the stand-in under crun "
                            "(crun 1.21's handler adds none)")
    if raw.get("root") is None:
        raise HostSideError("krun_set_root was not called")
    exec_path = raw.get("exec_path")
    return GuestSpec(vcpus=int(raw["vcpus"]), ram_mib=int(raw["ram_mib"]), root=container_root(pid, str(raw["root"])),
                     exec_path=None if exec_path is None else str(exec_path), argv=[str(a) for a in raw["argv"]],
                     env=[str(e) for e in raw["env"]], workdir=str(raw.get("workdir") or "/"),
                     console_logged=console_logged(int(raw.get("log_level", -1)), bundle.rust_log))


# -- serving --------------------------------------------------------------------------------------


def listen(name: str) -> tuple[socket.socket, Bundle]:
    """Enter the bundle's network namespace and listen on the abstract socket ``name``."""
    bundle = read_bundle(Path("."))
    if bundle.netns is not None:
        enter_netns(bundle.netns)
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    lst.bind("\0" + name)
    lst.listen(1)
    return lst, bundle


def peer_pid(conn: socket.socket) -> int:
    """The connected process's pid in our PID namespace (``SO_PEERCRED``)."""
    return int(struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0])


def in_container(pid: int, bundle: Bundle) -> bool:
    """Whether process ``pid`` has the container's rootfs as its root (after crun's ``pivot_root``).
    Anything else that found the name (``/proc/net/unix`` of a shared network namespace) is refused."""
    try:
        st = os.stat(f"/proc/{pid}/root")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == bundle.root


def wait_for_request(lst: socket.socket, alive_fd: int, bundle: Bundle) -> tuple[socket.socket, int] | None:
    """The container's connection and its pid, or None when crun's processes are all gone and none came
    within :data:`GRACE_S` (a container deleted before it started, or crun failed)."""
    watching = [lst.fileno(), alive_fd]
    timeout: float | None = None  # as long as a crun process may still ask
    while True:
        readable, _, _ = select.select(watching, [], [], timeout)
        if not readable:
            return None
        if lst.fileno() in readable:
            conn, _ = lst.accept()
            pid = peer_pid(conn)
            if in_container(pid, bundle):
                return conn, pid
            conn.close()
        elif not os.read(alive_fd, 64):
            watching.remove(alive_fd)
            timeout = GRACE_S


def receive(conn: socket.socket) -> dict[str, Any]:
    """The peer's recorded context; its stdin, stdout and stderr become ours (0, 1, 2)."""
    conn.settimeout(REQUEST_TIMEOUT_S)
    msg, fds, _, _ = socket.recv_fds(conn, len(REQUEST), 4)
    conn.settimeout(None)
    if msg != REQUEST or len(fds) != 4:
        for fd in fds:
            os.close(fd)
        raise HostSideError(f"unexpected request ({len(fds)} fds)")
    config_fd, *stdio = fds
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
        os.close(fd)
    with os.fdopen(config_fd, "r") as f:
        data: dict[str, Any] = json.load(f)
    return data


def stop_when_gone(conn: socket.socket, done: threading.Event) -> None:
    """SIGTERM ourselves (boot stops qemu) when the container's process goes away first."""
    def watch() -> None:
        with contextlib.suppress(OSError):
            conn.recv(1)
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True).start()


def serve(conn: socket.socket, pid: int, bundle: Bundle) -> None:
    """Boot the guest of the peer ``pid`` and answer with its status."""
    def stopped(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)  # boot() takes over while the guest runs
    done = threading.Event()
    status = INIT_FAILED
    work: Path | None = None
    try:
        raw = receive(conn)
        stop_when_gone(conn, done)
        spec = guest_spec(raw, pid, bundle)
        work = Path(tempfile.mkdtemp(prefix="c", dir=runtime_dir("krun", for_sockets=True)))
        status = boot(spec, work)
    except (OSError, RuntimeError, ValueError, KeyError, AgentboxError, initramfs.InitramfsError) as exc:
        say(one_line(f"{type(exc).__name__}: {exc}"))
    except SystemExit as exc:
        status = int(exc.code) if isinstance(exc.code, int) else INIT_FAILED
    finally:
        done.set()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):  # the container's process is gone; nobody waits for the status
        conn.sendall(struct.pack("i", status))


def main() -> int:
    p = argparse.ArgumentParser(prog="krun-standin-crun-bridge")
    p.add_argument("--name", required=True)
    p.add_argument("--alive-fd", type=int, required=True)
    p.add_argument("--ready-fd", type=int, required=True)
    args = p.parse_args()
    with os.fdopen(args.ready_fd, "w") as ready:
        try:
            lst, bundle = listen(args.name)
        except (OSError, AgentboxError) as exc:
            ready.write(one_line(f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}") + "\n")
            return 1
        ready.write("ready\n")
    request = wait_for_request(lst, args.alive_fd, bundle)
    lst.close()
    os.close(args.alive_fd)
    if request is not None:
        conn, pid = request
        with conn:
            serve(conn, pid, bundle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
