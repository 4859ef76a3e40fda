"""``--agentbox-evidence``: each test's evidence bundle (:mod:`agentbox_runtime.evidence`).

At the end of every test that made a machine, the bundle ``<DIR>/<test>/`` gets, redacted:

- ``test.json``: the test id and each phase's outcome and duration;
- every file of the test's artifact dir: per machine the transcript of every guest command
  (``argv``, ``user``, ``exit_status``, ``duration_s``, ``stdout_sha256``, ``stderr_sha256``,
  ``env`` with secret-looking values redacted), the console log, the launch config and the
  VMM's argv and log where the backend has them;
- ``index.json``: every file's SHA-256 and the root SHA-256.

Redacted means (:class:`~agentbox_runtime.evidence.Redactor`): by known value, every secret the
test registered (``agentbox_session.register_secret``) and every value of this process's or a
command's secret-looking environment variables becomes ``[REDACTED]``; by pattern, output that
looks like a credential (GitHub/GitLab/``sk-``/Slack tokens, AWS key ids, JWTs, PEM private key
blocks, ``Authorization:`` and cookie header values) becomes ``[REDACTED:<kind>]``, wherever the
guest printed it: a command's output tail, the console log.

No link on the way is followed: ``DIR`` and each bundle dir must be real directories of the
invoking user (one error line otherwise), and each file is created new. The bundle is written
whatever the outcome, before the artifact dir's keep-or-remove policy
runs, and ``agentbox evidence verify <DIR>/<test>`` rechecks it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from agentbox_harness.artifacts import node_dir, node_name
from agentbox_runtime.evidence import Redactor, check_names, write_into
from agentbox_runtime.private_dir import OutputDir

MAX_FILE_BYTES = 64 << 20  # a console log is capped well below this; anything larger is left out


def write(config: pytest.Config, nodeid: str, reports: Mapping[str, pytest.TestReport], base: Path,
          redactor: Redactor) -> tuple[Path, str] | None:
    """Write the bundle of test ``nodeid``; (its dir, root SHA-256), or None when it made no machine.

    ``base`` and the bundle dir in it are opened without following a link and must be ours
    (:class:`~agentbox_runtime.private_dir.OutputDir`; UnsafeDirectory otherwise); a previous
    bundle's contents are removed through its descriptor and every file is created new."""
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
    check_names(files)
    with OutputDir.open(base) as top, top.subdir(node_name(nodeid)) as target:
        target.empty()  # a bundle is one run's: no file of an earlier run stays
        return target.path, write_into(target, files, redactor)
