"""``agentbox image build`` for real: the guest image contract, and the cache.

The first run on a machine builds the base (minutes); later runs find both
stages by their labels and do nothing, so this module is quick in CI's second
test run. Everything below inspects the image itself (``podman run`` with
runc, since crun 1.8 refuses this host's cgroup layout).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.images import recipe
from agentbox_runtime.images.build import BuildResult, build

REPO = Path(__file__).resolve().parents[2]
ULIMITS = ("--ulimit", "nofile=16384:16384", "--ulimit", "nproc=8192:8192")
RUN_TIMEOUT_S = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the image build needs root (debootstrap, chroot mounts)"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("podman", "buildah", "debootstrap")),
                       reason="needs podman, buildah and debootstrap: apt-get install podman buildah debootstrap"),
]


@pytest.fixture(scope="module")
def built() -> BuildResult:
    """The default image, built (or found up to date) once for this module."""
    return build()


def podman_run(image: str, *argv: str, entrypoint: str = "/bin/sh") -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a throwaway container of ``image``."""
    return subprocess.run(["podman", "run", "--rm", "--runtime", "runc", *ULIMITS, "--network", "none",
                           "--entrypoint", entrypoint, image, *argv],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)


def sh(image: str, script: str) -> str:
    proc = podman_run(image, "-c", script)
    assert proc.returncode == 0, f"{script!r} failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
    return proc.stdout


def inspect(image: str) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return json.loads(out)[0]


def test_labels_carry_both_stage_hashes(built: BuildResult) -> None:
    labels = inspect(built.tag)["Config"]["Labels"]
    assert labels[recipe.LABEL_RECIPE] == built.recipe_hash == recipe.recipe_hash()
    assert labels[recipe.LABEL_GUEST_INIT] == built.guest_init_hash == recipe.guest_init_hash()
    base = inspect(built.base_tag)["Config"]["Labels"]
    assert base[recipe.LABEL_RECIPE] == built.recipe_hash


def test_image_config(built: BuildResult) -> None:
    cfg = inspect(built.tag)["Config"]
    assert cfg["Entrypoint"] == ["/bin/agentbox-guest-init", "default", "enter", "--"]
    assert cfg["Cmd"] == ["fish", "-l"]
    assert cfg["WorkingDir"] == "/workspace"
    assert "SHELL=/usr/bin/fish" in cfg["Env"] and "AGENTBOX_REAL_PODMAN=/usr/bin/podman" in cfg["Env"]


def test_exactly_one_executable_guest_init_in_the_store(built: BuildResult) -> None:
    found = sh(built.tag, "find /nix/store -path '/nix/store/*/bin/agentbox-guest-init' -type f -perm -u+x")
    paths = found.split()
    assert len(paths) == 1, found
    assert paths[0].startswith("/nix/store/") and "-agentbox-guest-init-" in paths[0]
    assert sh(built.tag, "readlink /bin/agentbox-guest-init").strip() == paths[0]


def test_stable_path_runs_guest_init(built: BuildResult) -> None:
    proc = podman_run(built.tag, "--help", entrypoint="/bin/agentbox-guest-init")
    assert proc.returncode == 0, proc.stderr
    assert "usage: agentbox-guest-init" in proc.stdout and "libkrun" in proc.stdout


def test_kernel_and_its_modules(built: BuildResult) -> None:
    out = sh(built.tag, "for k in /boot/vmlinuz-*; do v=${k#/boot/vmlinuz-}; "
                        "test -s /lib/modules/$v/modules.dep && echo ok $v; "
                        "grep -c btrfs /lib/modules/$v/modules.dep; done")
    assert out.startswith("ok "), out
    assert int(out.split()[2]) >= 1, out


def test_tools_the_guest_needs(built: BuildResult) -> None:
    out = sh(built.tag, "python3 --version && podman --version && nix-daemon --version && btrfs --version "
                        "&& fuse-overlayfs --version >/dev/null && runc --version >/dev/null "
                        "&& busybox true && mkfs.btrfs --version >/dev/null && socat -V >/dev/null "
                        "&& command -v newuidmap pasta slirp4netns blkid findmnt modprobe fish")
    assert "Python 3.11" in out and "podman version" in out and "nix-daemon (Nix)" in out, out


def test_users_wrappers_and_scripts(built: BuildResult) -> None:
    out = sh(built.tag, "getent passwd dev; getent group dev; getent group nixbld; "
                        "id -nG nixbld1; wc -c </etc/machine-id; "
                        "ls /usr/local/bin; ls /bin/agentbox-nix-sidecar-entrypoint /bin/agentbox-sidecar-proxy")
    lines = out.splitlines()
    assert lines[0] == "dev:x:1000:1000::/home/dev:/usr/bin/fish"
    assert lines[1].startswith("dev:x:1000:")
    assert lines[2].startswith("nixbld:x:30000:") and "nixbld1" in lines[2]
    assert lines[3] == "nixbld"
    assert lines[4] == "0"
    for wrapper in (recipe.guest_init_dir() / "wrappers").iterdir():
        assert wrapper.name in lines
    assert "/bin/agentbox-sidecar-proxy" in lines


def test_second_build_is_a_no_op(built: BuildResult) -> None:
    again = build()
    assert again.up_to_date and not again.built_base and not again.built_final
    assert (again.recipe_hash, again.guest_init_hash) == (built.recipe_hash, built.guest_init_hash)


def test_cli_reports_up_to_date(built: BuildResult) -> None:
    proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "image", "build"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{built.tag} is up to date (base {built.base_tag})"


@pytest.fixture()
def scratch_tag() -> Iterator[str]:
    tag = "localhost/agentbox-test-guest-init-only:latest"
    yield tag
    subprocess.run(["podman", "rmi", "--force", tag], capture_output=True, timeout=120, check=False)


def test_guest_init_only_redoes_just_the_final_layer(built: BuildResult, scratch_tag: str) -> None:
    result = build(scratch_tag, guest_init_only=True)
    assert result.built_final and not result.built_base
    assert result.base_tag == built.base_tag
    base_layers = inspect(built.base_tag)["RootFS"]["Layers"]
    layers = inspect(scratch_tag)["RootFS"]["Layers"]
    assert layers[:len(base_layers)] == base_layers and len(layers) == len(base_layers) + 1
    proc = podman_run(scratch_tag, "--help", entrypoint="/bin/agentbox-guest-init")
    assert proc.returncode == 0, proc.stderr
    assert build(scratch_tag, guest_init_only=True).up_to_date


def test_guest_init_only_without_a_base_fails_clearly(built: BuildResult, scratch_tag: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipe, "BASE_REPO", "localhost/agentbox-base-missing-for-test")
    with pytest.raises(AgentboxError) as err:
        build(scratch_tag, guest_init_only=True)
    assert str(err.value) == (
        f"image build --guest-init-only needs the base image localhost/agentbox-base-missing-for-test:"
        f"{built.recipe_hash[:16]}, which does not exist; run 'agentbox image build' once without "
        "--guest-init-only")
    assert subprocess.run(["podman", "image", "exists", scratch_tag], timeout=60).returncode == 1


def test_concurrent_builds_build_once(built: BuildResult, scratch_tag: str) -> None:
    argv = [sys.executable, "-m", "agentbox_runtime.cli", "image", "build", "--guest-init-only", "--tag", scratch_tag]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = sorted(out.strip() for out, _ in outs)
    assert lines[0].startswith(f"{scratch_tag} built (guest_init layer) in "), lines
    assert lines[1] == f"{scratch_tag} is up to date (base {built.base_tag})", lines
