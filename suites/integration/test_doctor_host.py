"""The real ``agentbox doctor`` on this host, through ``main()``."""

from __future__ import annotations

import json
import shutil

import pytest

from agentbox_runtime.cli import main
from agentbox_runtime.doctor import KRUN_PODMAN_QEMU, BACKENDS, CHECKS
from agentbox_runtime.hostcheck.check import STATUSES
from agentbox_runtime.doctor.tools import qemu_binary_name
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.vmm.libkrun import load_library


def _doctor_json(capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, object]:
    assert main(["doctor", "--json", *flags]) == 0
    report: dict[str, object] = json.loads(capsys.readouterr().out)
    return report


def _libkrun_loads() -> bool:
    try:
        load_library()
    except AgentboxError:
        return False
    return True


def test_doctor_json_is_complete_and_every_failure_has_a_fix(capsys: pytest.CaptureFixture[str]) -> None:
    report = _doctor_json(capsys, "--no-probe")
    checks = report["checks"]
    assert isinstance(checks, list)
    assert [c["name"] for c in checks] == list(CHECKS)
    for c in checks:
        assert set(c) == {"name", "ok", "status", "detail", "fix"}
        assert c["status"] in STATUSES and c["detail"], c
        assert c["ok"] is (c["status"] == "ok"), c
        if not c["ok"] and c["status"] != "info":
            assert c["fix"], f"{c['name']} has no fix line"
    by = {c["name"]: c for c in checks}
    assert by["kvm-boot"]["detail"] == "not probed (--no-probe)"
    backends = report["backends"]
    assert isinstance(backends, dict) and set(backends) == set(BACKENDS)
    for name, verdict in backends.items():
        direct = all(by[n]["ok"] for n in BACKENDS[name])
        through_runtime = name == "krun-podman" and all(by[n]["ok"] for n in KRUN_PODMAN_QEMU)
        assert verdict["usable"] is (direct or through_runtime), name
        assert verdict["reason"] == ("usable" if direct else verdict["reason"]), verdict
        assert verdict["reason"].startswith("usable") is verdict["usable"], verdict


@pytest.mark.parametrize(("check", "binary"), [
    ("podman", "podman"), ("qemu", qemu_binary_name()), ("btrfs-progs", "mkfs.btrfs"),
    ("buildah", "buildah"), ("blkid", "blkid")])
def test_doctor_reports_installed_tools(capsys: pytest.CaptureFixture[str], check: str, binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed on this host")
    by = {c["name"]: c for c in _doctor_json(capsys, "--no-probe")["checks"]}  # type: ignore[union-attr]
    assert by[check]["ok"] is True and by[check]["status"] == "ok", by[check]
    if check == "qemu":
        assert "accelerators: " in by[check]["detail"] and "tcg" in by[check]["detail"]
    if check == "podman":
        assert "rootless=" in by[check]["detail"] and "OCI runtimes on PATH:" in by[check]["detail"]


def test_doctor_reports_libkrun_missing_with_a_reason(capsys: pytest.CaptureFixture[str]) -> None:
    if _libkrun_loads():
        pytest.skip("libkrun loads on this host; the missing-libkrun report cannot be seen here")
    report = _doctor_json(capsys, "--no-probe")
    libkrun = {c["name"]: c for c in report["checks"]}["libkrun"]  # type: ignore[union-attr]
    assert (libkrun["ok"], libkrun["status"]) == (False, "missing")
    assert "not found" in libkrun["detail"] and "AGENTBOX_LIBKRUN_LIBRARY" in libkrun["fix"]
    krun = report["backends"]["krun-direct"]  # type: ignore[index]
    assert krun["usable"] is False and krun["reason"].startswith("libkrun: ")


def test_doctor_text_table_with_probe_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["check", "status", "detail"]
    rows = {line.split()[0]: line.split()[1] for line in lines[1:] if line and not line.startswith(" ")
            and line != "backends:"}
    assert set(rows) == set(CHECKS) and set(rows.values()) <= set(STATUSES)
    assert "backends:" in lines
    assert {line.split()[0] for line in lines[lines.index("backends:") + 1:]} == set(BACKENDS)
