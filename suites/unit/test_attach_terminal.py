"""``agentbox attach`` keeps typeahead and follows the host terminal's size (issue 26), run against the
real agent on this host: the protocol's window-size bounds, ``pty_resize`` reaching the foreground
program as SIGWINCH, typeahead through the relay, and the ``agentbox attach`` client itself in pexpect
(the same session the VM tier runs on real guests, :mod:`suites.attach_terminal`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbox_guest_init.protocol import WINSIZE_MAX, winsize
from agentbox_runtime import guest_registry
from agentbox_runtime.channel import AgentClient, ChannelError, PtyRelay
from suites.attach_terminal import FIRST_SIZE, attach_session, type_ahead_and_resize
from suites.unit.test_channel import AGENT, REPO, agent_env

pexpect = pytest.importorskip("pexpect")
from pexpect import fdpexpect  # noqa: E402

SERVE_ON_UNIX_SOCKET = """
import socket, sys
from agentbox_guest_init import agent
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(1)
conn, _ = listener.accept()
agent.serve_connection(conn)
"""
"""The agent serving one attach connection on a unix socket, as a qemu guest's attach port does."""


@pytest.mark.parametrize("rows, cols", [(1, 1), (WINSIZE_MAX, WINSIZE_MAX), (40, 120)])
def test_window_sizes_in_range_are_accepted(rows: int, cols: int) -> None:
    assert winsize(rows, cols) == (rows, cols)


@pytest.mark.parametrize("rows, cols, named", [
    (0, 80, "rows"), (-1, 80, "rows"), (WINSIZE_MAX + 1, 80, "rows"), (24, 1 << 32, "cols"), (24, 0, "cols"),
    (True, 80, "rows"), ("40", 80, "rows"), (40.0, 80, "rows"), (None, 80, "rows"), (24, [80], "cols"),
])
def test_absurd_window_sizes_are_refused_naming_the_field(rows: object, cols: object, named: str) -> None:
    with pytest.raises(ValueError, match=f"^pty window {named} must be an integer from 1 to {WINSIZE_MAX}, got "):
        winsize(rows, cols)


@pytest.fixture()
def agent() -> Iterator[AgentClient]:
    """The real agent over its stdin/stdout pipes (running as root here, so ``user="root"`` spawns)."""
    proc = subprocess.Popen(AGENT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=agent_env(), cwd=REPO)
    try:
        yield AgentClient.over_process(proc)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_the_agent_refuses_absurd_sizes_and_the_session_keeps_its_own(agent: AgentClient) -> None:
    with pytest.raises(ChannelError, match="pty window rows must be an integer from 1 to 4096, got 0$"):
        agent.pty_spawn(["sh"], user="root", rows=0, cols=80)
    pty = agent.pty_spawn(["sh", "-c", "read x; stty size"], user="root", rows=33, cols=101)
    relay = PtyRelay(agent, pty)
    try:
        with pytest.raises(ChannelError, match="pty window cols must be an integer from 1 to 4096, got 100000$"):
            agent.pty_resize(pty, 40, 100_000)
        with pytest.raises(ChannelError, match="pty window rows must be an integer from 1 to 4096, got -3$"):
            agent.pty_resize(pty, -3, 80)
        child = fdpexpect.fdspawn(relay.local.fileno(), timeout=20, encoding="utf-8")
        child.sendline("")
        child.expect(r"\r\n33 101\r\n")
    finally:
        relay.close()


def test_a_relayed_shell_keeps_typeahead_and_follows_setwinsize(agent: AgentClient) -> None:
    """The harness's ``shell()`` path (:func:`agentbox_harness.backends.agent_shell`): bash on a guest pty
    through :class:`PtyRelay`, typed to before it printed anything, resized with ``setwinsize``."""
    pty = agent.pty_spawn(["bash", "--norc", "-i"], user="root", env={"PS1": "P$ "}, rows=FIRST_SIZE[0],
                          cols=FIRST_SIZE[1])
    relay = PtyRelay(agent, pty)
    child = fdpexpect.fdspawn(relay.local.fileno(), timeout=20, encoding="utf-8")
    child.setwinsize = relay.setwinsize
    try:
        type_ahead_and_resize(child)
        child.expect(pexpect.EOF)
    finally:
        relay.close()
    assert relay.exit_status == 0 and relay.error is None


@pytest.fixture()
def attach_guest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, dict[str, str]]]:
    """A guest record whose attach socket is served by the real agent on this host: its id and the
    environment an ``agentbox`` subprocess finds the record in."""
    for name in ("state", "cfg"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("AGENTBOX_CONFIG", raising=False)
    sock = tmp_path / "attach.sock"
    server = subprocess.Popen([sys.executable, "-c", SERVE_ON_UNIX_SOCKET, str(sock)], env=agent_env(), cwd=REPO)
    record = guest_registry.GuestRecord(guest_registry.new_id("qemu"), "qemu", "test_attach", attach_socket=str(sock))
    guest_registry.save(record)
    try:
        yield record.id, {**os.environ, "PYTHONPATH": str(REPO)}
    finally:
        server.kill()
        server.wait(timeout=30)


def test_agentbox_attach_keeps_typeahead_and_follows_resizes(attach_guest: tuple[str, dict[str, str]],
                                                             tmp_path: Path) -> None:
    """What is typed before the shell's prompt appears reaches it in order (the terminal goes raw
    without a flush); the guest pty starts at the terminal's size and follows ``setwinsize``."""
    guest_id, env = attach_guest
    attach_session(guest_id, tmp_path / "session.log", timeout=30, env=env, root=True)
