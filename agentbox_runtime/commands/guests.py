"""``agentbox ps``, ``agentbox attach ID [--root]`` and ``agentbox rm ID``: the harness's guests.

``ps`` lists the running and preserved harness guests (:mod:`agentbox_runtime.guest_registry`).
``attach`` opens an interactive shell in a live guest: a pty relayed by the
guest agent over its attach channel (qemu and krun-direct: a unix socket;
krun-podman: a 127.0.0.1 port, only while its container runs, where the guest
must prove it holds the record's token before anything is sent), or
``podman exec -it`` into a container-mode task. ``rm`` stops a guest and deletes what its record lists.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agentbox_guest_init.protocol import WINSIZE_MAX
from agentbox_runtime import guest_registry
from agentbox_runtime.channel import AgentClient, ChannelError, GuestAuthError
from agentbox_runtime.errors import AgentboxError, InputError
from agentbox_runtime.images.commit import image_user
from agentbox_runtime.container import podman_api
from agentbox_runtime.podman import Podman
from agentbox_runtime.microvm.image_cache import remove_tree
from agentbox_runtime.vmm.shutdown import stop

ATTACH_CONNECT_S = 10.0
STOP_S = 10.0
POLL_S = 0.05


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def ps() -> int:
    guest_registry.prune_stale()
    rows = [(r.id, r.backend, r.status(), _age(time.time() - r.created), r.test) for r in guest_registry.records()]
    if not rows:
        print("no harness guests (a test's guests appear while it runs; --preserve-debug keeps a failed test's)")
        return 0
    widths = [max(len(str(row[i])) for row in [("ID", "BACKEND", "STATE", "AGE", "TEST"), *rows]) for i in range(4)]
    for row in [("ID", "BACKEND", "STATE", "AGE", "TEST"), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return 0


class _Window:
    """The local terminal's window size, and whether SIGWINCH said it changed since it was last read."""

    def __init__(self) -> None:
        self.changed = False
        signal.signal(signal.SIGWINCH, self._note)

    def _note(self, _signum: int, _frame: object) -> None:
        self.changed = True

    def size(self) -> tuple[int, int]:
        """Rows and columns of the terminal on stdin (else stdout), within what the guest accepts
        (1 to :data:`WINSIZE_MAX`); 24x80 when neither is a terminal that knows its size."""
        self.changed = False
        for fd in (sys.stdin.fileno(), sys.stdout.fileno()):
            try:
                size = os.get_terminal_size(fd)
            except OSError:
                continue
            if size.lines and size.columns:
                return min(size.lines, WINSIZE_MAX), min(size.columns, WINSIZE_MAX)
        return 24, 80


@contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """The local terminal in raw mode from now until the block ends, keeping what was already typed.

    Keys typed before the guest's pty is open wait in the kernel's input queue of the terminal
    (about 20 KiB on a Linux pty; past that the typist's writes block until the relay reads, nothing
    is dropped) and the relay reads them first, in order. Raw mode is set with TCSANOW:
    ``tty.setraw``'s default, TCSAFLUSH, would discard that queue."""
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    if saved is not None:
        tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _relay(agent: AgentClient, pty: int, window: _Window) -> int:
    """Copy the local terminal to the guest pty and back until the shell exits; its exit status.
    A SIGWINCH sends the terminal's new size (``pty_resize``) before the next input."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    while True:
        ready, _, _ = select.select([stdin], [], [], 0)
        data = os.read(stdin, 65536) if ready else b""
        if window.changed:  # checked after the read: a resize that came before these keys reaches the guest first
            agent.pty_resize(pty, *window.size())
        out, status = agent.pty_io(pty, data, wait_s=POLL_S)
        if out:
            os.write(stdout, out)
        if status is not None:
            return status
        if ready and not data:  # the local side closed: end the guest shell
            agent.pty_close(pty)
            return 0


def _require_live_container(rec: guest_registry.GuestRecord) -> None:
    """A krun-podman record has no VMM pid to check: its guest lives only while its container runs.
    Once the container is gone its published 127.0.0.1 port is anyone's, so attach refuses."""
    if not rec.container:
        raise AgentboxError(f"guest {rec.id} (krun-podman) names no container; `agentbox rm {rec.id}` "
                            "removes its record")
    if not podman_api.container_running(rec.container):
        raise AgentboxError(f"guest {rec.id}: its container {rec.container} is not running any more, so "
                            f"its attach port is not its own; refusing to attach (`agentbox rm {rec.id}` "
                            "removes the record)")


