"""``agentbox libkrun`` end to end through the QEMU-backed krun runtime (``--krun-runtime qemu``):
the task, ``libkrun resize`` through the Podman maintenance VM (reference 5.4, 6.4) and
``libkrun reset-nix`` (5.5), as a user runs them on a host whose crun lacks +LIBKRUN."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

IMAGE = "localhost/agentbox:latest"
GIB = 1 << 30
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("agentbox-krun-runtime needs root here (tap devices in the container's namespace)")
    for tool in ("podman", "qemu-system-x86_64", "btrfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    if subprocess.run(["podman", "image", "exists", IMAGE], timeout=60).returncode != 0:
        pytest.skip(f"needs the guest image {IMAGE} (agentbox image build)")
    base = tmp_path_factory.mktemp("libkrun-cli")
    yield {**os.environ, "XDG_STATE_HOME": str(base / "state"), "AGENTBOX_IMAGE": IMAGE,
           "AGENTBOX_KRUN_RUNTIME": "qemu"}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project its user owns (uid 1000, the guest's dev). krun-podman as root shares volumes as crun
    does, without an id map, so a project root owns would be read-only to dev there, under crun +
    libkrun as under the stand-in (docs/libkrun-fidelity.md, "VM root and volumes")."""
    p = tmp_path_factory.mktemp("project")
    p.chmod(0o755)
    os.chown(p, 1000, 1000)
    return p


def agentbox(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def state_root(env: dict[str, str]) -> Path:
    return next(Path(env["XDG_STATE_HOME"]).glob("agentbox/*/libkrun-nix.raw")).parent


def super_field(image: Path, name: str) -> str:
    out = subprocess.run(["btrfs", "inspect-internal", "dump-super", str(image)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    m = re.search(rf"^{name}\s+(\S+)", out, re.M)
    assert m, out
    return m[1]


def btrfs_bytes(image: Path) -> int:
    return int(super_field(image, "total_bytes"))


def test_the_default_mode_runs_the_guest_as_dev_with_the_exit_status(env: dict[str, str], project: Path) -> None:
    proc = agentbox(env, project, "--", "sh", "-c", "id -un; echo from-guest > /workspace/f; exit 3")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "dev"
    assert (project / "f").read_text() == "from-guest\n" and (project / "f").stat().st_uid == 1000
    assert {p.name for p in state_root(env).glob("libkrun-*.raw")} == {"libkrun-nix.raw", "libkrun-containers.raw"}


def test_resize_grows_the_disk_and_its_filesystem_through_the_maintenance_vm(env: dict[str, str],
                                                                          project: Path) -> None:
    nix = state_root(env) / "libkrun-nix.raw"
    assert btrfs_bytes(nix) == 64 * GIB
    proc = agentbox(env, project, "libkrun", "resize", "--target", "nix", "--size", "80")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert nix.stat().st_size == 80 * GIB and btrfs_bytes(nix) == 80 * GIB
    smaller = agentbox(env, project, "libkrun", "resize", "--target", "nix", "--size", "70")
    assert smaller.returncode != 0 and "shrinking and equal-size resize are refused" in smaller.stderr


def test_reset_nix_recreates_the_disk(env: dict[str, str], project: Path) -> None:
    nix = state_root(env) / "libkrun-nix.raw"
    before = super_field(nix, "fsid")
    assert agentbox(env, project, "libkrun", "reset-nix").returncode != 0  # --force is required
    assert super_field(nix, "fsid") == before
    proc = agentbox(env, project, "libkrun", "reset-nix", "--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert super_field(nix, "fsid") != before and nix.stat().st_size == 64 * GIB and btrfs_bytes(nix) == 64 * GIB
