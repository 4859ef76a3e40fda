"""``agentbox-krun-runtime``: the OCI runtime command line that Podman and conmon call.

Global options (before the command): ``--root DIR`` (state; see
:mod:`agentbox_runtime.oci.container_state`), ``--log FILE``, ``--log-format text|json``, ``--debug``,
``--systemd-cgroup``; others are passed on to runc. Commands:

- ``create [--bundle DIR] [--pid-file FILE] [--console-socket SOCK] ID``: for a krun
  container (``run.oci.handler=krun``) it writes ``/.krun_config.json`` into the rootfs
  (:mod:`agentbox_runtime.oci.krun_config`) and checks the ``krun.disk.*`` images
  (:mod:`agentbox_runtime.oci.krun_disks`), as crun's krun handler does when it creates the
  container, then starts the container process, the shim (:mod:`agentbox_runtime.oci.shim`),
  which waits for ``start``; any other bundle is handed to ``runc`` with the very same arguments;
- ``start ID``, ``state ID``, ``kill [--all] ID [SIGNAL]``, ``delete [--force] ID``;
- ``features``, ``--version``.

A command naming a container this runtime did not create goes to runc; state under a
``--root`` someone else could write is refused, never acted on
(:mod:`agentbox_runtime.oci.state_trust`). Errors are one line on stderr (and in ``--log``,
as JSON with ``--log-format json``, which is where Podman reads them), exit status 1.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agentbox_runtime.errors import AgentboxError, one_line
from agentbox_runtime.oci import bundle as oci_bundle
from agentbox_runtime.oci import krun_config, krun_disks
from agentbox_runtime.oci.container_state import CONTAINER_ID, ContainerState, StateError, StateStore
from agentbox_runtime.retry import retry

VERSION = "0.1.0"
VALUED = {"--root", "--log", "--log-format", "--log-level", "--criu", "--cgroup-manager"}
READY_TIMEOUT_S = 30.0
DELETE_TIMEOUT_S = 10.0


@dataclass
class Globals:
    root: Path | None = None
    log: str | None = None
    log_format: str = "text"


def split_globals(argv: list[str]) -> tuple[Globals, list[str]]:
    """The global options and the command with its arguments."""
    g = Globals()
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-v", "--version", "-h", "--help"):
        name, eq, value = argv[i].partition("=")
        if name in VALUED and not eq:
            i += 1
            value = argv[i] if i < len(argv) else ""
        if name == "--root":
            g.root = Path(value)
        elif name == "--log":
            g.log = value
        elif name == "--log-format":
            g.log_format = value
        i += 1
    return g, argv[i:]


class RuntimeFailure(AgentboxError):
    """A command failed; the message is its one line."""


def report(g: Globals, message: str) -> None:
    """The error on stderr and in the ``--log`` file (JSON lines with ``--log-format json``)."""
    message = one_line(message)
    line = f"agentbox-krun-runtime: {message}"
    print(line, file=sys.stderr, flush=True)
    if g.log:
        try:
            with open(g.log, "a") as f:
                if g.log_format == "json":
                    f.write(json.dumps({"level": "error", "msg": message,
                                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
                else:
                    f.write(line + "\n")
        except OSError:
            pass


def to_runc(original: list[str]) -> int:
    """Hand the whole command to runc (never returns on success)."""
    try:
        os.execvp("runc", ["runc", *original])
    except OSError as exc:
        raise RuntimeFailure(f"this container is not a krun container and runc cannot run: {exc.strerror}") from None


def send_console(console_socket: str, master: int) -> None:
    """Pass the pty master to conmon over ``--console-socket`` (SCM_RIGHTS), as runc does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(console_socket)
        s.sendmsg([b"/dev/ptmx"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [master]))])


