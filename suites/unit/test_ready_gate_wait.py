"""The host's readiness check waits for the gate in the guest (``status --wait gate``), and looks
without waiting when the guest's agentbox-guest-init predates that verb.

The machine runs its commands on the host: the first test runs the real ``agentbox-guest-init``;
the second puts a script in its place that answers as an older one did (argparse's usage error)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentbox_harness.machine import Machine, Result

GATE = {"ready": True, "reason": "ready", "missing": []}
OLD_GUEST_INIT = f"""#!/bin/sh
for a in "$@"; do
  if [ "$a" = gate ]; then
    echo "agentbox-guest-init status: error: argument --wait: invalid choice: 'gate' (choose from 'nix', 'podman')" >&2
    exit 2
  fi
done
echo '{json.dumps({"nix": {"state": "ready"}, "podman": {"state": "ready"}, "gate": GATE})}'
"""


@dataclass
class OnHost(Machine):
    """Runs each command on the host and keeps its argv."""

    def __post_init__(self) -> None:
        self.argvs: list[list[str]] = []

    def _start(self) -> None:
        pass

    def _stop(self, timeout: float) -> None:
        pass

    def _execute(self, argv: list[str], *, user: str | None, env: dict[str, str] | None, cwd: str | None,
                 timeout: float, stdin: bytes | None) -> Result:
        self.argvs.append(argv)
        started = time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)
        return Result(" ".join(argv), p.returncode, p.stdout, p.stderr, time.monotonic() - started)


def on_path(monkeypatch: pytest.MonkeyPatch, bin_dir: Path) -> None:
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in ("AGENTBOX_LIBKRUN_NIX_OVERLAY", "AGENTBOX_LIBKRUN_CONTAINERS_STORAGE", "AGENTBOX_WORKSPACE_TAG"):
        monkeypatch.delenv(name, raising=False)


def test_the_check_waits_in_the_guest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script = tmp_path / "agentbox-guest-init"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m agentbox_guest_init.cli \"$@\"\n")
    script.chmod(0o755)
    on_path(monkeypatch, tmp_path)
    m = OnHost(name="h", backend="qemu", default_timeout=10)
    status = m.ready_status(wait=5.0)
    assert status.ready, status.reason
    assert m.argvs == [["agentbox-guest-init", "status", "--json", "--wait", "gate", "--timeout", "5.0"]]


def test_an_older_guest_init_is_asked_without_waiting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script = tmp_path / "agentbox-guest-init"
    script.write_text(OLD_GUEST_INIT)
    script.chmod(0o755)
    on_path(monkeypatch, tmp_path)
    m = OnHost(name="h", backend="qemu", default_timeout=10)
    status = m.ready_status(wait=5.0)
    assert status.ready and status.parts["nix"] == "ready", status.reason
    assert m.ready_status(wait=5.0).ready
    assert m.argvs == [["agentbox-guest-init", "status", "--json", "--wait", "gate", "--timeout", "5.0"],
                       ["agentbox-guest-init", "status", "--json"], ["agentbox-guest-init", "status", "--json"]]
