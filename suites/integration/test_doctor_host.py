"""The real ``agentbox doctor --json`` on this host."""

import json
import shutil

import pytest

from runtime.cli import main


def test_doctor_json_reports_host_tools(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json", "--no-probe"]) == 0
    report = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in report["checks"]}
    for name, binary in (("podman", "podman"), ("qemu", "qemu-system-x86_64"), ("btrfs-progs", "mkfs.btrfs")):
        assert checks[name]["ok"] is (shutil.which(binary) is not None), checks[name]
    for c in report["checks"]:
        assert c["status"] in ("ok", "missing", "unusable", "info")
        if not c["ok"] and c["status"] != "info":
            assert c["fix"], f"{c['name']} has no fix line"
    assert set(report["backends"]) == {"krun-podman", "krun-direct", "qemu", "container"}
    krun = report["backends"]["krun-direct"]
    assert krun["usable"] is checks["libkrun"]["ok"] or not checks["kvm-device"]["ok"]
    if not krun["usable"]:
        assert krun["reason"]


def test_doctor_text_lists_backends(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "qemu" in out
