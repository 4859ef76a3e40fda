"""The image build's work dir is deleted only after everything mounted in it is gone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agentbox_runtime.images import workdir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind-mount like the apt step")


def _mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True, timeout=60, capture_output=True)


def test_work_dir_unmounts_binds_before_deleting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host_dev = tmp_path / "host-dev"  # stands for the host's /dev the apt step binds in
    host_dev.mkdir()
    (host_dev / "null").write_text("precious")
    monkeypatch.setenv("AGENTBOX_BUILD_DIR", str(tmp_path))
    try:
        with workdir.work_dir() as work:
            (work / "root/dev").mkdir(parents=True)
            (work / "root/proc").mkdir()
            _mount("--bind", str(host_dev), str(work / "root/dev"))
            _mount("-t", "tmpfs", "tmpfs", str(work / "root/proc"))
            assert (work / "root/dev/null").read_text() == "precious"
        assert not work.exists()
        assert (host_dev / "null").read_text() == "precious"
    finally:
        for target in workdir.mounts_under(tmp_path):
            subprocess.run(["umount", "-l", target], timeout=60, check=False)


def test_stale_work_dirs_of_killed_builds_are_removed_safely(tmp_path: Path) -> None:
    host_dev = tmp_path / "host-dev"
    host_dev.mkdir()
    (host_dev / "null").write_text("precious")
    stale = tmp_path / f"{workdir.PREFIX}killed"
    (stale / "root/dev").mkdir(parents=True)
    try:
        _mount("--bind", str(host_dev), str(stale / "root/dev"))
        workdir.remove_stale(tmp_path)
        assert not stale.exists()
        assert (host_dev / "null").read_text() == "precious"
    finally:
        for target in workdir.mounts_under(tmp_path):
            subprocess.run(["umount", "-l", target], timeout=60, check=False)


def test_work_dirs_default_to_a_private_dir_and_another_users_stale_dir_is_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTBOX_BUILD_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with workdir.work_dir() as work:
        parent = work.parent
        assert parent == tmp_path / "cache/agentbox/image-build/work"
        assert os.stat(parent).st_mode & 0o777 == 0o700 and os.stat(work).st_mode & 0o077 == 0
    theirs = tmp_path / f"{workdir.PREFIX}theirs"
    theirs.mkdir()
    os.chown(theirs, 4242, 4242)
    workdir.remove_stale(tmp_path)
    assert theirs.is_dir(), "a directory of another user is never removed"
