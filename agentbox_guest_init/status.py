"""The prep status-file protocol shared by nix and Podman prep (reference 7.4).

A ``key=value`` text file; a missing file means ``not-started``. Only the
transitions not-started→running, running→ready and running→failed are
legal. Writers hold ``<status>.lock`` (created with O_EXCL, retried every
20 ms for up to 5 s). Waiters detect a running prep whose pid is dead.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from agentbox_guest_init.errors import GuestError

STATES = ("not-started", "running", "ready", "failed")
LEGAL = {("not-started", "running"), ("running", "ready"), ("running", "failed")}
LOCK_RETRY_S, LOCK_TIMEOUT_S = 0.02, 5.0


@dataclass(frozen=True)
class Status:
    """The fields of a status file (a missing file reads as ``not-started``)."""

    state: str = "not-started"
    pid: int | None = None
    started_at: int | None = None
    finished_at: int | None = None
    log_path: str | None = None
    error: str | None = None


def escape(text: str) -> str:
    """Escape ``\\`` and newlines so an error fits on one ``error=`` line."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def unescape(text: str) -> str:
    """The inverse of :func:`escape`."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append("\n" if text[i + 1] == "n" else text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def pid_alive(pid: int) -> bool:
    """``kill(pid, 0)`` succeeds or fails with EPERM."""
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


class StatusFile:
    """One prep's status file, with the wording of ``what`` (``nix prep`` / ``Podman prep``)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what
        self.lock_path = Path(f"{path}.lock")

    def read(self) -> Status:
        """The current status; unknown keys and lines without ``=`` are ignored."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return Status()
        fields: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip()] = value
        state = fields.get("state", "not-started")
        if state not in STATES:
            raise GuestError(f"unknown {self.what} state '{state}'")

        def num(k: str) -> int | None:
            v = fields.get(k, "")
            return int(v) if v.isdigit() else None

        return Status(state, num("pid"), num("started_at"), num("finished_at"),
                      fields.get("log_path") or None,
                      unescape(fields["error"]) if "error" in fields else None)

    def _write(self, status: Status) -> None:
        lines = [f"state={status.state}"]
        for key in ("pid", "started_at", "finished_at", "log_path"):
            value = getattr(status, key)
            if value is not None:
                lines.append(f"{key}={value}")
        if status.error is not None:
            lines.append(f"error={escape(status.error)}")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.path)

    def _locked(self, action: Callable[[Status], Status | None]) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.close(fd)
                break
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise GuestError(f"timed out waiting for {self.what} status lock {self.lock_path}") from None
                time.sleep(LOCK_RETRY_S)
        try:
            new = action(self.read())
            if new is None:
                return False
            self._write(new)
            return True
        finally:
            self.lock_path.unlink(missing_ok=True)

    def _transition(self, current: Status, new: Status) -> Status:
        if (current.state, new.state) not in LEGAL:
            raise GuestError(f"illegal {self.what} status transition from {current.state} to {new.state}")
        return new

    def write_running_unless_terminal(self, pid: int, log_path: str | None) -> bool:
        """Publish ``running`` for ``pid`` unless the prep is already ready or failed."""
        def act(cur: Status) -> Status | None:
            if cur.state in ("ready", "failed"):
                return None
            if cur.state == "running":
                return replace(cur, pid=pid, log_path=log_path)
            return self._transition(cur, Status("running", pid, int(time.time()), None, log_path))
        return self._locked(act)

    def _finish_for_pid(self, pid: int, state: str, error: str | None) -> None:
        def act(cur: Status) -> Status:
            if cur.state != "running" or cur.pid != pid:
                raise GuestError(f"{self.what} status at {self.path} is no longer running for pid {pid} "
                                 f"(state={cur.state} pid={cur.pid})")
            return self._transition(cur, replace(cur, state=state, finished_at=int(time.time()), error=error))
        self._locked(act)

    def mark_ready_for_pid(self, pid: int) -> None:
        """running(pid) → ready; anything else is an error naming the state found."""
        self._finish_for_pid(pid, "ready", None)

    def mark_failed_for_pid(self, pid: int, error: str) -> None:
        """running(pid) → failed with ``error``; anything else is an error naming the state found."""
        self._finish_for_pid(pid, "failed", error)
