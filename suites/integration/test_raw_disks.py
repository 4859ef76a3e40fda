"""Raw btrfs images with the real tools: mkfs.btrfs on sparse files, blkid, a loop mount."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from agentbox_runtime import disks
from agentbox_runtime.errors import AgentboxError, InputError

pytestmark = pytest.mark.skipif(
    shutil.which("mkfs.btrfs") is None or shutil.which("blkid") is None,
    reason="needs mkfs.btrfs and blkid: apt-get install btrfs-progs util-linux")


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


def blkid(path: Path, tag: str) -> str:
    return run("blkid", "-o", "value", "-s", tag, str(path)).strip()


@pytest.mark.parametrize("disk", [*disks.LIBKRUN_DISKS, *disks.MICROVM_DISKS], ids=lambda d: d.file_name)
def test_created_image_is_sparse_btrfs_with_label(tmp_path: Path, disk: disks.RawDisk) -> None:
    assert disks.prepare(disk, tmp_path) is disks.Outcome.CREATED
    path = tmp_path / disk.file_name
    st = path.stat()
    assert st.st_size == 64 << 30
    assert st.st_blocks * 512 < 16 << 20, f"allocated {st.st_blocks * 512} bytes"
    assert blkid(path, "TYPE") == "btrfs"
    assert blkid(path, "LABEL") == disk.spec.label
    assert disks.prepare(disk, tmp_path) is disks.Outcome.REUSED


def test_label_is_seen_through_a_loop_mount(tmp_path: Path, loop_mount: Callable[[Path], Path]) -> None:
    disks.prepare(disks.LIBKRUN_CONTAINERS, tmp_path)
    mnt = loop_mount(tmp_path / "libkrun-containers.raw")
    assert run("btrfs", "filesystem", "label", str(mnt)).strip() == "AGENTBOX_CONTAINERS"
    (mnt / "probe").write_text("written through the loop device")


def test_reuse_never_reformats_existing_data(tmp_path: Path) -> None:
    disks.prepare(disks.LIBKRUN_NIX, tmp_path)
    uuid_before = blkid(tmp_path / "libkrun-nix.raw", "UUID")
    assert disks.prepare(disks.LIBKRUN_NIX, tmp_path) is disks.Outcome.REUSED
    assert blkid(tmp_path / "libkrun-nix.raw", "UUID") == uuid_before


def test_zeroed_and_foreign_images_are_refused_not_reformatted(tmp_path: Path) -> None:
    path = tmp_path / "libkrun-containers.raw"
    with open(path, "wb") as f:
        f.truncate(64 << 30)
    with pytest.raises(InputError, match="has filesystem type 'unknown', expected btrfs"):
        disks.prepare(disks.LIBKRUN_CONTAINERS, tmp_path)
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4 for the foreign filesystem case: apt-get install e2fsprogs")
    run("mkfs.ext4", "-q", "-F", str(path))
    with pytest.raises(InputError, match="has filesystem type 'ext4', expected btrfs; refusing to reformat"):
        disks.prepare(disks.LIBKRUN_CONTAINERS, tmp_path)
    assert blkid(path, "TYPE") == "ext4"


def test_too_small_image_is_refused_before_any_probe(tmp_path: Path) -> None:
    path = tmp_path / "libkrun-nix.raw"
    with open(path, "wb") as f:
        f.truncate(1 << 30)
    with pytest.raises(InputError, match=r"is 1073741824 bytes, below the required 68719476736 bytes; "
                                         r"stop the VM, extend it with 'truncate -s 64G"):
        disks.prepare(disks.LIBKRUN_NIX, tmp_path)


def test_failed_mkfs_leaves_no_file(tmp_path: Path) -> None:
    # 1 MiB is below btrfs's minimum size: the real mkfs.btrfs refuses it
    with pytest.raises(AgentboxError, match="failed to format new libkrun /nix raw image") as info:
        disks.create(disks.LIBKRUN_NIX, tmp_path / "x" / "libkrun-nix.raw", disks.SubprocessRunner(),
                     size=1 << 20)
    assert "mkfs.btrfs failed for" in str(info.value.__cause__)
    assert not (tmp_path / "x" / "libkrun-nix.raw").exists()
