"""The prep status-file protocol (7.4) and the waits (7.5, 7.6)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agentbox_guest_init import prep
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.status import Status, StatusFile, escape, pid_alive, unescape

REPO = Path(__file__).resolve().parents[3]


def sf(tmp_path: Path) -> StatusFile:
    return StatusFile(tmp_path / "nix-prep.status", "nix prep")


def test_missing_file_is_not_started(tmp_path: Path) -> None:
    assert sf(tmp_path).read() == Status()


def test_parse_ignores_unknown_keys_and_lines_without_equals(tmp_path: Path) -> None:
    s = sf(tmp_path)
    s.path.write_text("garbage\nstate=running\npid=42\nfuture=1\nlog_path=/x.log\nerror=a\\nb\\\\c\n")
    assert s.read() == Status("running", 42, None, None, "/x.log", "a\nb\\c")


def test_unknown_state_is_an_error(tmp_path: Path) -> None:
    s = sf(tmp_path)
    s.path.write_text("state=sleeping\n")
    with pytest.raises(GuestError, match="^unknown nix prep state 'sleeping'$"):
        s.read()


@pytest.mark.parametrize("text", ["", "plain", "a\nb", "back\\slash", "\\n literally", "end\\"])
def test_escape_round_trip(text: str) -> None:
    assert "\n" not in escape(text)
    assert unescape(escape(text)) == text


def test_legal_lifecycle_and_file_format(tmp_path: Path) -> None:
    s = sf(tmp_path)
    assert s.write_running_unless_terminal(42, "/run/agentbox/nix-prep.log")
    s.mark_failed_for_pid(42, "disk\nmissing")
    lines = s.path.read_text().splitlines()
    assert lines[0] == "state=failed" and "pid=42" in lines and "log_path=/run/agentbox/nix-prep.log" in lines
    assert "error=disk\\nmissing" in lines
    assert any(line.startswith("started_at=") for line in lines)
    assert any(line.startswith("finished_at=") for line in lines)
    assert not s.lock_path.exists()


def test_terminal_states_are_not_overwritten(tmp_path: Path) -> None:
    s = sf(tmp_path)
    s.write_running_unless_terminal(42, None)
    s.mark_ready_for_pid(42)
    assert s.write_running_unless_terminal(43, None) is False
    assert s.read().state == "ready"


def test_finish_requires_running_with_that_pid(tmp_path: Path) -> None:
    s = sf(tmp_path)
    with pytest.raises(GuestError, match=r"^nix prep status at .* is no longer running for pid 7 "
                                         r"\(state=not-started pid=None\)$"):
        s.mark_ready_for_pid(7)
    s.write_running_unless_terminal(8, None)
    with pytest.raises(GuestError, match=r"no longer running for pid 7 \(state=running pid=8\)"):
        s.mark_failed_for_pid(7, "x")
    s.mark_ready_for_pid(8)
    with pytest.raises(GuestError, match=r"no longer running for pid 8 \(state=ready pid=8\)"):
        s.mark_failed_for_pid(8, "late")


def test_illegal_transition_wording(tmp_path: Path) -> None:
    s = StatusFile(tmp_path / "podman-prep.status", "Podman prep")
    with pytest.raises(GuestError, match="^illegal Podman prep status transition from not-started to ready$"):
        s._locked(lambda cur: s._transition(cur, Status("ready")))


def test_lock_timeout_names_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentbox_guest_init import status

    s = sf(tmp_path)
    s.lock_path.write_text("")
    monkeypatch.setattr(status, "LOCK_TIMEOUT_S", 0.1)
    with pytest.raises(GuestError, match=f"^timed out waiting for nix prep status lock {s.lock_path}$"):
        s.write_running_unless_terminal(1, None)
    assert s.read().state == "not-started"


def test_lock_contention_between_two_real_processes(tmp_path: Path) -> None:
    """One process holds the lock 0.5 s; the other's write waits for it and then succeeds."""
    s = sf(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        fd = os.open({str(s.lock_path)!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        print("held", flush=True)
        time.sleep(0.5)
        with open({str(s.path)!r}, "w") as f:
            f.write("state=running\\npid=4242\\n")
        os.unlink({str(s.lock_path)!r})
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        writer = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            from pathlib import Path
            from agentbox_guest_init.status import StatusFile
            s = StatusFile(Path({str(s.path)!r}), "nix prep")
            s.mark_ready_for_pid(4242)
            print(s.read().state)
        """)], cwd=REPO, capture_output=True, text=True, timeout=30)
    finally:
        holder.wait(timeout=30)
    assert writer.returncode == 0, writer.stderr
    assert writer.stdout.strip() == "ready"  # it saw the holder's running status: it waited for the lock


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not pid_alive(proc.pid)


def kind(tmp_path: Path, name: str = "nix") -> tuple[prep.PrepKind, StatusFile]:
    k = prep.KINDS[name]
    return k, k.status(tmp_path)


def test_wait_reports_not_started(tmp_path: Path) -> None:
    k, _ = kind(tmp_path)
    with pytest.raises(GuestError, match="^libkrun /nix overlay prep has not started; "
                                         "missing status at /run/agentbox/nix-prep.status$"):
        prep.wait(k, 5, root=tmp_path)


def test_wait_reports_failure_with_error_and_log(tmp_path: Path) -> None:
    k, s = kind(tmp_path, "podman")
    s.write_running_unless_terminal(9, "/run/agentbox/podman-prep.log")
    s.mark_failed_for_pid(9, "no tun")
    with pytest.raises(GuestError, match="^rootless Podman prep failed: no tun; status=/run/agentbox/podman-prep.status; "
                                         "log=/run/agentbox/podman-prep.log$"):
        prep.wait(k, 5, root=tmp_path)


def test_wait_reports_unknown_error_when_none_recorded(tmp_path: Path) -> None:
    k, s = kind(tmp_path)
    s.path.parent.mkdir(parents=True, exist_ok=True)
    s.path.write_text("state=failed\n")
    with pytest.raises(GuestError, match="^libkrun /nix overlay prep failed: unknown error;"):
        prep.wait(k, 5, root=tmp_path)


def test_wait_detects_a_dead_pid(tmp_path: Path) -> None:
    k, s = kind(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    s.write_running_unless_terminal(dead.pid, None)
    with pytest.raises(GuestError, match=f"^libkrun /nix overlay prep has stale/dead PID {dead.pid}; "
                                         "status=/run/agentbox/nix-prep.status; log=/run/agentbox/nix-prep.log$"):
        prep.wait(k, 30, root=tmp_path)


def test_wait_times_out_on_a_live_running_prep(tmp_path: Path) -> None:
    k, s = kind(tmp_path, "podman")
    s.write_running_unless_terminal(os.getpid(), None)
    with pytest.raises(GuestError, match="^timed out after 0.3s waiting for rootless Podman prep at "
                                         r"/run/agentbox/podman-prep.status \(state=running; log="):
        prep.wait(k, 0.3, root=tmp_path)


def test_nix_wait_needs_a_unix_socket(tmp_path: Path) -> None:
    k, s = kind(tmp_path)
    s.write_running_unless_terminal(os.getpid(), None)
    s.mark_ready_for_pid(os.getpid())
    sock_path = tmp_path / "nix/var/nix/daemon-socket/socket"
    sock_path.parent.mkdir(parents=True)
    sock_path.write_text("not a socket")
    with pytest.raises(GuestError, match=r"^timed out after 0.3s waiting for libkrun nix-daemon Unix socket at "
                                         r"/nix/var/nix/daemon-socket/socket \(observed=regular-file\); status="):
        prep.wait(k, 0.3, root=tmp_path, socket="/nix/var/nix/daemon-socket/socket")
    sock_path.unlink()
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(sock_path))  # a socket file with no daemon behind it: what an earlier boot leaves
        with pytest.raises(GuestError, match=r"\(observed=a socket refusing connections\)"):
            prep.wait(k, 0.3, root=tmp_path, socket="/nix/var/nix/daemon-socket/socket")
        srv.listen()
        prep.wait(k, 5, root=tmp_path, socket="/nix/var/nix/daemon-socket/socket")


@pytest.mark.parametrize("make,observed", [(lambda p: None, "missing"), (lambda p: p.mkdir(), "directory"),
                                           (lambda p: p.symlink_to("/nowhere"), "symlink"),
                                           (lambda p: os.mkfifo(p), "non-socket")])
def test_socket_state_names(tmp_path: Path, make, observed: str) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "s"
    make(p)
    assert prep.socket_state(p) == observed


def test_worker_and_parent_handshake_with_real_processes(tmp_path: Path) -> None:
    """start_background spawns a worker that waits for the parent's running(pid), then marks ready."""
    worker = textwrap.dedent(f"""
        from pathlib import Path
        from agentbox_guest_init import prep
        raise SystemExit(prep.run_worker(prep.NIX, lambda: print("steps ran", flush=True), root=Path({str(tmp_path)!r})))
    """)
    k, s = kind(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    pid = prep.start_background(k, root=tmp_path, argv=[sys.executable, "-c", worker], env=env, euid=0)
    assert pid is not None
    deadline = time.monotonic() + 30
    while s.read().state == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.read().state == "ready" and s.read().pid == pid
    assert "steps ran" in (tmp_path / "run/agentbox/nix-prep.log").read_text()
    # idempotent: a terminal status starts nothing
    assert prep.start_background(k, root=tmp_path, argv=["false"], env=env, euid=0) is None


def test_worker_failure_is_recorded_with_its_chain(tmp_path: Path) -> None:
    k, s = kind(tmp_path, "podman")

    def steps() -> None:
        try:
            raise OSError("device busy")
        except OSError as exc:
            raise GuestError("failed to mount libkrun container storage btrfs disk") from exc

    assert prep.run_worker(k, steps, root=tmp_path, env={}) == 1
    st = s.read()
    assert st.state == "failed" and st.pid == os.getpid()
    assert st.error == "failed to mount libkrun container storage btrfs disk: device busy"


def test_parent_must_be_root(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="^rootless Podman root prep must start as root$"):
        prep.start_background(prep.PODMAN, root=tmp_path, euid=1000)
    with pytest.raises(GuestError, match="^libkrun /nix overlay prep must start as root$"):
        prep.start_background(prep.NIX, root=tmp_path, euid=1000)


def test_worker_without_parent_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prep, "PARENT_PUBLISH_TIMEOUT_S", 0.1)
    k, _ = kind(tmp_path)
    with pytest.raises(GuestError, match=f"^timed out waiting for parent to publish nix prep running status "
                                         f"for pid {os.getpid()}$"):
        prep.run_worker(k, lambda: None, root=tmp_path, env={k.wait_env: "1"})
