"""A ``host`` machine backend for plugin tests: commands run as host processes.

Inner pytester projects register it through their conftest (see
``HOST_CONFTEST``) to exercise the plugin's verbs, waits, factories,
artifacts, Allure steps and xdist handling without booting a guest. The
transport is real (subprocess), only the guest is the host itself.
"""

from __future__ import annotations

from pathlib import Path

HOST_CONFTEST = '''
import os
import subprocess
import time
from pathlib import Path

import pytest

from agentbox_harness.machine import Machine, Result
from agentbox_harness.registry import MACHINE_BACKENDS


class HostMachine(Machine):
    """Runs argv on the host; its "console log" is a file it writes at start."""

    log: Path | None = None

    def _start(self):
        self.log = Path(self.artifacts or ".") / f"{self.name}-host-console.log"
        self.log.write_text("host machine booted\\nready\\n")

    def _stop(self, timeout):
        pass

    @property
    def console_log(self):
        return self.log

    def _execute(self, argv, *, user, env, cwd, timeout, stdin):
        started = time.monotonic()
        full_env = dict(os.environ, **(env or {}))
        try:
            p = subprocess.run(argv, input=stdin or b"", capture_output=True, timeout=timeout, cwd=cwd,
                               env=full_env)
        except subprocess.TimeoutExpired as exc:
            return Result(" ".join(argv), 124, (exc.stdout or b"").decode(), (exc.stderr or b"").decode(),
                          time.monotonic() - started, True)
        return Result(" ".join(argv), p.returncode, p.stdout.decode(), p.stderr.decode(),
                      time.monotonic() - started)


def _build(ctx, name, options):
    return HostMachine(name=name, timeout_scale=float(options.pop("scale", 1.0)))


MACHINE_BACKENDS["host"] = _build


@pytest.fixture
def agentbox_backend():
    return "host"
'''


def install(pytester_path: Path) -> None:
    """Write the host backend conftest into a pytester project."""
    (pytester_path / "conftest.py").write_text(HOST_CONFTEST)
