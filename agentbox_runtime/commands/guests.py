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
from pathlib import Path

from agentbox_runtime import guest_registry
from agentbox_runtime.channel import AgentClient, ChannelError, GuestAuthError
from agentbox_runtime.errors import AgentboxError, InputError
from agentbox_runtime.images.commit import image_user
from agentbox_runtime.podman import Podman, container_running
from agentbox_runtime.microvm.image_cache import remove_tree
from agentbox_runtime.vmm.shutdown import stop_process

ATTACH_CONNECT_S = 10.0
CONTAINER_CHECK_S = 30.0
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
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + row[4])
    return 0


def _terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
        return size.lines, size.columns
    except OSError:
        return 24, 80


def _relay(agent: AgentClient, pty: int) -> int:
    """Copy the local terminal to the guest pty and back until the shell exits; its exit status."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    resized = [True]
    signal.signal(signal.SIGWINCH, lambda *_: resized.__setitem__(0, True))
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    if saved is not None:
        tty.setraw(stdin)
    try:
        while True:
            ready, _, _ = select.select([stdin], [], [], 0)
            data = os.read(stdin, 65536) if ready else b""
            rows, cols = _terminal_size() if resized[0] else (None, None)
            resized[0] = False
            out, status = agent.pty_io(pty, data, wait_s=POLL_S, rows=rows, cols=cols)
            if out:
                os.write(stdout, out)
            if status is not None:
                return status
            if ready and not data:  # the local side closed: end the guest shell
                agent.pty_close(pty)
                return 0
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _require_live_container(rec: guest_registry.GuestRecord) -> None:
    """A krun-podman record has no VMM pid to check: its guest lives only while its container runs.
    Once the container is gone its published 127.0.0.1 port is anyone's, so attach refuses."""
    if not rec.container:
        raise AgentboxError(f"guest {rec.id} (krun-podman) names no container; `agentbox rm {rec.id}` "
                            "removes its record")
    if not container_running(Podman(timeout_s=CONTAINER_CHECK_S), rec.container):
        raise AgentboxError(f"guest {rec.id}: its container {rec.container} is not running any more, so "
                            f"its attach port is not its own; refusing to attach (`agentbox rm {rec.id}` "
                            "removes the record)")


def attach(guest_id: str, root: bool) -> int:
    rec = guest_registry.find(guest_id)
    if rec.status() == "stopped":
        raise AgentboxError(f"guest {rec.id} is not running any more; `agentbox rm {rec.id}` removes its record")
    if rec.backend == "container":
        assert rec.container is not None
        image = image_user(rec.container, kind="container")
        user = "0" if root else f"{image.uid}:{image.gid}"
        env = [] if root else [a for k, v in image.exec_env().items() for a in ("--env", f"{k}={v}")]
        os.execvp("podman", ["podman", "exec", "-it", "--user", user, *env, "--workdir", image.workdir,
                             rec.container, "bash", "-l"])
    if rec.backend == "krun-podman":
        _require_live_container(rec)
    try:
        if rec.attach_socket is not None:
            agent = AgentClient.connect_unix(rec.attach_socket, ATTACH_CONNECT_S)
        elif rec.attach_tcp is not None and rec.attach_token:
            agent = AgentClient.connect_tcp("127.0.0.1", rec.attach_tcp, rec.attach_token, ATTACH_CONNECT_S)
        else:
            raise AgentboxError(f"guest {rec.id} ({rec.backend}) has no attach channel")
    except GuestAuthError as exc:  # someone else answers on the guest's port: nothing was sent to it
        raise AgentboxError(str(exc)) from None
    except (ChannelError, OSError) as exc:
        raise AgentboxError(f"cannot reach guest {rec.id}: {exc}") from None
    rows, cols = _terminal_size()
    try:
        pty = agent.pty_spawn(["bash", "-l"], user="root" if root else None,  # the agent's default: the image user
                              env={"TERM": os.environ.get("TERM", "xterm")}, rows=rows, cols=cols)
        return _relay(agent, pty)
    except ChannelError as exc:
        raise AgentboxError(f"guest {rec.id}: {exc}") from None
    finally:
        agent.close()


def _stop_vmm(rec: guest_registry.GuestRecord) -> None:
    """The one shutdown ladder for a VMM that is not our child (:func:`agentbox_runtime.vmm.shutdown.stop_process`):
    SIGTERM (qemu quits), then SIGKILL after STOP_S, only while the pid is still the recorded VMM."""
    assert rec.pid is not None
    try:
        stop_process(rec.pid, rec.pid_start, term_s=STOP_S, kill_s=STOP_S)
    except AgentboxError:
        raise AgentboxError(f"guest {rec.id}: its VMM (pid {rec.pid}) survived SIGKILL") from None


def rm(guest_id: str) -> int:
    rec = guest_registry.find(guest_id)
    if rec.status() == "running":
        raise InputError(f"guest {rec.id} belongs to a test that is still running (pid {rec.owner}); "
                         "accepted: a preserved or stopped guest")
    for name in dict.fromkeys([*([rec.container] if rec.container else []), *rec.containers]):
        Podman(timeout_s=120).capture(["rm", "-f", "-t", "0", name])
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
