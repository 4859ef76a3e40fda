"""Supervisor behaviour (reference 9.1, 9.7): phase contexts, profile report, exit-code mapping,
cleanup and preserve notices, and failure before any VM starts."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from agentbox_runtime.errors import AgentboxError, InputError, error_chain
from agentbox_runtime.microvm import storage
from agentbox_runtime.microvm.image_cache import MARKER, ImageCache
from agentbox_runtime.microvm.task_reaper import records
from agentbox_runtime.microvm.task import MicrovmOptions, MicrovmTask, Phases, run_microvm
from agentbox_runtime.state import StateLayout
from agentbox_runtime.vmm.libkrun import LibkrunHandle

DIGEST = "sha256:" + "cd" * 32


def test_phase_failure_gets_context_and_keeps_cause() -> None:
    phases = Phases()

    def boom() -> None:
        raise AgentboxError("inner detail")

    with pytest.raises(AgentboxError) as err:
        phases.run("image_cache_ensure", "microvm image cache ingestion failed", boom)
    assert error_chain(err.value) == "microvm image cache ingestion failed: inner detail"
    assert [label for label, _ in phases.rows] == ["image_cache_ensure"]


def test_input_errors_pass_through_unwrapped() -> None:
    def bad() -> None:
        raise InputError("microvm guest-init override 'x' is not an executable regular file")

    with pytest.raises(InputError) as err:
        Phases().run("guest_init_resolution", "microvm guest-init resolution failed", bad)
    assert str(err.value).startswith("microvm guest-init override")


def test_profile_report_lists_storage_mode_rows_and_total() -> None:
    phases = Phases()
    phases.rows = [("image_reference_resolution", 1.0), ("image_cache_ensure", 2.5)]
    phases.storage_mode = "fuse-overlay"
    assert phases.report().splitlines() == [
        "agentbox microvm host profile", "  storage_mode: fuse-overlay",
        "  image_reference_resolution: 1.000ms", "  image_cache_ensure: 2.500ms",
        "  total_profiled_host_runtime: 3.500ms"]


@pytest.mark.parametrize(("script", "status"), [("exit 3", 3), ("exit 0", 0), ("kill -9 $$", 1)])
def test_helper_exit_status_mapping(tmp_path: Path, script: str, status: int) -> None:
    handle = LibkrunHandle(subprocess.Popen(["sh", "-c", script]), tmp_path)
    assert handle.wait(30) == status


def test_preserve_notice_and_cleanup(tmp_path: Path) -> None:
    layout = StateLayout.under(tmp_path / "state", tmp_path).ensure()
    task_dir = layout.microvm_tasks_dir / "t"
    (task_dir / "rootfs-reflink" / "etc").mkdir(parents=True)
    kept = MicrovmTask(MicrovmOptions(workspace=tmp_path, preserve_debug=True))
    kept.layout, kept.task_dir = layout, task_dir
    kept.rootfs = storage.TaskRootfs("reflink", task_dir / "rootfs-reflink", task_dir)
    kept.close()
    assert kept.notice == (f"agentbox: preserved microvm debug state: task_rootfs='{task_dir}/rootfs-reflink', "
                           f"task_state_dir='{task_dir}', launch_config='{task_dir}/launch.conf'")
    assert task_dir.is_dir()
    cleaned = MicrovmTask(MicrovmOptions(workspace=tmp_path))
    cleaned.layout, cleaned.task_dir = layout, task_dir
    cleaned.rootfs = storage.TaskRootfs("reflink", task_dir / "rootfs-reflink", task_dir)
    cleaned.close()
    cleaned.close()  # idempotent
    assert not task_dir.exists() and cleaned.notice is None
    assert [label for label, _ in cleaned.phases.rows] == ["task_rootfs_unmount", "task_state_cleanup"]


def test_materialization_failure_before_any_vm(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cached image (pinned digest) with --storage reflink on a file system without reflinks."""
    fstype = subprocess.run(["findmnt", "-no", "FSTYPE", "--target", str(tmp_path)], capture_output=True,
                            text=True, timeout=30).stdout.strip()
    if fstype in ("btrfs", "xfs"):
        pytest.skip(f"tmp_path is on {fstype}, which can reflink")
    cache = ImageCache(tmp_path / "cache")
    entry = cache.entry(DIGEST)
    (entry.rootfs / "etc").mkdir(parents=True)
    (entry.rootfs / "etc" / "hostname").write_text("x\n")
    (entry.path / MARKER).write_text("agentbox\n")
    ws = tmp_path / "ws"
    ws.mkdir()
    layout = StateLayout.under(tmp_path / "state", ws)
    opts = MicrovmOptions(workspace=ws, image=f"example.invalid/img@{DIGEST}", storage="reflink", state=layout,
                          image_cache=cache.root, debug=True, profile=True)
    with pytest.raises(AgentboxError) as err, caplog.at_level(logging.INFO, logger="agentbox"):
        run_microvm(opts)
    assert error_chain(err.value).startswith("microvm task rootfs materialization failed: failed to materialize "
                                             "microvm task rootfs with required reflinks")
    assert list(layout.microvm_tasks_dir.iterdir()) == []
    assert records(layout) == []
    report = caplog.text
    assert "agentbox microvm host profile" in report and "task_rootfs_materialization:" in report
