"""Resize and reset-nix with real tools: sparse growth seen by btrfs through a loop
mount, a live Podman container blocking both until it stops, and the real CLI's
refusals of bad resize input (exit 2, nothing changed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agentbox_runtime import disks
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.live_disks import PodmanContainers
from agentbox_runtime.reset import reset_nix
from agentbox_runtime.resize import ResizePlan, resize

pytestmark = pytest.mark.skipif(
    shutil.which("mkfs.btrfs") is None or shutil.which("blkid") is None,
    reason="needs mkfs.btrfs and blkid: apt-get install btrfs-progs util-linux")

GIB = 1 << 30


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


class LoopResize:
    """The guest step done on the host: loop-mount and ``btrfs filesystem resize max``."""

    def __init__(self, mount: Callable[[Path], Path]) -> None:
        self.mount = mount
        self.sizes: list[int] = []
        self.mounted: list[Path] = []

    def run(self, plan: ResizePlan) -> int:
        target = self.mount(plan.path)
        self.mounted.append(target)
        run("btrfs", "filesystem", "resize", "max", str(target))
        usage = run("btrfs", "filesystem", "usage", "-b", str(target))
        match = re.search(r"Device size:\s+(\d+)", usage)
        assert match, usage
        self.sizes.append(int(match.group(1)))
        return 0


class NeverRuns:
    """A maintenance runner that must not be reached."""

    def run(self, plan: ResizePlan) -> int:
        pytest.fail(f"the guest step must not run: {plan}")


def test_growth_plus_resize_max_is_seen_by_the_filesystem(
        tmp_path: Path, loop_mount: Callable[[Path], Path], podman_env: dict[str, str]) -> None:
    disks.prepare(disks.LIBKRUN_NIX, tmp_path)
    data = loop_mount(tmp_path / "libkrun-nix.raw")
    (data / "keep.txt").write_text("survives")
    run("umount", str(data))
    step = LoopResize(loop_mount)
    plan = resize("nix", 96 * GIB, tmp_path, step, containers=PodmanContainers())
    assert (plan.old_size, plan.new_size) == (64 * GIB, 96 * GIB)
    assert step.sizes == [96 * GIB]
    assert (step.mounted[0] / "keep.txt").read_text() == "survives"
    st = (tmp_path / "libkrun-nix.raw").stat()
    assert st.st_size == 96 * GIB and st.st_blocks * 512 < 64 << 20


def test_live_container_blocks_resize_and_reset_until_stopped(tmp_path: Path, annotated_container) -> None:  # type: ignore[no-untyped-def]
    disks.prepare(disks.LIBKRUN_NIX, tmp_path)
    path = tmp_path / "libkrun-nix.raw"
    uuid_before = run("blkid", "-o", "value", "-s", "UUID", str(path)).strip()
    cid = annotated_container.start({"krun.disk.0.path": str(path)})
    with pytest.raises(AgentboxError, match=f"refusing to resize libkrun raw image '{path}' while "
                                            f"running Podman container\\(s\\) use it: .*{cid}"):
        resize("nix", 80 * GIB, tmp_path, NeverRuns(), containers=PodmanContainers())
    with pytest.raises(AgentboxError, match=f"refusing to reset libkrun raw image '{path}'"):
        reset_nix(tmp_path, True, containers=PodmanContainers())
    assert path.stat().st_size == 64 * GIB
    assert run("blkid", "-o", "value", "-s", "UUID", str(path)).strip() == uuid_before
    annotated_container.stop(cid)
    reset_nix(tmp_path, True, containers=PodmanContainers())
    assert run("blkid", "-o", "value", "-s", "LABEL", str(path)).strip() == "AGENTBOX_NIX"
    assert run("blkid", "-o", "value", "-s", "UUID", str(path)).strip() != uuid_before


def test_container_on_another_path_does_not_block(tmp_path: Path, annotated_container,  # type: ignore[no-untyped-def]
                                                  podman_env: dict[str, str]) -> None:
    """A running guest whose disk is another file does not block the reset: the image is recreated
    (a new filesystem UUID, the label kept) while that guest keeps running."""
    disks.prepare(disks.LIBKRUN_NIX, tmp_path)
    path = tmp_path / "libkrun-nix.raw"
    uuid_before = run("blkid", "-o", "value", "-s", "UUID", str(path)).strip()
    cid = annotated_container.start({"krun.disk.0.path": str(tmp_path / "libkrun-nix.raw.other")})
    assert reset_nix(tmp_path, True, containers=PodmanContainers()) == path
    assert run("blkid", "-o", "value", "-s", "LABEL", str(path)).strip() == "AGENTBOX_NIX"
    assert run("blkid", "-o", "value", "-s", "UUID", str(path)).strip() != uuid_before
    running = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", cid], env=podman_env,
                             capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert running == "true"


# --- the real CLI -----------------------------------------------------------------------------

@pytest.fixture()
def cli_env(tmp_path: Path, podman_env: dict[str, str]) -> dict[str, str]:
    env = dict(podman_env, HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(tmp_path / "state"),
               XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    env.pop("AGENTBOX_CONFIG", None)
    for d in ("home", "state", "cfg", "ws"):
        (tmp_path / d).mkdir()
    return env


def agentbox(env: dict[str, str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", *args], env=env, cwd=tmp_path / "ws",
                          capture_output=True, text=True, timeout=120)


def state_root(tmp_path: Path) -> Path:
    return tmp_path / "state" / "agentbox" / "ws"


@pytest.mark.parametrize("size,needle", [
    ("64G", "target size 68719476736 bytes must be greater than existing libkrun /nix raw image size "
            "68719476736 bytes; shrinking and equal-size resize are refused"),
    ("32", "target size 34359738368 bytes must be greater than"),
])
def test_cli_refuses_equal_and_smaller_sizes(tmp_path: Path, cli_env: dict[str, str], size: str,
                                             needle: str) -> None:
    disks.prepare(disks.LIBKRUN_NIX, state_root(tmp_path))
    out = agentbox(cli_env, tmp_path, "libkrun", "resize", "--target", "nix", "--size", size)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert (state_root(tmp_path) / "libkrun-nix.raw").stat().st_size == 64 * GIB


def test_cli_refuses_non_regular_and_non_btrfs_images(tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = state_root(tmp_path)
    (root / "libkrun-containers.raw").mkdir(parents=True)
    out = agentbox(cli_env, tmp_path, "libkrun", "resize", "--target", "containers", "--size", "128G")
    assert out.returncode == 2
    assert ("existing libkrun container storage raw image path "
            f"'{root / 'libkrun-containers.raw'}' is not a regular file; refusing to overwrite it") in out.stderr
    with open(root / "libkrun-nix.raw", "wb") as f:
        f.truncate(64 * GIB)
    out = agentbox(cli_env, tmp_path, "libkrun", "resize", "--target", "nix", "--size", "128G")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "has filesystem type 'unknown', expected btrfs; refusing to reformat automatically" in out.stderr
    assert (root / "libkrun-nix.raw").stat().st_size == 64 * GIB


def test_cli_reset_nix_recreates_and_leaves_containers_alone(tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = state_root(tmp_path)
    disks.prepare(disks.LIBKRUN_CONTAINERS, root)
    containers_uuid = run("blkid", "-o", "value", "-s", "UUID", str(root / "libkrun-containers.raw"))
    out = agentbox(cli_env, tmp_path, "libkrun", "reset-nix", "--force")
    assert out.returncode == 0, out.stderr
    assert run("blkid", "-o", "value", "-s", "LABEL", str(root / "libkrun-nix.raw")).strip() == "AGENTBOX_NIX"
    assert run("blkid", "-o", "value", "-s", "UUID", str(root / "libkrun-containers.raw")) == containers_uuid
    assert os.stat(root).st_mode & 0o777 == 0o700


def test_cli_resize_without_krun_refuses_before_growing(tmp_path: Path, cli_env: dict[str, str]) -> None:
    from agentbox_runtime.hostcheck.crun import check_crun_krun

    if check_crun_krun().ok:
        pytest.skip("this host's crun has the krun handler; the refusal cannot be observed")
    disks.prepare(disks.LIBKRUN_NIX, state_root(tmp_path))
    out = agentbox(cli_env, tmp_path, "libkrun", "resize", "--target", "nix", "--size", "128G")
    assert out.returncode == 1
    assert "libkrun mode needs crun built with libkrun" in out.stderr and "agentbox doctor" in out.stderr
    assert (state_root(tmp_path) / "libkrun-nix.raw").stat().st_size == 64 * GIB
