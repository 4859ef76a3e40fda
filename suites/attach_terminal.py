"""One interactive terminal session, shared by the attach tests of every tier (issue 26).

:func:`type_ahead_and_resize` drives an ``agentbox attach`` (or any shell on a relayed guest pty)
spawned in pexpect with :data:`FIRST_SIZE`: it types two commands at once, before any prompt,
then resizes the host side twice. Each expected output is computed by the shell
(``$((6*7))``), so the echo of what was typed can never match it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

FIRST_SIZE = (30, 90)
"""The window the session starts with (``pexpect.spawn(..., dimensions=FIRST_SIZE)``)."""
TYPED_AHEAD = "echo typed-$((6*7)); stty size\necho second-$((1+1))\n"
"""Two lines typed before the guest's prompt appears: the first also prints the starting size."""
WAIT_FOR_WINCH = ("python3 -c 'import os, signal; signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGWINCH]); "
                  "print(\"waiting\" + \"-for-winch\", flush=True); signal.sigwait([signal.SIGWINCH]); "
                  "print(\"winch\", *reversed(os.get_terminal_size()))'")
"""A foreground program that waits for SIGWINCH and prints ``winch ROWS COLS`` (the size it then sees)."""


def type_ahead_and_resize(child: Any) -> None:
    """Type :data:`TYPED_AHEAD` before reading anything, see both outputs in order with the starting
    size; ``setwinsize(40, 120)`` and read ``stty size``; then resize to 50x132 while a foreground
    program waits for SIGWINCH, which must reach it with the new size; finally ``exit``."""
    child.send(TYPED_AHEAD)
    child.expect(rf"typed-42\r\n{FIRST_SIZE[0]} {FIRST_SIZE[1]}\r\n")
    child.expect(r"second-2\r\n")
    child.setwinsize(40, 120)
    child.sendline("stty size")
    child.expect(r"(?<![0-9])40 120\r\n")
    child.sendline(WAIT_FOR_WINCH)
    child.expect("waiting-for-winch")
    child.setwinsize(50, 132)
    child.expect(r"winch 50 132\r\n")
    child.sendline("stty size; exit")
    child.expect(r"(?<![0-9])50 132\r\n")


def attach_session(guest_id: str, log: Path, *, timeout: float, env: dict[str, str] | None = None,
                   root: bool = False) -> None:
    """``agentbox attach GUEST_ID [--root]`` in pexpect at :data:`FIRST_SIZE`, through
    :func:`type_ahead_and_resize` to its exit (status 0); what it printed goes to ``log``."""
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "agentbox_runtime.cli", "attach", guest_id, *(["--root"] if root else [])],
                          env=env, cwd=str(REPO), dimensions=FIRST_SIZE, timeout=timeout, encoding="utf-8",
                          codec_errors="replace")
    with open(log, "w") as child.logfile_read:
        try:
            type_ahead_and_resize(child)
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
    assert child.exitstatus == 0, f"agentbox attach exited {child.exitstatus}: {log.read_text()[-2000:]}"
