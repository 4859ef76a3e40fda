"""The reapers act only on what is really ours: planted records, symlinked parents, other users'
files and other runs sharing a state dir are left alone."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from agentbox_harness.run_reaper import RunRegistry, leaks, reap
from agentbox_runtime.config import parse_config
from agentbox_runtime.errors import InputError
from agentbox_runtime.microvm import task_reaper as vm_reaper
from agentbox_runtime.state import StateLayout

DEAD_OWNER = {"owner": 999_999_999, "owner_start": "1", "pid": None, "pgid": None, "start": None}


def layout(base: Path) -> StateLayout:
    app = base / "agentbox"
    app.mkdir(parents=True, exist_ok=True)
    return StateLayout(app, app.name, app, app)


def plant(lay: StateLayout, name: str, task_dir: Path, **extra: object) -> Path:
    running = lay.app_dir / "microvm" / "running"
    running.mkdir(parents=True, exist_ok=True)
    rec = running / f"{name}.json"
    rec.write_text(json.dumps({**DEAD_OWNER, "task_dir": str(task_dir), "run_label": "dead", **extra}))
    return rec


def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim" / ".ssh"
    v.mkdir(parents=True)
    (v / "id_ed25519").write_text("secret")
    return v


def test_a_record_through_a_symlinked_parent_deletes_nothing(tmp_path: Path) -> None:
    lay = layout(tmp_path / "state")
    v = victim(tmp_path)
    (lay.app_dir / "ws").mkdir()
    (lay.app_dir / "ws" / "microvm-tasks").symlink_to(v.parent)
    plant(lay, ".ssh", lay.app_dir / "ws" / "microvm-tasks" / ".ssh")
    vm_reaper.reap_stale(lay)
    assert (v / "id_ed25519").read_text() == "secret"


def test_a_record_naming_a_dir_outside_the_state_tree_deletes_nothing(tmp_path: Path) -> None:
    lay = layout(tmp_path / "state")
    v = victim(tmp_path)
    plant(lay, "x", lay.app_dir / "ws" / "microvm-tasks" / ".." / ".." / ".." / ".." / "victim" / ".ssh")
    plant(lay, "y", v)
    vm_reaper.reap_stale(lay)
    assert (v / "id_ed25519").read_text() == "secret"


def test_a_real_task_dir_is_reaped(tmp_path: Path) -> None:
    lay = layout(tmp_path / "state")
    task = lay.app_dir / "ws" / "microvm-tasks" / "ws-1"
    task.mkdir(parents=True)
    rec = plant(lay, "ws-1", task)
    assert vm_reaper.reap_stale(lay) == [str(task)]
    assert not task.exists() and not rec.exists()


def test_records_owned_by_another_user_are_ignored(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a record owned by another user")
    lay = layout(tmp_path / "state")
    task = lay.app_dir / "ws" / "microvm-tasks" / "ws-1"
    task.mkdir(parents=True)
    rec = plant(lay, "ws-1", task)
    os.chown(rec, 4242, 4242)
    assert vm_reaper.records(lay) == []
    assert vm_reaper.reap_stale(lay) == [] and task.exists()


def _registry(tmp_path: Path, label: str, base: Path) -> RunRegistry:
    reg = RunRegistry(tmp_path / f"{label}.json", label, roots=[str(tmp_path / f"{label}-root")],
                      state_bases=[str(base)])
    return reg


def test_leaks_count_only_this_runs_tasks_in_a_shared_state_dir(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    lay = layout(shared)
    mine = lay.app_dir / "ws" / "microvm-tasks" / "ws-mine"
    theirs = lay.app_dir / "ws" / "microvm-tasks" / "ws-theirs"
    for d in (mine, theirs):
        d.mkdir(parents=True)
    plant(lay, "ws-mine", mine, run_label="me")
    plant(lay, "ws-theirs", theirs, run_label="other", owner=os.getpid(),
          owner_start=vm_reaper.start_time(os.getpid()))
    assert leaks(_registry(tmp_path, "me", shared)) == [f"task dir {mine}"]


def test_reaping_a_dead_run_leaves_another_runs_mounts_in_a_shared_state_dir(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    shared = tmp_path / "shared"
    lay = layout(shared)
    live_mount = lay.app_dir / "ws" / "microvm-tasks" / "ws-live" / "rootfs-fuse-overlay"
    live_mount.mkdir(parents=True)
    plant(lay, "ws-live", live_mount.parent, run_label="live", owner=os.getpid(),
          owner_start=vm_reaper.start_time(os.getpid()))
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(live_mount)], check=True, timeout=30)
    try:
        reap(_registry(tmp_path, "dead", shared))
        assert os.path.ismount(live_mount)
    finally:
        subprocess.run(["umount", str(live_mount)], capture_output=True, timeout=30)


def test_a_state_location_others_can_write_is_refused(tmp_path: Path) -> None:
    loc = tmp_path / "loc"
    loc.mkdir()
    os.chmod(loc, 0o777)
    with pytest.raises(InputError, match="writable by group or others .mode 777."):
        parse_config(f'[state]\nlocation = "{loc}"\n', tmp_path / "agentbox.toml")


def test_a_state_location_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a dir owned by another user")
    loc = tmp_path / "loc"
    loc.mkdir(mode=0o755)
    os.chown(loc, 4242, 4242)
    with pytest.raises(InputError, match="owned by uid 4242"):
        parse_config(f'[state]\nlocation = "{loc}"\n', tmp_path / "agentbox.toml")
