"""qemu guests restored from a snapshot template (:mod:`agentbox_runtime.vmm.snapshot`, issue 27).

What a restore must never share between guests, on real restores: three guests of one template draw
different random bytes from their first read, read the host's clock (the template is saved with
its clock 25 years off, so a guest that was not stepped fails), and have their own instance-id and
machine-id; their kernel ``boot_id`` differs only because nothing reads it before the template is
saved (nothing may tell guests apart by it). A template whose saved state is damaged is removed
and the guest boots cold. The harness restores qemu guests unless a test is marked ``cold_boot``.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentbox_guest_init import contract
from agentbox_guest_init.launch_config import LaunchConfig, LaunchDisk
from agentbox_harness.backends import MicrovmMachine
from agentbox_harness.machine import BOOTS
from agentbox_runtime.microvm.image_cache import validate_rootfs
from agentbox_runtime.retry import retry
from agentbox_runtime.vmm import snapshot
from agentbox_runtime.vmm.base import VmSpec
from agentbox_runtime.vmm.qemu import QemuHandle

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.needs_root]

IMAGE = "localhost/agentbox:latest"
SKEWED_RTC = "2001-01-01T00:00:00"
PROBE = ("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; cat /run/agentbox/instance-id; "
         "cat /proc/sys/kernel/random/boot_id; cat /etc/machine-id; cat /sys/block/vda/serial")


@dataclass
class Image:
    rootfs: Path
    digest: str


@pytest.fixture
def image(agentbox_image: str) -> Iterator[Image]:
    """The harness image's rootfs (``podman image mount``) and digest."""
    out = subprocess.run(["podman", "image", "mount", agentbox_image], capture_output=True, text=True, timeout=300,
                         check=True)
    digest = subprocess.run(["podman", "image", "inspect", "-f", "{{.Id}}", agentbox_image], capture_output=True,
                            text=True, timeout=60, check=True).stdout.strip()
    yield Image(Path(out.stdout.strip()), f"sha256:{digest}")


def driver(img: Image, cache: Path, rtc_base: str | None = None) -> snapshot.SnapshotDriver:
    return snapshot.SnapshotDriver(image_rootfs=img.rootfs, image_digest=img.digest,
                                   guest_init=validate_rootfs(img.rootfs), rtc_base=rtc_base, cache=cache)


def probe_launch(img: Image, tmp: Path, name: str) -> LaunchConfig:
    ws = tmp / f"ws-{name}"
    ws.mkdir()
    disk = tmp / f"{name}.img"
    subprocess.run(["truncate", "-s", "64M", str(disk)], check=True)
    return LaunchConfig(
        task_rootfs=str(img.rootfs), workspace_source=str(ws), workspace_tag=contract.WORKSPACE_TAG,
        workspace_target="/workspace", ram_mib=1024, vcpus=1, workdir="/", exec_path="/bin/sh",
        disks=(LaunchDisk(f"probe-{name}", str(disk)),),
        argv=("sh", "-c", f"mkdir -p /workspace && mount -t 9p -o trans=virtio {contract.WORKSPACE_TAG} /workspace "
                          f"&& ({PROBE}) > /workspace/probe.tmp && mv /workspace/probe.tmp /workspace/probe"))


def run_probe(drv: snapshot.SnapshotDriver, cfg: LaunchConfig, task: Path) -> tuple[QemuHandle, list[str]]:
    """Start a guest of ``cfg`` and return its handle and the probe's lines."""
    handle = drv.start(VmSpec(rootfs=Path(cfg.task_rootfs), launch=cfg, task_dir=task, accel="tcg"))
    out = Path(cfg.workspace_source) / "probe"
    try:
        retry(lambda _last: out.exists(), timeout=240, interval=0.1,
              describe=lambda: f"no probe output; console:\n{handle.console_log.read_text(errors='replace')[-2000:]}")
        return handle, out.read_text().splitlines()
    finally:
        handle.kill()


def test_restored_guests_share_no_randomness_clock_or_identity(image: Image, tmp_path: Path) -> None:
    drv = driver(image, tmp_path / "snapshots", rtc_base=SKEWED_RTC)
    a_handle, a = run_probe(drv, probe_launch(image, tmp_path, "a"), tmp_path / "task-a")
    before_b = time.time()
    b_handle, b = run_probe(drv, probe_launch(image, tmp_path, "b"), tmp_path / "task-b")
    after_b = time.time()
    c_handle, c = run_probe(drv, probe_launch(image, tmp_path, "c"), tmp_path / "task-c")
    assert (a_handle.boot, b_handle.boot, c_handle.boot) == ("restore",) * 3, drv.fallback
    random_a, _, instance_a, boot_a, machine_a, serial_a = a
    random_b, clock_b, instance_b, boot_b, machine_b, serial_b = b
    # three guests: with the reseed switched off, two of three drew the same bytes in a trial run
    assert len(random_a) == 64 and len({random_a, random_b, c[0]}) == 3
    # the template's clock started in 2001: only a stepped clock reads the host's time
    assert before_b - 5 <= int(clock_b) <= after_b + 5
    assert instance_a != instance_b and machine_a != machine_b
    # the kernel draws boot_id at its first read; nothing reads it before the template is saved, so
    # each guest draws its own after the reseed (a template that read it would share it: nothing
    # relies on boot_id, instance-id is the contract)
    assert boot_a != boot_b
    assert (serial_a, serial_b) == ("probe-a", "probe-b"), "the hot-added disk is vda with its own serial"


def test_a_damaged_template_is_removed_and_the_guest_boots_cold(image: Image, tmp_path: Path) -> None:
    drv = driver(image, tmp_path / "snapshots")
    cfg = probe_launch(image, tmp_path, "c")
    template = snapshot.ensure(drv.inputs(VmSpec(rootfs=image.rootfs, launch=cfg, task_dir=tmp_path / "t",
                                                 accel="tcg")), tmp_path / "snapshots")
    with open(template.state, "r+b") as state:
        state.truncate(4096)
    task = tmp_path / "task-c"
    handle = drv.start(VmSpec(rootfs=image.rootfs, launch=cfg, task_dir=task, accel="tcg"))
    try:
        assert handle.boot == "cold" and drv.fallback
        assert not template.directory.exists()
    finally:
        handle.kill()


@pytest.mark.cold_boot
def test_the_cold_boot_marker_boots_cold(microvm_factory: object, agentbox_backend: str) -> None:
    if agentbox_backend != "qemu":
        pytest.skip("snapshot restore is the qemu backend's")
    before = dict(BOOTS)
    m = microvm_factory()  # type: ignore[operator]
    assert isinstance(m, MicrovmMachine) and m.boot == "cold"
    assert (BOOTS["cold"], BOOTS["restore"]) == (before["cold"] + 1, before["restore"])  # the smoke summary's counts
    assert m.succeed("test -b /dev/vda && findmnt -no FSTYPE /", timeout=60).strip() == "9p"


def test_harness_qemu_guests_restore_by_default(microvm_factory: object, agentbox_backend: str) -> None:
    if agentbox_backend != "qemu":
        pytest.skip("snapshot restore is the qemu backend's")
    before = dict(BOOTS)
    m = microvm_factory()  # type: ignore[operator]
    assert isinstance(m, MicrovmMachine) and m.boot == "restore"
    assert (BOOTS["cold"], BOOTS["restore"]) == (before["cold"], before["restore"] + 1)
    assert m.succeed("findmnt -no FSTYPE /", timeout=60).strip() == "overlay"
    assert m.succeed("findmnt -no SOURCE /run/agentbox/nix-disk", timeout=60).strip() == "/dev/vda"
