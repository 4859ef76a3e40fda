"""``--agentbox-evidence``: each test's evidence bundle (:mod:`agentbox_runtime.evidence`).

At the end of every test that made a machine, the bundle ``<DIR>/<test>/`` gets, redacted:

- ``test.json``: the test id and each phase's outcome and duration;
- every file of the test's artifact dir: per machine the transcript of every guest command
  (``argv``, ``user``, ``exit_status``, ``duration_s``, ``stdout_sha256``, ``stderr_sha256``,
  ``env`` with secret-looking values redacted), the console log, the launch config and the
  VMM's argv and log where the backend has them;
- ``index.json``: every file's SHA-256 and the root SHA-256.

The bundle is written whatever the outcome, before the artifact dir's keep-or-remove policy
runs, and ``agentbox evidence verify <DIR>/<test>`` rechecks it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest

from agentbox_harness.artifacts import node_dir, node_name
from agentbox_runtime.evidence import Redactor, write_bundle

MAX_FILE_BYTES = 64 << 20  # a console log is capped well below this; anything larger is left out


def write(config: pytest.Config, nodeid: str, reports: Mapping[str, pytest.TestReport], base: Path,
          redactor: Redactor) -> tuple[Path, str] | None:
    """Write the bundle of test ``nodeid``; (its dir, root SHA-256), or None when it made no machine."""
    source = node_dir(config, nodeid, create=False)
    if not source.is_dir():
        return None
    files: dict[str, bytes] = {}
    for path in sorted(source.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.stat().st_size <= MAX_FILE_BYTES:
            files[str(path.relative_to(source))] = path.read_bytes()
    outcome = {"nodeid": nodeid, "phases": {when: r.outcome for when, r in reports.items()},
               "durations_s": {when: round(r.duration, 3) for when, r in reports.items()}}
    files["test.json"] = (json.dumps(outcome, indent=1) + "\n").encode()
    target = base / node_name(nodeid)
    shutil.rmtree(target, ignore_errors=True)  # a bundle is one run's: no file of an earlier run stays
    return target, write_bundle(target, files, redactor)
