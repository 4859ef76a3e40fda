"""Fixtures shared by the test tiers under ``suites/``.

- ``podman_env``: the environment for real ``podman`` calls on this host (the
  harness ``containers.conf`` with runc and ulimits the host allows); skips
  with the install hint when podman is missing.
- ``annotated_container``: starts long-running containers carrying given
  ``--annotation`` values (for the live-disk probe), labelled with the
  harness run label, and always removes what it started.
- ``loop_mount``: mount a disk image on a loop device; always unmounted (which
  also frees the loop device) after the test, even on failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agentbox_guest_init.contract import LABEL_HARNESS_RUN

TOOL_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def podman_env() -> dict[str, str]:
    """Environment for real podman calls; skips when podman is not installed."""
    if shutil.which("podman") is None:
        pytest.skip("needs podman: apt-get install podman")
    from agentbox_runtime.container import host_conf

    return dict(os.environ, **{host_conf.ENV: str(host_conf.ensure())})


class AnnotatedContainers:
    """Running ``sleep`` containers with chosen annotations, labelled for this test."""

    def __init__(self, env: dict[str, str], image: str) -> None:
        self.env, self.image = env, image
        self.label = f"{LABEL_HARNESS_RUN}=pytest-{uuid.uuid4().hex[:10]}"
        self.started: list[str] = []

    def start(self, annotations: dict[str, str]) -> str:
        """Start one; return its short (12 hex) id."""
        argv = ["podman", "run", "-d", "--runtime", "runc", "--label", self.label]
        for key, value in annotations.items():
            argv += ["--annotation", f"{key}={value}"]
        proc = subprocess.run([*argv, self.image, "sleep", "600"], env=self.env,
                              capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            pytest.fail(f"podman run failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
        self.started.append(proc.stdout.strip()[:12])
        return self.started[-1]

    def stop(self, cid: str) -> None:
        """Remove one now (``podman rm -f``)."""
        proc = subprocess.run(["podman", "rm", "-f", "-t", "0", cid], env=self.env,
                              capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            pytest.fail(f"podman rm {cid} failed: {proc.stderr.strip()}")

    def remove_all(self) -> None:
        """Remove everything started (teardown; errors ignored)."""
        for cid in self.started:
            subprocess.run(["podman", "rm", "-f", "-t", "0", cid], env=self.env,
                           capture_output=True, timeout=TOOL_TIMEOUT_S, check=False)


@pytest.fixture()
def annotated_container(podman_env: dict[str, str]) -> Iterator[AnnotatedContainers]:
    """Start containers with given annotations (``.start({...})``); all removed afterwards."""
    from suites.integration.container_test_image import build_test_image

    containers = AnnotatedContainers(podman_env, build_test_image())
    try:
        yield containers
    finally:
        containers.remove_all()


@pytest.fixture()
def loop_mount(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """``mount(image) -> mount point`` on a loop device; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("loop mounts need root on the host")
    mounts: list[Path] = []

    def mount(image: Path) -> Path:
        target = tmp_path / f"mnt{len(mounts)}"
        target.mkdir()
        proc = subprocess.run(["mount", "-o", "loop", str(image), str(target)], capture_output=True,
                              text=True, timeout=TOOL_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            pytest.fail(f"mount -o loop {image} failed: {proc.stderr.strip()}")
        mounts.append(target)
        return target

    yield mount
    for target in reversed(mounts):
        if os.path.ismount(target):
            subprocess.run(["umount", str(target)], capture_output=True, timeout=TOOL_TIMEOUT_S,
                           check=False)


@pytest.fixture(scope="session")
def libkrun_standin() -> Path:
    """The QEMU-backed libkrun stand-in (``suites/standins/libkrun``), compiled once; skips without cc."""
    from suites.standins.libkrun.build import StandinBuildError, build

    try:
        return build()
    except StandinBuildError as exc:
        pytest.skip(f"cannot build the libkrun stand-in: {exc}")


VM_BACKENDS = ("qemu", "krun-direct")
"""The microvm backends the VM tiers run on: qemu, and krun-direct through the libkrun stand-in."""


@pytest.fixture(params=VM_BACKENDS)
def vm_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each microvm backend in turn; for krun-direct, AGENTBOX_LIBKRUN_LIBRARY is the stand-in, counted
    as krun-direct under --agentbox-strict (AGENTBOX_ALLOW_STANDINS=1) because it is chosen on purpose."""
    if request.param == "krun-direct":
        monkeypatch.setenv("AGENTBOX_LIBKRUN_LIBRARY", str(request.getfixturevalue("libkrun_standin")))
        monkeypatch.setenv("AGENTBOX_ALLOW_STANDINS", "1")
    return str(request.param)
