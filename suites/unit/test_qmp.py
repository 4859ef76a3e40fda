"""The QMP client against qemu itself (``-S``, nothing booted): every reply is checked."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbox_runtime.retry import retry
from agentbox_runtime.vmm import qmp
from agentbox_runtime.vmm.host import qemu_binary

pytestmark = pytest.mark.skipif(shutil.which(qemu_binary()) is None, reason=f"needs {qemu_binary()}")


@pytest.fixture
def monitor() -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    d = Path(tempfile.mkdtemp(prefix="qmp-"))
    sock = d / "qmp.sock"
    proc = subprocess.Popen([qemu_binary(), "-S", "-nodefaults", "-no-user-config", "-display", "none", "-machine",
                             "none", "-chardev", f"socket,id=qmp,path={sock},server=on,wait=off",
                             "-mon", "chardev=qmp,mode=control"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        retry(lambda _last: sock.exists(), timeout=30, interval=0.05)
        yield sock, proc
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_a_command_returns_its_result(monitor: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, _ = monitor
    status = qmp.execute(sock, "query-status")
    assert status["status"] == "prelaunch" and status["running"] is False


def test_an_error_reply_is_an_error_naming_its_class(monitor: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, _ = monitor
    with pytest.raises(qmp.QmpError, match="QMP no-such-command failed: CommandNotFound"):
        qmp.execute(sock, "no-such-command")


def test_quit_is_answered_and_qemu_exits(monitor: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, proc = monitor
    try:
        qmp.execute(sock, "quit")
    except qmp.QmpError as exc:
        assert "closed the QMP socket" in str(exc)  # qemu may close before the reply is read
    assert proc.wait(30) == 0


def test_no_socket_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(qmp.QmpError, match="cannot connect to QMP at"):
        qmp.execute(tmp_path / "missing.sock", "query-status", timeout=1)
