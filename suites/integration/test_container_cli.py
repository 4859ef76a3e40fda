"""``agentbox container -- CMD`` works on a stock host without the user exporting CONTAINERS_CONF."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentbox_runtime.container import host_conf

IMAGE = "localhost/agentbox:latest"
REPO = Path(__file__).resolve().parents[2]
STORE_WRITE = "echo in-container; echo data > /tmp/f && nix-store --add /tmp/f; exit 4"


def test_container_mode_runs_out_of_the_box(tmp_path: Path) -> None:
    if subprocess.run(["podman", "image", "exists", IMAGE], timeout=60).returncode != 0:
        pytest.skip(f"needs the guest image {IMAGE} (agentbox image build)")
    ws = tmp_path / "project"
    ws.mkdir()
    env = {k: v for k, v in os.environ.items() if k != host_conf.ENV}
    env.update(XDG_STATE_HOME=str(tmp_path / "state"), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "container", "--image", IMAGE, "--",
                           "sh", "-c", STORE_WRITE], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "in-container" in proc.stdout
    assert "/nix/store/" in proc.stdout, proc.stderr[-2000:]  # a store write through the sidecar's daemon


def test_the_harness_conf_is_applied_only_when_the_host_needs_it() -> None:
    hybrid = "30 1 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n" \
             "31 1 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    unified = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert "hybrid" in (host_conf.needed(hybrid) or "")
    reason = host_conf.needed(unified)
    assert reason is None or "open-files limit" in reason


def test_the_hardened_container_task(tmp_path: Path) -> None:
    """``agentbox container --hardened``: the task runs as dev with no capabilities and no new
    privileges, on a read-only root, with its home and the workspace writable."""
    if subprocess.run(["podman", "image", "exists", IMAGE], timeout=60).returncode != 0:
        pytest.skip(f"needs the guest image {IMAGE} (agentbox image build)")
    ws = tmp_path / "project"
    ws.mkdir()
    if os.geteuid() == 0:
        os.chown(ws, 1000, 1000)  # a project dev can write: rootful tasks run as 1000:1000 (or SUDO_UID)
    env = {k: v for k, v in os.environ.items() if k not in (host_conf.ENV, "SUDO_UID", "SUDO_GID")}
    env.update(XDG_STATE_HOME=str(tmp_path / "state"), PYTHONPATH=str(REPO))
    probe = ("id -un; grep NoNewPrivs /proc/self/status; grep CapEff /proc/self/status; "
             "touch /etc/probe 2>&1 | sed 's/.*: //'; touch $HOME/ok /workspace/ok && echo writable")
    proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "container", "--hardened", "--image", IMAGE,
                           "--", "sh", "-c", probe], cwd=ws, env=env, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.replace("\t", " ") for line in proc.stdout.splitlines()]
    assert lines == ["dev", "NoNewPrivs: 1", "CapEff: 0000000000000000", "Read-only file system", "writable"], \
        proc.stderr[-2000:]