def create(g: Globals, args: list[str], original: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agentbox-krun-runtime create")
    p.add_argument("--bundle", "-b", default=".")
    p.add_argument("--pid-file")
    p.add_argument("--console-socket")
    p.add_argument("id")
    ns, _ = p.parse_known_args(args)
    b = oci_bundle.load(ns.bundle)
    if not b.is_krun:
        return to_runc(original)
    if b.terminal and not ns.console_socket:
        raise RuntimeFailure("process.terminal is set but no --console-socket was given")
    krun_config.write(b.rootfs, b.raw)
    krun_disks.checked(b)
    store = StateStore(g.root)
    state = store.create(ns.id, b.path, b.rootfs, b.annotations)
    try:
        pid = _start_shim(state, b, ns.console_socket)
    except BaseException:
        state.remove()
        raise
    if ns.pid_file:
        tmp = f"{ns.pid_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(pid))
        os.replace(tmp, ns.pid_file)
    return 0


def _start_shim(state: ContainerState, b: oci_bundle.Bundle, console_socket: str | None) -> int:
    ready_r, ready_w = os.pipe()
    stdio: int | None = None
    if b.terminal:
        assert console_socket is not None
        master, stdio = pty.openpty()
        send_console(console_socket, master)
        os.close(master)
    argv = [sys.executable, "-m", "agentbox_runtime.oci.shim", "--state-dir", str(state.dir), "--bundle", str(b.path),
            "--ready-fd", str(ready_w)] + (["--tty"] if b.terminal else [])
    try:
        proc = subprocess.Popen(argv, stdin=stdio, stdout=stdio, stderr=stdio, pass_fds=(ready_w,),
                                start_new_session=True, cwd="/")
    finally:
        os.close(ready_w)
        if stdio is not None:
            os.close(stdio)
    with os.fdopen(ready_r) as ready:
        answer = _read_ready(ready.fileno(), proc)
    if answer != "ok":
        proc.wait(5)
        raise RuntimeFailure(answer.removeprefix("error: ") or f"the container process exited ({proc.returncode}) "
                             "before it was ready")
    state.set_pid(proc.pid)
    return proc.pid


def _read_ready(fd: int, proc: subprocess.Popen[bytes]) -> str:
    chunks: list[bytes] = []

    def done(last_try: bool) -> bool:
        readable, _, _ = select.select([fd], [], [], 0.05)
        if readable:
            data = os.read(fd, 4096)
            if not data:
                return True
            chunks.append(data)
            return b"".join(chunks) == b"ok"
        if last_try:
            proc.kill()
            raise RuntimeFailure(f"the container process did not get ready within {READY_TIMEOUT_S:.0f}s")
        return False

    retry(done, timeout=READY_TIMEOUT_S, interval=0.0)
    return b"".join(chunks).decode(errors="replace")


def _ours(g: Globals, container_id: str) -> ContainerState | None:
    return StateStore(g.root).get(container_id)


def start(g: Globals, args: list[str], original: list[str]) -> int:
    container_id = _one_id(args, "start")
    state = _ours(g, container_id)
    if state is None:
        return to_runc(original)
    status = state.status()
    if status != "created":
        raise RuntimeFailure(f"cannot start container {container_id}: it is {status}, not created")
    try:
        fd = os.open(state.fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise RuntimeFailure(f"cannot start container {container_id}: its process is not waiting "
                             f"({exc.strerror})") from None
    try:
        os.write(fd, b"s")
    finally:
        os.close(fd)
    return 0


def state_cmd(g: Globals, args: list[str], original: list[str]) -> int:
    container_id = _one_id(args, "state")
    state = _ours(g, container_id)
    if state is None:
        return to_runc(original)
    print(json.dumps(state.oci_state(), indent=2))
    return 0


def parse_signal(text: str) -> int:
    """``15``, ``TERM`` or ``SIGTERM``."""
    if text.isdigit():
        return int(text)
    name = text.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise RuntimeFailure(f"unknown signal {text!r}; accepted: a number or a name like TERM or SIGKILL") from None


def kill(g: Globals, args: list[str], original: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agentbox-krun-runtime kill")
    p.add_argument("--all", "-a", action="store_true")
    p.add_argument("id")
    p.add_argument("signal", nargs="?", default="SIGTERM")
    ns, _ = p.parse_known_args(args)
    state = _ours(g, ns.id)
    if state is None:
        return to_runc(original)
    state.send_signal(parse_signal(ns.signal))
    return 0


def delete(g: Globals, args: list[str], original: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agentbox-krun-runtime delete")
    p.add_argument("--force", "-f", action="store_true")
    p.add_argument("id")
    ns, _ = p.parse_known_args(args)
    state = _ours(g, ns.id)
    if state is None:
        return to_runc(original)
    if state.alive():
        if not ns.force:
            raise RuntimeFailure(f"cannot delete container {ns.id}: it is {state.status()}; use --force")
        with contextlib.suppress(StateError):  # it stopped on its own since
            state.send_signal(signal.SIGKILL)
        retry(lambda last: not state.alive(), timeout=DELETE_TIMEOUT_S, interval=0.05,
              describe=lambda: f"container {ns.id} (pid {state.pid}) survived SIGKILL")
    state.remove()
    return 0


def features() -> int:
    print(json.dumps({"ociVersionMin": "1.0.0", "ociVersionMax": "1.0.2",
                      "annotations": {"run.oci.handler": "krun"}}, indent=2))
    return 0


def _one_id(args: list[str], command: str) -> str:
    ids = [a for a in args if not a.startswith("-")]
    if len(ids) != 1:
        raise RuntimeFailure(f"{command} takes exactly one container id, got {args}")
    return ids[0]


COMMANDS = {"create": create, "start": start, "state": state_cmd, "kill": kill, "delete": delete}


def main(argv: list[str] | None = None) -> int:
    original = list(sys.argv[1:] if argv is None else argv)
    g, rest = split_globals(original)
    if not rest or rest[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if rest else 2
    command, args = rest[0], rest[1:]
    if command in ("-v", "--version", "version"):
        print(f"agentbox-krun-runtime version {VERSION}\nspec: 1.0.2\nboots krun containers with qemu; "
              "others go to runc")
        return 0
    if command == "features":
        return features()
    try:
        if command not in COMMANDS:
            ids = [a for a in args if not a.startswith("-") and CONTAINER_ID.fullmatch(a)]
            if ids and _ours(g, ids[-1]) is not None:
                raise RuntimeFailure(f"'{command}' is not supported for krun guest {ids[-1]}: its processes run inside "
                                     "the VM; supported: create, start, state, kill, delete")
            return to_runc(original)
        return COMMANDS[command](g, args, original)
    except AgentboxError as exc:
        report(g, str(exc))
        return 1
    except OSError as exc:  # a file or directory the runtime was pointed at: one line, not a traceback
        report(g, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
