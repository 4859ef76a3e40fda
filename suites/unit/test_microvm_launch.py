"""The launch config of reference 9.7 built from options: env order, argv, disks, sizes, file mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agentbox_guest_init.launch_config import LaunchDisk, decode
from agentbox_runtime.microvm.task import MicrovmOptions, MicrovmTask, build_launch, host_ids
from agentbox_runtime.guest_resources import default_cpus
from agentbox_runtime.state import StateLayout

BASE_ENV = ["AGENTBOX_HOST_UID={uid}", "AGENTBOX_HOST_GID={gid}", "AGENTBOX_KVM_DROP_TO_DEV=1",
            "AGENTBOX_MICROVM_WORKSPACE_TAG=agentbox-workspace", "AGENTBOX_MICROVM_WORKSPACE_TARGET=/workspace"]
DISK_ENV = ["AGENTBOX_LIBKRUN_NIX_OVERLAY=1", "AGENTBOX_LIBKRUN_NIX_DISK_ID=agentbox-nix",
            "AGENTBOX_LIBKRUN_NIX_DISK_LABEL=AGENTBOX_NIX", "AGENTBOX_LIBKRUN_CONTAINERS_STORAGE=1",
            "AGENTBOX_LIBKRUN_CONTAINERS_DISK_ID=agentbox-containers",
            "AGENTBOX_LIBKRUN_CONTAINERS_DISK_LABEL=AGENTBOX_CONTAINERS"]
EXEC = "/nix/store/x-agentbox/bin/agentbox-guest-init"


@pytest.fixture()
def layout(tmp_path: Path) -> StateLayout:
    ws = tmp_path / "project"
    ws.mkdir()
    return StateLayout.under(tmp_path / "state", ws)


def expected_env(layout: StateLayout, middle: list[str], tail: list[str]) -> list[str]:
    uid, gid = host_ids(layout.workspace)
    return [e.format(uid=uid, gid=gid) for e in BASE_ENV] + middle + DISK_ENV + tail


def test_libkrun_defaults(layout: StateLayout) -> None:
    opts = MicrovmOptions(workspace=layout.workspace)
    cfg = build_launch(opts, Path("/t/rootfs-reflink"), EXEC, layout, "libkrun")
    assert list(cfg.env) == expected_env(layout, [], [])
    assert cfg.argv == ("agentbox-guest-init", "microvm", "enter", "--", "fish", "-l")
    assert (cfg.ram_mib, cfg.vcpus) == (4096, default_cpus())
    assert (cfg.workdir, cfg.workspace_tag, cfg.workspace_target) == ("/workspace", "agentbox-workspace", "/workspace")
    assert cfg.workspace_source == str(layout.workspace) and cfg.exec_path == EXEC
    assert cfg.disks == (LaunchDisk("agentbox-nix", str(layout.state_root / "microvm-nix.raw")),
                         LaunchDisk("agentbox-containers", str(layout.state_root / "microvm-containers.raw")))


def test_flags_in_reference_order_and_qemu_9p(layout: StateLayout) -> None:
    opts = MicrovmOptions(workspace=layout.workspace, root=True, profile=True, debug=True, memory_mib=2048, cpus=1,
                          command=("sh", "-c", "echo ok; exit 3"))
    cfg = build_launch(opts, Path("/t/r"), EXEC, layout, "qemu")
    assert list(cfg.env) == expected_env(
        layout, ["AGENTBOX_ENTER_AS_ROOT=1", "AGENTBOX_GUEST_PROFILE=1", "AGENTBOX_GUEST_DEBUG=1"],
        ["AGENTBOX_MICROVM_WORKSPACE_FSTYPE=9p"])
    assert cfg.argv == ("agentbox-guest-init", "microvm", "enter", "--", "sh", "-c", "echo ok; exit 3")
    assert (cfg.ram_mib, cfg.vcpus) == (2048, 1)


def test_root_host_user_maps_to_workspace_owner_or_1000(layout: StateLayout, tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("the root fallback applies only when the host user is root")
    assert host_ids(layout.workspace) == (1000, 1000)
    owned = tmp_path / "owned"
    owned.mkdir()
    os.chown(owned, 1234, 1235)
    assert host_ids(owned) == (1234, 1235)


def test_launch_conf_written_0600_and_decodes(layout: StateLayout) -> None:
    task = MicrovmTask(MicrovmOptions(workspace=layout.workspace, extra_env=("FOO=bar",)))
    task.task_dir = layout.microvm_tasks_dir / "t1"
    task.vmm = "libkrun"
    cfg = task._write_launch(layout, Path("/t/r"), EXEC)
    path = task.task_dir / "launch.conf"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert decode(path.read_text()) == cfg and cfg.env[-1] == "FOO=bar"
