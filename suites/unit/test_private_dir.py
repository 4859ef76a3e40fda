"""Private runtime dirs: created 0700, reused only when ours, private and not a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentbox_runtime.errors import InputError
from agentbox_runtime.private_dir import (SOCKET_DIR_MAX, OutputDir, UnsafeDirectory, check_private, ensure_private,
                                          runtime_dir)


def test_created_private_and_reused(tmp_path: Path) -> None:
    d = ensure_private(tmp_path / "a" / "b")
    assert d.stat().st_mode & 0o777 == 0o700
    assert ensure_private(d) == d


def test_refuses_a_symlink_even_to_a_private_dir(tmp_path: Path) -> None:
    real = ensure_private(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafeDirectory, match="symlink"):
        ensure_private(link)


def test_refuses_group_or_world_access(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    with pytest.raises(UnsafeDirectory, match="mode 777 is group- or world-accessible"):
        ensure_private(d)
    assert d.stat().st_mode & 0o777 == 0o777, "a refused dir is left as it was"


def test_refuses_a_dir_another_user_created_first(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a dir owned by another user")
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    os.chown(planted, 4242, 4242)
    with pytest.raises(UnsafeDirectory, match="owned by uid 4242"):
        ensure_private(planted)


def test_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("")
    with pytest.raises(UnsafeDirectory, match="not a directory"):
        check_private(f)


def test_runtime_dir_prefers_a_private_xdg_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = ensure_private(tmp_path / "run")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    assert runtime_dir("vm", "k") == run / "agentbox" / "vm" / "k"


def test_runtime_dir_ignores_a_shared_xdg_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "run"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert runtime_dir("x") == tmp_path / "cache" / "agentbox" / "run" / "x"
    assert not (shared / "agentbox").exists()


def test_socket_dirs_stay_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ("c" * 90)))
    d = runtime_dir("vm", "0123456789ab", for_sockets=True)
    assert len(str(d)) <= SOCKET_DIR_MAX
    assert d.stat().st_uid == os.geteuid() and d.stat().st_mode & 0o777 == 0o700


def test_harness_containers_conf_refuses_a_dir_planted_by_another_user(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from agentbox_runtime.container import host_conf

    if os.geteuid() != 0:
        pytest.skip("needs root to create a dir owned by another user")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    planted = tmp_path / "cache" / "agentbox" / "run"
    planted.mkdir(parents=True, mode=0o700)
    os.chown(planted, 4242, 4242)
    with pytest.raises(UnsafeDirectory, match="owned by uid 4242"):
        host_conf.ensure()
    assert list(planted.iterdir()) == []


def test_harness_containers_conf_replaces_a_planted_symlink_instead_of_following_it(tmp_path: Path) -> None:
    from agentbox_runtime.container import host_conf

    victim = tmp_path / "victim"
    victim.write_text("keep")
    conf = ensure_private(tmp_path / "d") / "containers.conf"
    conf.symlink_to(victim)
    assert host_conf.ensure(conf) == conf
    assert victim.read_text() == "keep"
    assert not conf.is_symlink() and "[engine]" in conf.read_text()
    assert conf.stat().st_mode & 0o777 == 0o600


# -- OutputDir: directories a user names for output ---------------------------------------------------

def test_output_dir_creates_missing_levels_private_and_writes_files_exclusively(tmp_path: Path) -> None:
    with OutputDir.open(tmp_path / "a" / "b") as out:
        assert out.write_file("sub/f", b"one") == tmp_path / "a" / "b" / "sub" / "f"
        with pytest.raises(FileExistsError):
            out.write_file("sub/f", b"two")
        out.write_file("sub/f", b"three", replace=True)
    for level in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "sub"):
        assert level.stat().st_mode & 0o777 == 0o700
    f = tmp_path / "a" / "b" / "sub" / "f"
    assert f.read_bytes() == b"three" and f.stat().st_mode & 0o777 == 0o600


def test_output_dir_never_writes_through_a_link_inside_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "f").write_text("keep")
    with OutputDir.open(tmp_path / "out") as out:
        (tmp_path / "out" / "f").symlink_to(victim / "f")
        (tmp_path / "out" / "sub").symlink_to(victim)
        with pytest.raises(FileExistsError):
            out.write_file("f", b"x")
        with pytest.raises(UnsafeDirectory, match="sub: it is a symlink"):
            out.write_file("sub/f", b"x")
        out.write_file("f", b"mine", replace=True)  # the link goes, its target stays
        out.remove("sub")
        assert sorted(os.listdir(tmp_path / "out")) == ["f"]
        out.empty()
        assert out.is_empty()
    assert (victim / "f").read_text() == "keep"


def test_output_dir_refuses_a_missing_dir_without_create_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(UnsafeDirectory, match="it does not exist"):
        OutputDir.open(tmp_path / "nope", create=False)
    assert not (tmp_path / "nope").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(UnsafeDirectory, match="it is a regular file"):
        OutputDir.open(tmp_path / "file")
    with OutputDir.open(tmp_path / "out") as out:
        for bad in ("../x", "/abs", "a/../b", "", "a//b"):
            with pytest.raises(InputError, match="is not accepted; accepted: a relative path"):
                out.write_file(bad, b"x")
    assert os.listdir(tmp_path / "out") == []


def test_output_dir_refuses_a_level_another_user_owns(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a dir owned by another user")
    planted = tmp_path / "out" / "planted"
    planted.mkdir(parents=True)
    os.chown(planted, 4242, 4242)
    with pytest.raises(UnsafeDirectory, match=r"refusing output directory .*/planted: it is owned by uid 4242 "
                                              r"\(accepted: a real directory owned by uid 0"):
        OutputDir.open(planted)
    with OutputDir.open(tmp_path / "out") as out, pytest.raises(UnsafeDirectory, match="owned by uid 4242"):
        out.subdir("planted")
