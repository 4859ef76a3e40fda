"""krun-direct is chosen only after a probe boot through the libkrun that loads passed.

Real boots: ``agentbox doctor`` probes the QEMU-backed libkrun stand-in once and
reports krun-direct usable; without a library it is unusable with the reason; a
library that loads but cannot boot a guest (the recording double of the unit
tier) fails its probe, and ``--agentbox-backend=auto`` falls back to qemu and
says why in the session header.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

IMAGE = "localhost/agentbox:latest"
TIMEOUT_S = 900
UNIT = Path(__file__).resolve().parent.parent / "unit"


@pytest.fixture()
def fresh_env(tmp_path: Path) -> dict[str, str]:
    """The real environment with a fresh cache home (so no probe verdict is known yet)."""
    if subprocess.run(["podman", "image", "exists", IMAGE], timeout=60).returncode != 0:
        pytest.skip(f"needs the guest image {IMAGE} (build it with `agentbox image build`)")
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}


def doctor(env: dict[str, str]) -> tuple[dict[str, dict[str, object]], dict[str, dict[str, object]]]:
    proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "doctor", "--json"], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    return {c["name"]: c for c in report["checks"]}, report["backends"]


def verdict_files(env: dict[str, str]) -> list[tuple[str, int]]:
    return [(p.name, p.stat().st_mtime_ns) for p in Path(env["XDG_CACHE_HOME"]).glob("agentbox/boot-probes/*.json")]


def test_doctor_probes_the_standin_once_and_reports_krun_direct_usable(fresh_env: dict[str, str],
                                                                       libkrun_standin: Path) -> None:
    env = {**fresh_env, "AGENTBOX_LIBKRUN_LIBRARY": str(libkrun_standin)}
    checks, backends = doctor(env)
    boot = checks["krun-direct-boot"]
    assert boot["ok"] is True and "probe boot passed" in str(boot["detail"]), boot
    assert backends["krun-direct"] == {"usable": True, "reason": "usable"}
    first = verdict_files(env)
    assert len(first) == 1
    doctor(env)
    assert verdict_files(env) == first, "the verdict is cached: no second probe boot"


def test_doctor_without_libkrun_reports_krun_direct_unusable_with_the_reason(fresh_env: dict[str, str],
                                                                             tmp_path: Path) -> None:
    env = {**fresh_env, "AGENTBOX_LIBKRUN_LIBRARY": str(tmp_path / "no-such-libkrun.so")}
    checks, backends = doctor(env)
    assert checks["libkrun"]["ok"] is False and "no-such-libkrun.so" in str(checks["libkrun"]["detail"])
    assert backends["krun-direct"]["usable"] is False
    assert str(backends["krun-direct"]["reason"]).startswith("libkrun: ")
    assert verdict_files(env) == []


def test_a_library_that_loads_but_cannot_boot_fails_its_probe_and_auto_falls_back(fresh_env: dict[str, str],
                                                                                  tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the libkrun double")
    double = tmp_path / "libkrun-double.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(double), str(UNIT / "fake_libkrun.c")], check=True,
                   capture_output=True, timeout=120)
    env = {**fresh_env, "AGENTBOX_LIBKRUN_LIBRARY": str(double), "FAKE_KRUN_LOG": str(tmp_path / "calls.log")}
    checks, backends = doctor(env)
    boot = checks["krun-direct-boot"]
    assert boot["ok"] is False and "probe boot failed" in str(boot["detail"]), boot
    assert "returned 0" in str(boot["detail"]), boot
    assert backends["krun-direct"]["usable"] is False
    project = tmp_path / "project"
    project.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider",
                           "--agentbox-backend", "auto"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    header = [line for line in proc.stdout.splitlines() if line.startswith("agentbox: backend ")]
    assert header and header[0].startswith("agentbox: backend qemu (auto: "), proc.stdout[-3000:]
    assert "krun-direct unavailable (krun-direct-boot: probe boot failed" in header[0], header
