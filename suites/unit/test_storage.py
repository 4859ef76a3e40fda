"""Storage backend selection texts, no-fallback rules, preserve hints and cleanup (reference 9.5)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agentbox_runtime.errors import AgentboxError, error_chain
from agentbox_runtime.microvm import storage


@pytest.fixture()
def bare_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding only the tools a test links in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def link(bin_dir: Path, *tools: str) -> None:
    for tool in tools:
        real = shutil.which(tool, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        assert real, f"{tool} is installed on this host"
        (bin_dir / tool).symlink_to(real)


@pytest.mark.parametrize(("policy", "message"), [
    ("auto", "experimental microvm storage auto requires buildah+btrfs for snapshots or fuse-overlayfs on PATH"),
    ("btrfs-snapshot", "experimental microvm storage --storage btrfs-snapshot requires buildah and btrfs on PATH"),
    ("reflink", "experimental microvm storage --storage reflink requires cp on PATH"),
    ("fuse-overlay", "experimental microvm storage --storage fuse-overlay requires fuse-overlayfs on PATH"),
])
def test_selection_errors_are_exact(bare_path: Path, policy: str, message: str) -> None:
    with pytest.raises(AgentboxError) as err:
        storage.select(policy)
    assert str(err.value) == message


def test_btrfs_snapshot_needs_both_tools(bare_path: Path) -> None:
    link(bare_path, "buildah")
    with pytest.raises(AgentboxError, match="requires buildah and btrfs"):
        storage.select("btrfs-snapshot")
    link(bare_path, "btrfs")
    assert storage.select("btrfs-snapshot") == "btrfs-snapshot"


def test_auto_is_satisfied_by_fuse_alone(bare_path: Path) -> None:
    link(bare_path, "fuse-overlayfs")
    assert storage.select("auto") == "auto"


def test_unknown_policy_names_the_accepted_ones() -> None:
    with pytest.raises(AgentboxError) as err:
        storage.select("zfs")
    assert str(err.value) == "unknown microvm storage 'zfs'; accepted: auto, btrfs-snapshot, fuse-overlay, reflink"


def test_preserve_hints(tmp_path: Path) -> None:
    task = tmp_path / "t"
    snap = storage.TaskRootfs("btrfs-snapshot", task / "rootfs-btrfs-snapshot", task)
    assert snap.hint() == ("btrfs snapshot task rootfs is preserved; delete it with `buildah unshare btrfs "
                           f"subvolume delete '{task}/rootfs-btrfs-snapshot'` before deleting '{task}'")
    fuse = storage.TaskRootfs("fuse-overlay", task / "rootfs-fuse-overlay", task)
    assert fuse.hint() == ("fuse-overlay task rootfs is still mounted; unmount it with `fusermount3 -u "
                           f"'{task}/rootfs-fuse-overlay'` before deleting '{task}'")
    assert storage.TaskRootfs("reflink", task / "rootfs-reflink", task).hint() == ""


def test_reset_makes_read_only_dirs_removable(tmp_path: Path) -> None:
    task = tmp_path / "task"
    ro = task / "rootfs-reflink" / "usr" / "ro"
    ro.mkdir(parents=True)
    (ro / "f").write_text("x")
    ro.chmod(0o500)
    (task / "rootfs-reflink").chmod(0o500)
    storage.reset_task_dir(task)
    assert not task.exists()


def test_explicit_reflink_never_falls_back_and_leaves_no_task_dir(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(b"x" * 4096)
    task = tmp_path / "task"
    fstype = subprocess.run(["findmnt", "-no", "FSTYPE", "--target", str(tmp_path)], capture_output=True,
                            text=True, timeout=30).stdout.strip()
    if fstype in ("btrfs", "xfs"):
        pytest.skip(f"tmp_path is on {fstype}, which can reflink")
    try:
        storage.materialize("reflink", src, task)
    except AgentboxError as exc:
        chain = error_chain(exc)
        assert chain.startswith(f"failed to materialize microvm task rootfs with required reflinks from '{src}': "
                                f"failed to reflink-copy microvm task rootfs from '{src}'")
        assert "cp -a --reflink=always failed from" in chain
        assert not task.exists()
    else:
        pytest.fail("reflink materialization succeeded on a file system without reflinks")
