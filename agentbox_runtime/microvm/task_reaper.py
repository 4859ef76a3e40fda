"""Process safety for microvm tasks: every VM process is recorded with its task dir,
and what a dead run left behind (processes, fuse mounts, snapshots, task dirs) is
reaped by the next run. Only recorded things are touched.

Records live in ``<app>/microvm/running/<task id>.json``.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.processes import same_process, start_time
from agentbox_runtime.state import StateLayout
from agentbox_runtime.microvm.storage import reset_task_dir
from agentbox_runtime.vmm.shutdown import stop

REAP_STOP_S = 6.0
"""A dead run's VMM: SIGTERM, then SIGKILL, within about this many seconds (no guest to ask)."""

__all__ = ["forget", "managed_task_dir", "reap_stale", "record", "records", "same_process", "start_time"]


def _dir(layout: StateLayout) -> Path:
    d = layout.app_dir / "microvm" / "running"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def record(layout: StateLayout, task_dir: Path, pid: int | None, run_label: str | None) -> Path:
    """Record a task dir (``pid`` None: before the VM starts) or its started VM process, and who owns it."""
    path = _dir(layout) / f"{task_dir.name}.json"
    path.write_text(json.dumps({"pid": pid, "pgid": None if pid is None else _pgid(pid),
                                "start": None if pid is None else start_time(pid), "owner": os.getpid(),
                                "owner_start": start_time(os.getpid()), "task_dir": str(task_dir),
                                "run_label": run_label, "recorded_at": time.time()}))
    return path


def forget(layout: StateLayout, task_dir: Path) -> None:
    (_dir(layout) / f"{task_dir.name}.json").unlink(missing_ok=True)


def records(layout: StateLayout) -> list[dict[str, object]]:
    """The task records under ``layout`` that are regular files owned by us (anything else is ignored)."""
    out = []
    for p in sorted(_dir(layout).glob("*.json")):
        try:
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > 65536:
                continue
            data = json.loads(p.read_text())
            data["_file"] = str(p)
            out.append(data)
        except (OSError, ValueError):
            continue
    return out


def managed_task_dir(layout: StateLayout, task_dir: Path) -> bool:
    """Whether ``task_dir`` really is one of ours: ``<app>/<slug>/microvm-tasks/<id>`` with no symlink
    below the app dir (checked component by component, and by real path), a directory owned by us. A
    planted record naming anything else is never acted on."""
    try:
        rel = Path(os.path.abspath(task_dir)).relative_to(os.path.abspath(layout.app_dir))
    except ValueError:
        return False
    if len(rel.parts) != 3 or rel.parts[1] != "microvm-tasks" or ".." in rel.parts:
        return False
    current = Path(os.path.abspath(layout.app_dir))
    for part in rel.parts:
        current = current / part
        try:
            st = os.lstat(current)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return False
    return Path(os.path.realpath(task_dir)).is_relative_to(os.path.realpath(layout.app_dir))


def reap_stale(layout: StateLayout, *, include_label: str | None = None) -> list[str]:
    """Reap tasks whose owner process is gone (or whose run label is ``include_label``).

    Returns the task dirs reaped."""

    reaped = []
    for rec in records(layout):
        owner_gone = not same_process(int(str(rec["owner"])), rec.get("owner_start"))
        if not owner_gone and not (include_label and rec.get("run_label") == include_label):
            continue
        pid = rec.get("pid")
        if isinstance(pid, int) and same_process(pid, rec.get("start")):
            # a VM in its own process group: signal the whole group; the one ladder, short rungs
            try:
                stop(pid, start=rec.get("start"), own_group=rec.get("pgid") == pid, timeout=REAP_STOP_S)
            except AgentboxError:
                continue  # survived SIGKILL (uninterruptible): keep the record for the next run

        task_dir = Path(str(rec["task_dir"]))
        if managed_task_dir(layout, task_dir):
            reset_task_dir(task_dir)
        Path(str(rec["_file"])).unlink(missing_ok=True)
        reaped.append(str(task_dir))
    return reaped
