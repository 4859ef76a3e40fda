"""Smoke's VM items under load (issue 25): a CPU hog on every core beside them and ``-n 2``, as the
restart race was met (nix-daemon "Connection refused" right after ``restart()`` returned).

The items run as their own pytest process on the session's backend and krun-podman: the nix store
across a restart (start and restart return only once the readiness gate passes, the nix daemon
accepting connections included) and the workspace and disk mounts. Nothing may fail, and nothing
may leak: each machine's own teardown check (:mod:`agentbox_harness.leftovers`) fails its test on a
leak, and the session-end check must find none either. One item, a few minutes here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ITEMS = ("smoke/test_nix_store.py::test_nix_store_content_survives_restart_and_stays_valid",
         "smoke/test_microvm_checklist.py::test_workspace_and_persistent_disks_are_mounted")
HOG = "while True: pass"


@pytest.fixture
def cpu_hog() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A busy loop per core, for as long as the test runs."""
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(os.cpu_count() or 2)]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_smoke_vm_items_pass_and_leave_nothing_beside_a_cpu_hog(cpu_hog: list[subprocess.Popen[bytes]],
                                                                tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "-q", "-rA",
                          "--junitxml", str(tmp_path / "junit.xml"), *ITEMS],
                         cwd=REPO, capture_output=True, text=True, timeout=3000, check=False)
    report = out.stdout[-6000:] + out.stderr[-2000:]
    assert all(hog.poll() is None for hog in cpu_hog), "the CPU hog stopped before the run ended"
    assert out.returncode == 0, report
    suite = ElementTree.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert suite is not None, report
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    assert counts["failures"] == counts["errors"] == 0 and passed >= len(ITEMS), f"{counts}\n{report}"
    assert "leaked resources" not in out.stdout, report
    assert "left behind after its stop" not in out.stdout, report
