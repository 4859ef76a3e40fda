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
   without ``krun_set_exec`` (crun 1.21 never calls it) runs the command of ``/.krun_config.json``
   there, read the way libkrun v1.18.0's init reads it (:func:`parse_krun_config`), in the workdir
   ``krun_set_workdir`` gave (else the file's);
4. boots it with :func:`agentbox_runtime.vmm.krun_guest.boot`, qemu in the container's network
   namespace, and sends back the guest's status (a native ``int32``). When the peer dies first
   the VM is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentbox_runtime.beneath import lstat_beneath, open_beneath
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
KRUN_CONFIG = ".krun_config.json"
MAX_KRUN_CONFIG_BYTES = 8 << 20
MAX_TOKENS = 16384
"""libkrun v1.18.0 ``init/init.c``: a config of more JSON tokens than this is not parsed at all."""
DEFAULT_INIT = "/bin/sh"
KERNEL_ENV = {"HOME": "/", "TERM": "linux"}
"""The environment Linux gives init; libkrun's cmdline adds ``KRUN_*`` variables to it."""


class HostSideError(AgentboxError):
    """The guest cannot be set up; one line for the container's stderr."""


# -- /.krun_config.json as libkrun's init reads it -------------------------------------------------


class _Object(list[tuple[str, Any]]):
    """A JSON object with its members in document order (duplicates kept), as jsmn sees it."""


@dataclass(frozen=True)
class _Token:
    kind: str  # "object", "array", "string", "primitive"
    value: Any


def _tokens(value: Any) -> Iterator[_Token]:
    """The tokens jsmn makes of ``value``, in document order (an object's keys are string tokens)."""
    if isinstance(value, _Object):
        yield _Token("object", value)
        for key, member in value:
            yield _Token("string", key)
            yield from _tokens(member)
    elif isinstance(value, list):
        yield _Token("array", value)
        for item in value:
            yield from _tokens(item)
    else:
        yield _Token("string" if isinstance(value, str) else "primitive", value)


def _text(value: Any) -> str:
    """A token's text as init copies it: a string's content, anything else its JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _strings(token: _Token) -> list[str] | None:
    """init's ``config_parse_args``: the items of an array, None for an empty one or a scalar."""
    if token.kind != "array" or not token.value:
        return None
    return [_text(item) for item in token.value]


def _string(token: _Token) -> str | None:
    """init's ``config_parse_string``: the token's text, None when empty."""
    text = _text(token.value) if token.kind in ("string", "primitive") else json.dumps(token.value)
    return text or None


@dataclass(frozen=True)
class KrunConfig:
    """What libkrun's init takes from ``/.krun_config.json``."""

    argv: list[str] | None
    env: list[tuple[str, str]]
    workdir: str | None


def parse_krun_config(data: bytes) -> KrunConfig | None:
    """``/.krun_config.json`` read as libkrun v1.18.0's ``init/init.c`` ``config_parse_file`` reads it;
    None where init takes nothing from it (not JSON, more than :data:`MAX_TOKENS` tokens, or not an
    object).

    init walks the jsmn tokens in document order and matches each string token against the key
    names case-insensitively; the first match of each kind wins: ``Env`` (only when an array
    follows), ``args`` or ``Cmd``, ``WorkingDir`` or ``Cwd``, ``Entrypoint``. An OCI config's
    ``process.env``, ``process.args`` and ``process.cwd`` are what crun's file gives. Entrypoint
    items come before the args; an Entrypoint without args is dropped."""
    try:
        doc = json.loads(data, object_pairs_hook=_Object)
    except (ValueError, RecursionError):
        return None
    tokens = list(_tokens(doc))
    if len(tokens) > MAX_TOKENS or tokens[0].kind != "object":
        return None
    env: list[tuple[str, str]] = []
    argv = entrypoint = workdir = None
    have_env = have_args = have_workdir = have_entrypoint = False
    for token, following in zip(tokens[1:], tokens[2:]):
        if have_env and have_args and have_workdir and have_entrypoint:
            break
        if token.kind != "string":
            continue
        name = token.value.lower()
        if not have_env and name == "env" and following.kind == "array":
            env = [(k, v) for k, sep, v in (_text(i).partition("=") for i in following.value) if sep]
            have_env = True
        if not have_args and name in ("args", "cmd"):
            argv, have_args = _strings(following), True
        if not have_workdir and name in ("workingdir", "cwd"):
            workdir, have_workdir = _string(following), True
        if not have_entrypoint and name == "entrypoint":
            entrypoint, have_entrypoint = _strings(following), True
    if argv and entrypoint:
        argv = entrypoint + argv
    return KrunConfig(argv=argv, env=env, workdir=workdir)


def init_env(config_env: list[tuple[str, str]], kernel_env: dict[str, str]) -> dict[str, str]:
    """The workload's environment under libkrun's init: the kernel's (``HOME``, ``TERM``, the
    ``KRUN_*`` variables of the cmdline), then each config item without overriding what is set,
    except ``HOME`` and ``TERM``; ``KRUN_HOME``/``KRUN_TERM`` then replace ``HOME``/``TERM``."""
    env = dict(kernel_env)
    for key, value in config_env:
        if key in ("HOME", "TERM") or key not in env:
            env[key] = value
    for key in ("HOME", "TERM"):
        if f"KRUN_{key}" in env:
            env[key] = env[f"KRUN_{key}"]
    return env


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
    if st is None or not (st.st_mode & 0o170000) == 0o040000:
        raise HostSideError(f"krun_set_root({root!r}): no such directory in the container (or a symlink on the way)")
    return base / rel


def read_krun_config(root: Path) -> bytes | None:
    """The bytes of ``/.krun_config.json`` in ``root``, a regular file not reached through a link;
    None when there is none (init then runs ``/bin/sh``)."""
    dir_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = open_beneath(dir_fd, KRUN_CONFIG, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HostSideError(f"cannot read /{KRUN_CONFIG}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as f:
        if not (os.fstat(f.fileno()).st_mode & 0o170000) == 0o100000:
            raise HostSideError(f"/{KRUN_CONFIG} is not a regular file")
        data = f.read(MAX_KRUN_CONFIG_BYTES + 1)
    if len(data) > MAX_KRUN_CONFIG_BYTES:
        raise HostSideError(f"/{KRUN_CONFIG} is over {MAX_KRUN_CONFIG_BYTES} bytes")
    return data


def guest_spec(raw: dict[str, Any], pid: int) -> GuestSpec:
    """The recorded context of the container process ``pid`` as a guest spec (stdio on 0, 1, 2)."""
    if raw.get("disks") or raw.get("shares") or raw.get("vsock_listen"):
        raise HostSideError("disks, virtio-fs shares and vsock ports are not offered by the stand-in under crun "
                            "(crun 1.21's handler adds none)")
    if raw.get("root") is None:
        raise HostSideError("krun_set_root was not called")
    root = container_root(pid, str(raw["root"]))
    level = int(raw.get("log_level", -1))
    workdir = raw.get("workdir")
    if raw.get("exec_path") is not None:
        return GuestSpec(vcpus=int(raw["vcpus"]), ram_mib=int(raw["ram_mib"]), root=root,
                         workdir=workdir or "/", exec_path=str(raw["exec_path"]), argv=[str(a) for a in raw["argv"]],
                         env=[str(e) for e in raw["env"]], console_logged=console_logged(level, os.environ.get("RUST_LOG")))
    data = read_krun_config(root)
    config = parse_krun_config(data) if data is not None else None
    kernel_env = dict(KERNEL_ENV)
    if workdir:
        kernel_env["KRUN_WORKDIR"] = str(workdir)
    env = init_env(config.env if config else [], kernel_env)
    argv = (config.argv if config else None) or [DEFAULT_INIT]
    rust_log = [v for k, v in (config.env if config else []) if k == "RUST_LOG"]  # the VMM's env: the container's
    return GuestSpec(vcpus=int(raw["vcpus"]), ram_mib=int(raw["ram_mib"]), root=root,
                     workdir=str(workdir or (config.workdir if config else None) or "/"),
                     exec_path=argv[0], argv=argv[1:], env=[f"{k}={v}" for k, v in env.items()],
                     hostname=env.get("HOSTNAME") or "localhost",
                     console_logged=console_logged(level, rust_log[-1] if rust_log else None))


# -- serving --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """What the host side takes from the bundle's ``config.json``."""

    netns: str | None  # the container's network namespace (None: crun's own, it creates none)
    root: tuple[int, int]  # (st_dev, st_ino) of ``root.path``: the peer must have it as its root


def read_bundle(bundle: Path) -> Bundle:
    """The network namespace path and the rootfs identity of the OCI bundle ``bundle``."""
    try:
        data = json.loads(read_config(bundle))
        namespaces = data.get("linux", {}).get("namespaces", [])
        root_path = data["root"]["path"]
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
    return Bundle(netns, (st.st_dev, st.st_ino))


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
        try:
            conn.recv(1)
        except OSError:
            pass
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True).start()


def serve(conn: socket.socket, pid: int) -> None:
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
        spec = guest_spec(raw, pid)
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
    try:
        conn.sendall(struct.pack("i", status))
    except OSError:
        pass  # the container's process is gone; nobody waits for the status


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
            serve(conn, pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
