"""vm-init's launch port pieces (snapshot restore): reading the host's line and waiting for disks."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentbox_guest_init import instance_id, vminit


def test_the_launch_line_survives_end_of_file_reads_before_the_host_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"", b"", b'{"launch": "x",', b' "seed": "00"}\n']
    monkeypatch.setattr(vminit.os, "read", lambda fd, n: chunks.pop(0))
    monkeypatch.setattr(vminit.time, "sleep", lambda s: None)
    assert vminit.read_line(3) == b'{"launch": "x", "seed": "00"}\n'
    assert not chunks


def test_an_endless_launch_line_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vminit.os, "read", lambda fd, n: b"x" * 4096)
    with pytest.raises(ValueError, match="longer than 8192 bytes"):
        vminit.read_line(3, limit=8192)


def test_the_instance_id_is_new_each_time_and_kept_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "run/agentbox/instance-id"
    instance_id.write(tmp_path)
    first = path.read_text()
    assert len(first.strip()) == 32
    instance_id.write(tmp_path, replace=False)
    assert path.read_text() == first
    instance_id.write(tmp_path)
    assert path.read_text() != first
