"""The /nix overlay upper-dir preseed (7.5 step 5): classification and the three cases, with real cp."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.nix_prep import ATTEMPTED, PRESEEDED, Preseed, classify, overlay_mounted, preseed

from .conftest import Recorder


@pytest.fixture()
def layout(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(root with /etc/group, upper, work, lower /nix/var with a db and a profile)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/group").write_text(f"nixbld:x:{os.getgid() if os.geteuid() else 30000}:\n")
    lower = tmp_path / "lower/var"
    (lower / "nix/db").mkdir(parents=True)
    (lower / "nix/db/db.sqlite").write_text("image db")
    (lower / "nix/profiles").mkdir()
    return root, tmp_path / "disk/upper", tmp_path / "disk/work", lower


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_classify(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    assert classify(upper) is Preseed.FRESH_OR_RETRY
    (upper / "var/nix/db").mkdir(parents=True)
    assert classify(upper) is Preseed.LEGACY_SEEDED
    (upper / ATTEMPTED).write_text("attempted\n")
    assert classify(upper) is Preseed.FRESH_OR_RETRY  # an interrupted copy is retried
    (upper / PRESEEDED).write_text("preseeded\n")
    assert classify(upper) is Preseed.COMPLETED


def test_fresh_copies_lower_var_once_and_marks_it(layout) -> None:  # type: ignore[no-untyped-def]
    root, upper, work, lower = layout
    assert preseed(upper, work, lower, root=root) is Preseed.FRESH_OR_RETRY
    assert (upper / "var/nix/db/db.sqlite").read_text() == "image db"
    assert (upper / PRESEEDED).read_text() == "preseeded\n" and mode(upper / PRESEEDED) == 0o644
    assert not (upper / ATTEMPTED).exists()
    assert work.is_dir() and mode(upper / "store") == 0o1775
    assert mode(upper / "var") == 0o755 and mode(upper / "var/nix") == 0o755
    if os.geteuid() == 0:
        assert (upper / "store").stat().st_gid == 30000
    # the user's later changes survive the next boot: completed, no copy
    (upper / "var/nix/db/db.sqlite").write_text("user db")
    assert preseed(upper, work, lower, root=root) is Preseed.COMPLETED
    assert (upper / "var/nix/db/db.sqlite").read_text() == "user db"


def test_retry_after_interrupted_copy_does_not_clobber(layout) -> None:  # type: ignore[no-untyped-def]
    root, upper, work, lower = layout
    (upper / "var/nix/db").mkdir(parents=True)
    (upper / "var/nix/db/db.sqlite").write_text("half copied")
    (upper / ATTEMPTED).write_text("attempted\n")
    assert preseed(upper, work, lower, root=root) is Preseed.FRESH_OR_RETRY
    assert (upper / "var/nix/db/db.sqlite").read_text() == "half copied"  # --no-clobber
    assert (upper / "var/nix/profiles").is_dir()
    assert (upper / PRESEEDED).exists() and not (upper / ATTEMPTED).exists()


def test_legacy_seeded_gets_the_sentinel_without_a_copy(layout) -> None:  # type: ignore[no-untyped-def]
    root, upper, work, lower = layout
    (upper / "var/nix/profiles").mkdir(parents=True)
    r = Recorder()
    assert preseed(upper, work, lower, runner=r, root=root) is Preseed.LEGACY_SEEDED
    assert r.calls == []
    assert (upper / PRESEEDED).exists() and not (upper / "var/nix/db").exists()


def test_completed_repairs_and_clears_a_stale_attempt_marker(layout) -> None:  # type: ignore[no-untyped-def]
    root, upper, work, lower = layout
    upper.mkdir(parents=True)
    (upper / PRESEEDED).write_text("preseeded\n")
    (upper / ATTEMPTED).write_text("attempted\n")
    r = Recorder()
    assert preseed(upper, work, lower, runner=r, root=root) is Preseed.COMPLETED
    assert r.calls == [] and not (upper / ATTEMPTED).exists()
    assert (upper / "var/nix").is_dir() and mode(upper / "store") == 0o1775


def test_fresh_without_lower_var_only_repairs(layout, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, upper, work, _ = layout
    r = Recorder()
    assert preseed(upper, work, tmp_path / "absent", runner=r, root=root) is Preseed.FRESH_OR_RETRY
    assert r.calls == [] and not (upper / PRESEEDED).exists() and (upper / "var/nix").is_dir()


def test_copy_failure_keeps_the_attempt_marker(layout) -> None:  # type: ignore[no-untyped-def]
    root, upper, work, lower = layout
    r = Recorder({("cp",): (1, "", "cp: no space left on device")})
    with pytest.raises(GuestError, match="^failed to preseed libkrun upperdir /nix/var from image lowerdir: "
                                         "cp: no space left on device$"):
        preseed(upper, work, lower, runner=r, root=root)
    assert (upper / ATTEMPTED).exists() and not (upper / PRESEEDED).exists()
    assert classify(upper) is Preseed.FRESH_OR_RETRY


def test_overlay_mounted_reads_proc_mounts(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/mounts").write_text("/dev/vda /run/agentbox/nix-disk btrfs rw 0 0\n")
    assert not overlay_mounted(tmp_path)
    (tmp_path / "proc/mounts").write_text("overlay /nix overlay rw,lowerdir=/nix 0 0\n")
    assert overlay_mounted(tmp_path)
