"""Raw btrfs images with the real tools: mkfs.btrfs, blkid, loop mounts, growth, live-disk probe."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import disks
from runtime.container import host_conf
from runtime.errors import AgentboxError, InputError
from runtime.live_disks import CliContainers
from runtime.reset import reset_nix
from runtime.resize import ResizePlan, resize

needs_btrfs = pytest.mark.skipif(shutil.which("mkfs.btrfs") is None or shutil.which("blkid") is None,
                                 reason="needs mkfs.btrfs and blkid: apt-get install btrfs-progs util-linux")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loop mounts need root on the host")
pytestmark = needs_btrfs


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


@pytest.fixture()
def loop_mount(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    """Mount an image on a loop device; always unmounted afterwards."""
    mounts: list[Path] = []

    def mount(image: Path) -> Path:
        target = tmp_path / f"mnt{len(mounts)}"
        target.mkdir()
        run("mount", "-o", "loop", str(image), str(target))
        mounts.append(target)
        return target

    yield mount
    for target in reversed(mounts):
        subprocess.run(["umount", str(target)], check=False, timeout=60)


def test_created_image_is_sparse_btrfs_with_label(tmp_path: Path) -> None:
    assert disks.prepare(disks.LIBKRUN_NIX, tmp_path) is disks.Outcome.CREATED
    path = tmp_path / "libkrun-nix.raw"
    st = path.stat()
    assert st.st_size == 64 << 30
    assert st.st_blocks * 512 < 16 << 20
    assert run("blkid", "-o", "value", "-s", "TYPE", str(path)).strip() == "btrfs"
    assert run("blkid", "-o", "value", "-s", "LABEL", str(path)).strip() == "AGENTBOX_NIX"
    assert disks.prepare(disks.LIBKRUN_NIX, tmp_path) is disks.Outcome.REUSED


def test_foreign_filesystem_is_refused_not_reformatted(tmp_path: Path) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4 (e2fsprogs)")
    path = tmp_path / "libkrun-containers.raw"
    with open(path, "wb") as f:
        f.truncate(64 << 30)
    run("mkfs.ext4", "-q", "-F", str(path))
    with pytest.raises(InputError, match="has filesystem type 'ext4', expected btrfs"):
        disks.prepare(disks.LIBKRUN_CONTAINERS, tmp_path)
    assert run("blkid", "-o", "value", "-s", "TYPE", str(path)).strip() == "ext4"


class LoopResize:
    """The guest step done on the host: loop-mount and ``btrfs filesystem resize max``."""

    def __init__(self, mount: callable) -> None:  # type: ignore[valid-type]
        self.mount, self.sizes = mount, []  # type: ignore[var-annotated]

    def run(self, plan: ResizePlan) -> int:
        target = self.mount(plan.path)
        run("btrfs", "filesystem", "resize", "max", str(target))
        usage = run("btrfs", "filesystem", "usage", "-b", str(target))
        self.sizes.append(int(re.search(r"Device size:\s+(\d+)", usage).group(1)))  # type: ignore[union-attr]
        return 0


@needs_root
def test_growth_plus_resize_max_is_seen_by_the_filesystem(tmp_path: Path, loop_mount) -> None:  # type: ignore[no-untyped-def]
    disks.prepare(disks.LIBKRUN_NIX, tmp_path)
    data = loop_mount(tmp_path / "libkrun-nix.raw")
    (data / "keep.txt").write_text("survives")
    subprocess.run(["umount", str(data)], check=True, timeout=60)
    step = LoopResize(loop_mount)
    resize("nix", 96 << 30, tmp_path, step, containers=CliContainers())
    assert step.sizes == [96 << 30]
    assert (tmp_path / "libkrun-nix.raw").stat().st_size == 96 << 30


@pytest.fixture()
def annotated_container(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    """Start running containers carrying a krun.disk.0.path annotation; removed afterwards."""
    if shutil.which("podman") is None:
        pytest.skip("needs podman: apt-get install podman")
    from suites.integration.container_test_image import build_test_image

    env = dict(os.environ, **{host_conf.ENV: str(host_conf.ensure())})
    image = build_test_image()
    label = f"io.agentbox.harness.run=pytest-{uuid.uuid4().hex[:10]}"
    started: list[str] = []

    def start(path: Path) -> str:
        cid = subprocess.run(["podman", "run", "-d", "--label", label,
                              "--annotation", f"krun.disk.0.path={path}", image, "sleep", "600"],
                             env=env, check=True, capture_output=True, text=True, timeout=120).stdout.strip()
        started.append(cid)
        return cid[:12]

    yield start
    for cid in started:
        subprocess.run(["podman", "rm", "-f", "-t", "0", cid], env=env, capture_output=True, timeout=60)


def test_live_container_blocks_resize_and_reset_until_stopped(tmp_path: Path, annotated_container) -> None:  # type: ignore[no-untyped-def]
    disks.prepare(disks.LIBKRUN_NIX, tmp_path)
    path = tmp_path / "libkrun-nix.raw"
    cid = annotated_container(path)
    never = LoopResize(lambda p: pytest.fail("guest step must not run while the disk is live"))
    with pytest.raises(AgentboxError, match=f"refusing to resize libkrun raw image '{path}'.*{cid}"):
        resize("nix", 80 << 30, tmp_path, never, containers=CliContainers())
    with pytest.raises(AgentboxError, match="refusing to reset libkrun raw image"):
        reset_nix(tmp_path, True, containers=CliContainers())
    assert path.stat().st_size == 64 << 30
    subprocess.run(["podman", "rm", "-f", "-t", "0", cid], check=True, capture_output=True, timeout=60,
                   env=dict(os.environ, **{host_conf.ENV: str(host_conf.ensure())}))
    reset_nix(tmp_path, True, containers=CliContainers())
    assert run("blkid", "-o", "value", "-s", "LABEL", str(path)).strip() == "AGENTBOX_NIX"
