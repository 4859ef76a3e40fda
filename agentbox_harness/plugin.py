"""pytest11 entry point ``agentbox``: options, markers, fixtures, artifacts, reaping, summaries.

Loads cleanly in any project (nothing is probed until a fixture needs it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from agentbox_harness.fixtures import *  # noqa: F403 - registers the fixtures
from agentbox_harness.session import KEY, harness

MARKERS = {
    "vm": "boots a real guest (qemu, libkrun or krun-podman backend)",
    "needs_kvm": "needs a /dev/kvm that boots guests",
    "needs_libkrun": "needs libkrun.so and libkrunfw (or crun with +LIBKRUN)",
    "needs_root": "needs root on the host",
    "destructive": "changes host state outside the per-test state root",
    "slow": "takes minutes (image build, several boots)",
    "nightly": "runs in the nightly VM validation, not in the per-commit CI (see README)",
}
REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("agentbox", "agentbox microVM harness")
    group.addoption("--agentbox-backend", default="auto",
                    choices=("auto", "qemu", "krun-podman", "krun-direct", "container"),
                    help="backend for VM fixtures (default: best available)")
    group.addoption("--agentbox-image", default=None, help="guest image reference (default: build localhost/agentbox:latest)")
    group.addoption("--agentbox-kernel", default=None, help="kernel for the qemu backend (default: the image's)")
    group.addoption("--agentbox-state-dir", default=None,
                    help="state root base (default: isolated per test under the pytest tmp dir)")
    group.addoption("--preserve-debug", action="store_true",
                    help="keep VMs, disks, task rootfs and logs; print commands to inspect them")
    group.addoption("--agentbox-strict", action="store_true",
                    help="a missing capability fails the test instead of skipping it")
    group.addoption("--agentbox-timeout-scale", type=float, default=None,
                    help="multiply every wait timeout (default: 3 under TCG, 1 with KVM)")


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    if config.getoption("--preserve-debug", default=False):
        numprocesses = getattr(config.option, "numprocesses", None)
        if numprocesses:
            raise pytest.UsageError("--preserve-debug keeps VMs for inspection and cannot run under xdist; "
                                    "drop -n (or use -n 0)")


def pytest_sessionstart(session: pytest.Session) -> None:
    if session.config.getoption("--agentbox-state-dir", default=None):
        from runtime.microvm.reaper import reap_stale
        from runtime.state import StateLayout

        base = Path(session.config.getoption("--agentbox-state-dir"))
        if base.is_dir():
            reap_stale(StateLayout.under(base, base))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    from agentbox_harness.caps import check_markers

    if any(item.get_closest_marker(m) for m in ("needs_kvm", "needs_libkrun", "needs_root")):
        check_markers(harness(item.config), item)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    rep = yield
    item.stash.setdefault(REPORTS, {})[rep.when] = rep
    return rep


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Keep a test's artifacts when it failed or with --preserve-debug; else remove them."""
    if KEY not in item.config.stash:
        return
    session = item.config.stash[KEY]
    reports = item.stash.get(REPORTS, {})
    failed = any(r.failed for r in reports.values())
    path = Path(str(item.config.rootpath)) / "results" / "artifacts"
    import re

    node_dir = path / re.sub(r"[^A-Za-z0-9._-]+", "_", item.nodeid)[-150:]
    if not node_dir.exists():
        return
    if failed or session.preserve_debug:
        (node_dir / "outcome.json").write_text(json.dumps(
            {"nodeid": item.nodeid, "failed": failed, "time": time.time(),
             "doctor": [c.as_dict() for c in session.checks]}, indent=1))
        _attach(node_dir)
    else:
        shutil.rmtree(node_dir, ignore_errors=True)


def _attach(node_dir: Path) -> None:
    try:
        import allure
    except ImportError:
        return
    for f in sorted(node_dir.iterdir()):
        if f.is_file() and f.stat().st_size < 4 << 20:
            allure.attach.file(str(f), name=f.name, attachment_type=allure.attachment_type.TEXT)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if KEY not in config.stash:
        return
    session = config.stash[KEY]
    tr = terminalreporter
    if session.preserved:
        tr.section("agentbox: preserved debug state")
        for m in session.preserved:
            task = getattr(m, "task", None)
            if task is None:
                continue
            tr.write_line(f"{m.name}: task dir {task.task_dir}")
            tr.write_line(f"  console:   tail -f {task.task_dir / 'console.log'}")
            tr.write_line(f"  agent:     socat - UNIX-CONNECT:{task.task_dir / 'agent.sock'}")
            tr.write_line(f"  shell:     socat -,raw,echo=0 UNIX-CONNECT:{task.task_dir / 'console.sock'}")
            tr.write_line(f"  stop:      kill $(cat {task.task_dir / 'qemu.pid'})")
            if task.notice:
                tr.write_line(f"  {task.notice}")
            tr.write_line(f"  clean up:  fusermount3 -u {task.rootfs.root if task.rootfs else ''}; rm -rf {task.task_dir}")
    leaks = _leaks(session.run_label)
    if leaks:
        tr.section("agentbox: leaked resources")
        for line in leaks:
            tr.write_line(line)
        if session.strict and not session.preserve_debug:
            tr.write_line("strict mode: leaks fail the run")
            config.stash[KEY].config._agentbox_leaks = True  # type: ignore[attr-defined]


def _leaks(label: str) -> list[str]:
    """Containers carrying this run's label and qemu processes started by this process."""
    import subprocess

    out = []
    try:
        ids = subprocess.run(["podman", "ps", "-aq", "--filter", f"label=io.agentbox.harness.run={label}"],
                             capture_output=True, text=True, timeout=60).stdout.split()
        out += [f"container {cid} (label io.agentbox.harness.run={label})" for cid in ids]
    except (OSError, subprocess.TimeoutExpired):
        pass
    me = str(os.getpid())
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            ppid = stat.rsplit(")", 1)[1].split()[1]
            cmd = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if ppid == me and "qemu-system" in cmd:
            out.append(f"qemu process {proc.name} still running")
    return out


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if getattr(session.config, "_agentbox_leaks", False) and session.exitstatus == 0:
        session.exitstatus = 1
