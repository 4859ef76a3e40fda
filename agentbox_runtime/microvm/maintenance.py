"""The resize guest step as a one-shot microvm (the qemu/libkrun counterpart of reference 6.4).

Boots the workspace's microvm with ``agentbox-guest-init libkrun resize
--target <disk>`` as root, background prep switched off, and returns its
exit status to :func:`agentbox_runtime.resize.resize`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init.launch_config import decode
from agentbox_runtime.live_disks import same_file
from agentbox_runtime.microvm.task_reaper import records
from agentbox_runtime.processes import same_process
from agentbox_runtime.microvm.task import MicrovmOptions, MicrovmTask
from agentbox_runtime.resize import ResizePlan
from agentbox_runtime.state import StateLayout

RESIZE_TIMEOUT_S = 600.0


class MicrovmResizeRunner:
    """A :class:`agentbox_runtime.resize.MaintenanceRunner` that boots a microvm for the guest step."""

    def __init__(self, options: MicrovmOptions, extra_env: tuple[str, ...] = ()) -> None:
        self.options, self.extra_env = options, extra_env

    def run(self, plan: ResizePlan) -> int:
        opts = replace(self.options, command=("agentbox-guest-init", "libkrun", "resize", "--target", plan.disk.spec.key),
                       root=True, interactive=False,
                       extra_env=(f"{c.ENV_NIX_OVERLAY}=0", f"{c.ENV_CONTAINERS_STORAGE}=0", *self.extra_env))
        with MicrovmTask(opts) as task:
            return task.wait(RESIZE_TIMEOUT_S)


def live_users(layout: StateLayout, disk_path: Path) -> list[str]:
    """Running microvm tasks (recorded by this harness) whose launch config attaches ``disk_path``."""
    users = []
    for rec in records(layout):
        if not isinstance(rec["pid"], int) or not same_process(rec["pid"], rec.get("start")):
            continue
        conf = Path(str(rec["task_dir"])) / "launch.conf"
        try:
            cfg = decode(conf.read_text())
        except (OSError, ValueError):
            continue
        if any(same_file(d.path, disk_path) for d in cfg.disks):
            users.append(f"microvm task {Path(str(rec['task_dir'])).name} (pid {rec['pid']})")
    return users
