"""The bounded console log: a guest that prints without end cannot fill the host's disk."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from agentbox_runtime.errors import InputError
from agentbox_runtime.vmm import console_log
from agentbox_runtime.vmm.console_log import ConsoleListener, ConsoleRecorder, log_cap, rotated
from agentbox_runtime.vmm.host import tail

CAP = 128 << 10


def flood(fd: int, total: int) -> None:
    line = b"".join(b"line %08d of a guest that never stops printing\n" % i for i in range(1000))
    sent = 0
    while sent < total:
        sent += os.write(fd, line[: total - sent])
    os.write(fd, b"the last line\n")
    os.close(fd)


def test_a_flood_through_a_pipe_stays_under_the_cap_and_keeps_the_newest_output(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    recorder = ConsoleRecorder(log, CAP)
    r, w = os.pipe()
    recorder.start(r)
    writer = threading.Thread(target=flood, args=(w, 20 * CAP))
    writer.start()
    writer.join(60)
    recorder.join(60)
    sizes = log.stat().st_size + rotated(log).stat().st_size
    assert sizes <= CAP
    assert recorder.dropped_files >= 30
    assert tail(log, 1) == "the last line"
    assert "line" in rotated(log).read_text()


def test_short_output_is_kept_whole_and_appended(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"earlier boot\n")
    recorder = ConsoleRecorder(log, CAP)
    r, w = os.pipe()
    recorder.start(r)
    os.write(w, b"kernel: hello\n")
    os.close(w)
    recorder.join(10)
    assert log.read_text() == "earlier boot\nkernel: hello\n"
    assert not rotated(log).exists()


def test_the_tail_continues_from_the_older_half(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    rotated(log).write_text("".join(f"old {i}\n" for i in range(10)))
    log.write_text("new 0\n")
    assert tail(log, 3).splitlines() == ["old 8", "old 9", "new 0"]


def test_the_listener_records_what_the_vmm_sends(tmp_path: Path) -> None:
    listener = ConsoleListener(tmp_path / "serial.sock", tmp_path / "console.log", CAP)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as vmm:
        vmm.connect(str(tmp_path / "serial.sock"))
        vmm.sendall(b"x" * (3 * CAP) + b"\nbye\n")
    listener.close(10)
    assert (tmp_path / "console.log").read_bytes().endswith(b"\nbye\n")
    assert (tmp_path / "console.log").stat().st_size + rotated(tmp_path / "console.log").stat().st_size <= CAP
    assert not (tmp_path / "serial.sock").exists()


def test_a_listener_nobody_connected_to_closes_cleanly(tmp_path: Path) -> None:
    listener = ConsoleListener(tmp_path / "serial.sock", tmp_path / "console.log", CAP)
    listener.close(5)
    assert (tmp_path / "console.log").read_bytes() == b""


@pytest.mark.parametrize("value", ["lots", "-1", "100", "1e6"])
def test_a_bad_cap_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(console_log.ENV_MAX, value)
    with pytest.raises(InputError, match=f"{console_log.ENV_MAX}=.*at least {console_log.MIN_MAX}"):
        log_cap()


def test_the_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(console_log.ENV_MAX, raising=False)
    assert log_cap() == console_log.DEFAULT_MAX
    monkeypatch.setenv(console_log.ENV_MAX, str(1 << 20))
    assert log_cap() == 1 << 20
