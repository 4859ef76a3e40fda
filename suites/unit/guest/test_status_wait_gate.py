"""``agentbox-guest-init status --wait gate``: one guest-side wait for the readiness gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentbox_guest_init import cli
from agentbox_guest_init.contract import gate_says_failed
from agentbox_guest_init.env import GuestEnv

REPO = Path(__file__).resolve().parents[3]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def reports(*gates: dict[str, object]) -> list[dict[str, object]]:
    return [{"nix": {}, "podman": {}, "gate": g} for g in gates]


def not_ready(*missing: str) -> dict[str, object]:
    return {"ready": False, "reason": "; ".join(missing), "missing": list(missing)}


READY: dict[str, object] = {"ready": True, "reason": "ready", "missing": []}


def test_it_looks_again_until_the_gate_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = reports(not_ready("nix: running"), not_ready("nix: ready", "workspace: /workspace is not mounted"), READY)
    monkeypatch.setattr(cli, "gate_report", lambda genv: seen.pop(0))
    clock = Clock()
    report = cli.wait_for_gate(GuestEnv(), 10.0, clock, clock.sleep)
    assert report["gate"] == READY and not seen
    assert clock.sleeps == [cli.GATE_POLL_S] * 2


def test_a_failed_prep_ends_the_wait_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    failed = not_ready("podman: failed (mkfs.btrfs exited 1)")
    seen = reports(failed, READY)
    monkeypatch.setattr(cli, "gate_report", lambda genv: seen.pop(0))
    clock = Clock()
    assert cli.wait_for_gate(GuestEnv(), 10.0, clock, clock.sleep)["gate"] == failed
    assert clock.sleeps == []


def test_the_last_report_is_returned_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "gate_report", lambda genv: reports(not_ready("nix: running"))[0])
    clock = Clock()
    report = cli.wait_for_gate(GuestEnv(), 1.0, clock, clock.sleep)
    assert report["gate"] == not_ready("nix: running")
    assert clock.now >= 1.0


def test_only_a_failed_state_ends_the_wait() -> None:
    assert gate_says_failed(["nix: failed (no disk)"])
    assert gate_says_failed(["workspace: /workspace is not mounted", "podman: failed"])
    assert not gate_says_failed(["nix: running", "podman: not-started"])
    assert not gate_says_failed([])


def run_status(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentbox_guest_init.cli", "status", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env={**os.environ, **env})


def test_the_command_prints_the_report_and_exits_1_when_the_gate_did_not_pass() -> None:
    # the nix overlay is enabled, and on this host no nix prep ever starts
    p = run_status("--json", "--wait", "gate", "--timeout", "0.3", env={"AGENTBOX_LIBKRUN_NIX_OVERLAY": "1"})
    assert p.returncode == 1
    report = json.loads(p.stdout)
    assert report["gate"]["ready"] is False and report["gate"]["missing"] == ["nix: not-started"]
    assert p.stderr == "agentbox-guest-init: readiness gate not passed within 0.3s: nix: not-started\n"


def test_the_command_returns_at_once_when_nothing_is_enabled() -> None:
    p = run_status("--wait", "gate", "--timeout", "5",
                   env={"AGENTBOX_LIBKRUN_NIX_OVERLAY": "0", "AGENTBOX_LIBKRUN_CONTAINERS_STORAGE": "0"})
    assert p.returncode == 0, p.stderr
    assert p.stdout == "gate: ready\n"
