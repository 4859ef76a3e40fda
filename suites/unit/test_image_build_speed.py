"""The faster base import (issue 27): Podman's temporary copy of the layer goes to a private
directory on the /dev/shm tmpfs when the layer fits there (with memory to spare), else to its
default (/var/tmp). No image tool runs: the import step is recorded."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from agentbox_runtime.images import commit

GIB = 1 << 30


def _meminfo(tmp_path: Path, available: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {available // 1024} kB\n")
    return path


def test_mem_available_reads_meminfo(tmp_path: Path) -> None:
    assert commit.mem_available(_meminfo(tmp_path, 3 * GIB)) == 3 * GIB
    assert commit.mem_available(tmp_path / "missing") == 0


def test_tree_bytes_counts_the_tree(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 5000)
    assert commit.tree_bytes(tmp_path) >= 5000
    assert commit.tree_bytes(tmp_path / "missing") == -1


def test_tmpfs_fits_needs_space_and_memory_with_headroom(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    plenty = _meminfo(tmp_path, free + 10 * GIB)
    assert commit.tmpfs_fits(1000, tmp_path, plenty) == (free >= 1000 + commit.TMPFS_HEADROOM)
    assert not commit.tmpfs_fits(free, tmp_path, plenty)  # no headroom left on the file system
    assert not commit.tmpfs_fits(1000, tmp_path, _meminfo(tmp_path, GIB))  # memory short
    assert not commit.tmpfs_fits(-1, tmp_path, plenty)  # unknown size
    assert not commit.tmpfs_fits(1000, tmp_path / "missing", plenty)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], dict[str, str] | None]]:
    """The import steps that would run, with their environments (and the TMPDIR existing then)."""
    calls: list[tuple[list[str], dict[str, str] | None]] = []

    def step(name: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> None:
        if env is not None and "TMPDIR" in env:
            assert Path(env["TMPDIR"]).is_dir()
        calls.append((list(argv), dict(env) if env is not None else None))

    monkeypatch.setattr(commit, "step", step)
    return calls


def test_import_puts_the_layer_copy_on_the_tmpfs_when_it_fits(
        recorded: list[tuple[list[str], dict[str, str] | None]], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(commit, "SHM", shm)
    monkeypatch.setattr(commit, "tmpfs_fits", lambda size, where: where == shm and size > 0)
    (tmp_path / "root").mkdir()
    (tmp_path / "root/file").write_text("x")
    commit.import_root(tmp_path / "root", "localhost/agentbox-base:abc", "abc123", tmp_path / "log")
    (argv, env), = recorded
    assert env is not None and Path(env["TMPDIR"]).parent == shm and env["TMPDIR"].startswith(str(shm / "agentbox-layer-"))
    assert "podman import --change 'LABEL io.agentbox.recipe=abc123' - localhost/agentbox-base:abc" in argv[-1]
    assert list(shm.iterdir()) == []  # the private directory is gone afterwards


def test_import_falls_back_to_the_default_when_the_tmpfs_is_short(
        recorded: list[tuple[list[str], dict[str, str] | None]], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    monkeypatch.setattr(commit, "tmpfs_fits", lambda size, where: False)
    monkeypatch.delenv("TMPDIR", raising=False)
    commit.import_root(tmp_path, "localhost/agentbox-base:abc", "abc123", tmp_path / "log")
    (_, env), = recorded
    assert env is not None and "TMPDIR" not in env


def test_the_former_way_leaves_the_environment_alone(
        recorded: list[tuple[list[str], dict[str, str] | None]], tmp_path: Path) -> None:
    commit.import_root(tmp_path, "localhost/agentbox-base:abc", "abc123", tmp_path / "log", tmpfs=False)
    (_, env), = recorded
    assert env is None
