"""Image build steps: progress lines, output in the log, failures that name the step and show the tail."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.images.steps import step, tool


def test_step_logs_output_and_reports_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "build.log"
    with caplog.at_level(logging.INFO, logger="agentbox"):
        step("say hello", ["sh", "-c", "echo hello; echo to-stderr >&2"], log)
    text = log.read_text()
    assert "==> say hello: sh -c" in text and "hello\nto-stderr\n" in text
    lines = [r.getMessage() for r in caplog.records if r.name == "agentbox"]
    assert lines[0] == "agentbox image: say hello ..."
    assert lines[1].startswith("agentbox image: say hello done in ") and lines[1].endswith("s")


def test_failed_step_names_itself_and_shows_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    script = "for i in $(seq 1 50); do echo line-$i; done; exit 3"
    with pytest.raises(AgentboxError) as err:
        step("apt-get install", ["sh", "-c", script], log)
    msg = str(err.value)
    assert msg.startswith(f"image build step 'apt-get install' failed with status 3; log {log}:\n")
    assert "line-50" in msg and "line-21" in msg and "line-20\n" not in msg  # the last 30 lines


def test_step_timeout_names_the_step(tmp_path: Path) -> None:
    with pytest.raises(AgentboxError, match=r"^image build step 'slow' timed out after 1s; log "):
        step("slow", [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(30)"],
             tmp_path / "log", timeout=1)


def test_missing_tool_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(AgentboxError, match="needs no-such-tool-x, which is not installed; run scripts/setup.sh"):
        step("debootstrap", ["no-such-tool-x"], tmp_path / "log")
    with pytest.raises(AgentboxError, match="image build step 'buildah from' needs no-such-tool-x"):
        tool(["no-such-tool-x"], "buildah from")


def test_tool_returns_stdout_and_reports_stderr_on_failure() -> None:
    assert tool(["sh", "-c", "echo ' id-123 '"], "buildah from") == "id-123"
    with pytest.raises(AgentboxError, match=r"image build step 'buildah mount' failed: sh -c .*: no such container"):
        tool(["sh", "-c", "echo 'no such container' >&2; exit 125"], "buildah mount")


def test_mounts_under_decodes_and_orders_deepest_first(tmp_path: Path) -> None:
    from agentbox_runtime.images.workdir import mounts_under

    root = tmp_path / "agentbox-root-x"
    root.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(f"proc {root}/root/proc proc rw 0 0\n"
                      f"/dev {root}/root/dev devtmpfs rw 0 0\n"
                      f"devpts {root}/root/dev/pts devpts rw 0 0\n"
                      f"x {str(root).replace(' ', chr(92) + '040')}/with\\040space tmpfs rw 0 0\n"
                      f"y {root}-other/dev tmpfs rw 0 0\n"
                      "/dev/vda / ext4 rw 0 0\n")
    found = mounts_under(root, mounts)
    assert found[0] == f"{root}/root/dev/pts"
    assert sorted(found) == sorted([f"{root}/root/proc", f"{root}/root/dev", f"{root}/root/dev/pts",
                                    f"{root}/with space"])


def test_a_build_another_process_holds_says_it_is_waiting_and_gives_up_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from filelock import FileLock

    from agentbox_runtime.images import build

    monkeypatch.setattr(build, "lock_path", lambda: tmp_path / "build.lock")
    monkeypatch.setattr(build, "LOCK_TIMEOUT_S", 0.3)
    held = FileLock(str(tmp_path / "build.lock"))
    held.acquire()
    try:
        with caplog.at_level(logging.INFO, logger="agentbox"), pytest.raises(AgentboxError, match="another build"):
            build.build("localhost/never-built:latest")
    finally:
        held.release()
    assert any("waiting for the image build another process runs" in r.getMessage() for r in caplog.records)
