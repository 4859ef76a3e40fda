"""Task rootfs backends on real file systems (reference 9.5) and stale-task reaping.

btrfs-snapshot and reflink run on a loop-mounted btrfs; fuse-overlay and the
failure cases run on the plain tmp file system."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from microvm_helpers import loop_btrfs, need_root_and, run

from agentbox_runtime.errors import AgentboxError, error_chain
from agentbox_runtime.microvm import storage
from agentbox_runtime.microvm.task_reaper import record, records, reap_stale
from agentbox_runtime.state import StateLayout

REPO = Path(__file__).resolve().parents[2]


def fill(root: Path) -> Path:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "hostname").write_text("cache\n")
    (root / "bin").mkdir(exist_ok=True)
    (root / "bin" / "tool").write_bytes(b"\x7fELF" + b"x" * 65536)
    return root


@pytest.fixture()
def btrfs(tmp_path: Path) -> Iterator[Path]:
    with loop_btrfs(tmp_path) as mnt:
        yield mnt


@pytest.fixture()
def btrfs_source(btrfs: Path) -> Path:
    src = btrfs / "cache-rootfs"
    run(["btrfs", "subvolume", "create", str(src)])
    return fill(src)


def assert_isolated(handle: storage.TaskRootfs, src: Path) -> None:
    assert (handle.root / "etc" / "hostname").read_text() == "cache\n"
    (handle.root / "etc" / "hostname").write_text("task\n")
    assert (src / "etc" / "hostname").read_text() == "cache\n"


def test_btrfs_snapshot(btrfs_source: Path, btrfs: Path) -> None:
    task = btrfs / "tasks" / "t1"
    handle = storage.materialize("btrfs-snapshot", btrfs_source, task)
    assert (handle.mode, handle.root) == ("btrfs-snapshot", task / "rootfs-btrfs-snapshot")
    run(["btrfs", "subvolume", "show", str(handle.root)])
    assert_isolated(handle, btrfs_source)
    handle.unmount()
    handle.cleanup()
    assert not task.exists() and btrfs_source.is_dir()


def test_auto_prefers_btrfs_snapshot(btrfs_source: Path, btrfs: Path) -> None:
    handle = storage.materialize("auto", btrfs_source, btrfs / "tasks" / "t2")
    assert handle.mode == "btrfs-snapshot"
    handle.cleanup()


def test_reflink_on_btrfs(btrfs_source: Path, btrfs: Path) -> None:
    task = btrfs / "tasks" / "t3"
    handle = storage.materialize("reflink", btrfs_source, task)
    assert handle.mode == "reflink" and (handle.root / "bin" / "tool").read_bytes() == \
        (btrfs_source / "bin" / "tool").read_bytes()
    assert_isolated(handle, btrfs_source)
    handle.cleanup()
    assert not task.exists()


def test_btrfs_snapshot_of_plain_dir_fails_without_fallback(tmp_path: Path) -> None:
    need_root_and("btrfs")
    src = fill(tmp_path / "plain")
    task = tmp_path / "tasks" / "t4"
    with pytest.raises(AgentboxError) as err:
        storage.materialize("btrfs-snapshot", src, task)
    chain = error_chain(err.value)
    assert chain.startswith(f"failed to materialize microvm task rootfs with btrfs snapshot from '{src}'; refresh "
                            "the microvm image cache if this cache entry was created before btrfs snapshot support")
    assert "buildah unshare btrfs subvolume snapshot failed from" in chain
    assert not task.exists()


def test_fuse_overlay_and_auto_fallback(tmp_path: Path) -> None:
    need_root_and("fuse-overlayfs", "fusermount3")
    src = fill(tmp_path / "plain")
    task = tmp_path / "tasks" / "t5"
    handle = storage.materialize("auto", src, task)  # not a subvolume: btrfs-snapshot fails, fuse-overlay follows
    try:
        assert handle.mode == "fuse-overlay" and storage.is_mounted(handle.root)
        assert_isolated(handle, src)
        assert (task / "upper-fuse-overlay" / "etc" / "hostname").read_text() == "task\n"
    finally:
        handle.unmount()
    assert not storage.is_mounted(handle.root)
    handle.cleanup()
    assert not task.exists() and (src / "etc" / "hostname").is_file()


def test_unmount_failure_keeps_task_dir(tmp_path: Path) -> None:
    need_root_and("fuse-overlayfs", "fusermount3")
    src = fill(tmp_path / "plain")
    task = tmp_path / "tasks" / "t6"
    handle = storage.materialize("fuse-overlay", src, task)
    busy = subprocess.Popen(["sleep", "60"], cwd=handle.root)
    try:
        with pytest.raises(AgentboxError) as err:
            handle.unmount()
        assert str(err.value).startswith(f"failed to unmount fuse-overlayfs task rootfs '{handle.root}': fusermount3: ")
        assert "; fusermount: " in str(err.value) and "; umount: " in str(err.value)
        assert task.is_dir()
    finally:
        busy.kill()
        busy.wait(30)
        handle.unmount()
    handle.cleanup()


def test_reap_stale_removes_only_what_dead_runs_recorded(tmp_path: Path) -> None:
    need_root_and("fuse-overlayfs", "fusermount3")
    ws = tmp_path / "ws"
    ws.mkdir()
    layout = StateLayout.under(tmp_path / "state", ws).ensure()
    src = fill(tmp_path / "plain")
    dead_task = layout.microvm_tasks_dir / "dead-run"
    live_task = layout.microvm_tasks_dir / "live-run"
    stranger = layout.microvm_tasks_dir / "not-recorded"
    dead = storage.materialize("fuse-overlay", src, dead_task)
    storage.materialize("fuse-overlay", src, live_task)
    stranger.mkdir()
    vm = subprocess.Popen(["sleep", "300"], start_new_session=True)  # stands in for the dead run's VM process
    try:
        code = ("import sys; from pathlib import Path; from agentbox_runtime.microvm.task_reaper import record; "
                "from agentbox_runtime.state import StateLayout; "
                "record(StateLayout.under(Path(sys.argv[1]), Path(sys.argv[2])), Path(sys.argv[3]), int(sys.argv[4]), None)")
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "state"), str(ws), str(dead_task), str(vm.pid)],
                       cwd=REPO, check=True, timeout=60)
        record(layout, live_task, None, None)
        assert json.loads(Path(str(records(layout)[0]["_file"])).read_text())["pgid"] == vm.pid
        reaped = reap_stale(layout)
        assert reaped == [str(dead_task)]
        assert vm.wait(10) != 0
        assert not dead_task.exists() and not storage.is_mounted(dead.root)
        assert storage.is_mounted(live_task / "rootfs-fuse-overlay") and stranger.is_dir()
        assert [r["task_dir"] for r in records(layout)] == [str(live_task)]
    finally:
        vm.kill()
        storage.reset_task_dir(live_task)
        storage.reset_task_dir(dead_task)