def attach(guest_id: str, root: bool) -> int:
    """``agentbox attach ID [--root]``: a login shell in guest ``ID`` on this terminal, its exit status.

    The terminal goes raw at once and keeps what is typed before the guest's prompt appears (sent
    in order once the guest pty is open); the guest pty starts with the terminal's size and follows
    its resizes."""
    rec = guest_registry.find(guest_id)
    if rec.status() == "stopped":
        raise AgentboxError(f"guest {rec.id} is not running any more; `agentbox rm {rec.id}` removes its record")
    if rec.backend == "container":
        assert rec.container is not None
        image = image_user(rec.container, kind="container")
        user = "0" if root else f"{image.uid}:{image.gid}"
        env = [] if root else [a for k, v in image.exec_env().items() for a in ("--env", f"{k}={v}")]
        return Podman().interactive(["exec", "-it", "--user", user, *env, "--workdir", image.workdir,
                                     rec.container, "bash", "-l"])
    window = _Window()  # from now on a resize is noticed
    with _raw_terminal(sys.stdin.fileno()):  # from now on nothing typed is lost (see _raw_terminal)
        return _attach_agent(rec, root, window)


def _connect(rec: guest_registry.GuestRecord) -> AgentClient:
    """The guest agent's attach channel of ``rec``; AgentboxError when it cannot be reached or proven."""
    if rec.backend == "krun-podman":
        _require_live_container(rec)
    try:
        if rec.attach_socket is not None:
            return AgentClient.connect_unix(rec.attach_socket, ATTACH_CONNECT_S)
        if rec.attach_tcp is not None and rec.attach_token:
            return AgentClient.connect_tcp("127.0.0.1", rec.attach_tcp, rec.attach_token, ATTACH_CONNECT_S)
    except GuestAuthError as exc:  # someone else answers on the guest's port: nothing was sent to it
        raise AgentboxError(str(exc)) from None
    except (ChannelError, OSError) as exc:
        raise AgentboxError(f"cannot reach guest {rec.id}: {exc}") from None
    raise AgentboxError(f"guest {rec.id} ({rec.backend}) has no attach channel")


def _attach_agent(rec: guest_registry.GuestRecord, root: bool, window: _Window) -> int:
    """A login shell on a fresh guest pty of the terminal's size, relayed until it exits."""
    agent = _connect(rec)
    rows, cols = window.size()
    try:
        pty = agent.pty_spawn(["bash", "-l"], user="root" if root else None,  # the agent's default: the image user
                              env={"TERM": os.environ.get("TERM", "xterm")}, rows=rows, cols=cols)
        return _relay(agent, pty, window)
    except ChannelError as exc:
        raise AgentboxError(f"guest {rec.id}: {exc}") from None
    finally:
        agent.close()


def _stop_vmm(rec: guest_registry.GuestRecord) -> None:
    """The one shutdown ladder (:func:`agentbox_runtime.vmm.shutdown.stop`) for a VMM that is not our
    child, within about STOP_S: the guest's own poweroff through its attach channel (a qemu or
    krun-direct guest's lingering agent), then SIGTERM (qemu quits), then SIGKILL, only while the pid
    is still the recorded VMM."""
    assert rec.pid is not None

    def poweroff(budget: float) -> None:
        if rec.attach_socket is None:
            raise OSError("no attach channel to ask the guest to power off")
        agent = AgentClient.connect_unix(rec.attach_socket, budget / 2)
        try:
            agent.shutdown(budget / 2)
        finally:
            agent.close()

    try:
        stop(rec.pid, start=rec.pid_start, timeout=STOP_S, poweroff=poweroff)
    except AgentboxError:
        raise AgentboxError(f"guest {rec.id}: its VMM (pid {rec.pid}) survived SIGKILL") from None


def rm(guest_id: str) -> int:
    rec = guest_registry.find(guest_id)
    if rec.status() == "running":
        raise InputError(f"guest {rec.id} belongs to a test that is still running (pid {rec.owner}); "
                         "accepted: a preserved or stopped guest")
    for name in dict.fromkeys([*([rec.container] if rec.container else []), *rec.containers]):
        podman_api.remove_container(name)  # rm -f -t 0; a Podman that cannot be asked stops rm here
    if rec.pid is not None and rec.vm_alive():
        _stop_vmm(rec)
    for command in rec.cleanup:
        subprocess.run(["sh", "-c", command], capture_output=True, timeout=300)
    for path in rec.paths:
        remove_tree(Path(path))
    guest_registry.forget(rec.id)
    print(f"removed guest {rec.id}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch ``ps``, ``attach`` and ``rm``."""
    if args.subcommand == "ps":
        return ps()
    if args.subcommand == "attach":
        return attach(args.guest_id, bool(args.root))
    return rm(args.guest_id)
