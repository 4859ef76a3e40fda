"""Per-test artifact directories and their keep/remove policy; Allure attachments.

Each test that uses a machine gets ``<rootdir>/results/artifacts/<nodeid>/``
holding, per machine, the console log, the agent transcript (every command
with its user, exit status, duration and output digests), the profile (per
verb timings), the task's ``launch.conf`` and qemu argv/log, and, when kept,
``outcome.json`` and ``doctor.json`` (the host capability snapshot).

The directory is kept when the test failed (in any phase) or with
``--preserve-debug``, and removed when it passed otherwise. Every level is made and written
through :class:`~agentbox_runtime.private_dir.OutputDir`: a symlink or another user's directory
on the way is refused, never followed.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from agentbox_runtime.private_dir import OutputDir

MAX_ATTACH_BYTES = 4 << 20
REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
MACHINES = pytest.StashKey[list[Any]]()
"""The machines a test made (for the attach hint of a failure)."""
"""A test item's phase reports so far (``setup``, ``call``, ``teardown``), stored by the plugin."""


def artifact_root(config: pytest.Config) -> Path:
    """``<rootdir>/results/artifacts``."""
    return Path(str(config.rootpath)) / "results" / "artifacts"


def node_name(nodeid: str) -> str:
    """A file-system safe, bounded name for a test id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid)[-150:]


def node_dir(config: pytest.Config, nodeid: str, create: bool = True) -> Path:
    """The artifact dir of test ``nodeid`` (created 0700 unless ``create`` is False).

    Created through :class:`OutputDir`: the artifact root and the test's dir must be real
    directories of ours (UnsafeDirectory otherwise), so a link planted there is never used."""
    path = artifact_root(config) / node_name(nodeid)
    if create:
        with OutputDir.open(artifact_root(config)) as root:
            root.subdir(path.name).close()
    return path


def failed(reports: Mapping[str, pytest.TestReport]) -> bool:
    """Whether any phase so far failed."""
    return any(r.failed for r in reports.values())


def finalize(config: pytest.Config, nodeid: str, reports: Mapping[str, pytest.TestReport], *,
             preserve: bool, doctor: list[dict[str, object]] | None) -> Path | None:
    """Keep (with outcome.json and doctor.json) or remove a test's artifact dir; the kept dir."""
    path = node_dir(config, nodeid, create=False)
    if not os.path.lexists(path):
        return None
    bad = failed(reports)
    with OutputDir.open(artifact_root(config), create=False) as root:
        if not (bad or preserve):
            root.remove(path.name)  # a link planted there goes, never what it points to
            return None
        outcome = {"nodeid": nodeid, "failed": bad, "time": time.time(),
                   "phases": {when: r.outcome for when, r in reports.items()},
                   "durations_s": {when: round(r.duration, 3) for when, r in reports.items()}}
        with root.subdir(path.name, create=False) as kept:
            kept.write_file("outcome.json", json.dumps(outcome, indent=1).encode(), replace=True)
            if doctor is not None:
                kept.write_file("doctor.json", json.dumps(doctor, indent=1).encode(), replace=True)
    return path


def attach(files: Iterable[Path]) -> None:
    """Attach text files to the current Allure test (nothing without allure-pytest)."""
    try:
        import allure
    except ImportError:
        return
    for f in files:
        if f.is_file() and f.stat().st_size < MAX_ATTACH_BYTES:
            kind = allure.attachment_type.JSON if f.suffix == ".json" else allure.attachment_type.TEXT
            allure.attach.file(str(f), name=f.name, attachment_type=kind)  # type: ignore[no-untyped-call]


def environment_properties(values: Mapping[str, Any]) -> dict[str, str]:
    """The run's environment facts (host, kernel, python, plus ``values``) as strings."""
    props = {"host.kernel": platform.release(), "host.machine": platform.machine(),
             "python": platform.python_version(), "host.euid": str(os.geteuid())}
    props.update({k: str(v) for k, v in values.items()})
    return props


def write_allure_environment(alluredir: str | None, props: Mapping[str, str]) -> Path | None:
    """Write ``environment.properties`` into the Allure results dir once per run (the dir opened
    without following a link and ours, :class:`OutputDir`; UnsafeDirectory otherwise)."""
    if not alluredir:
        return None
    path = Path(alluredir) / "environment.properties"
    body = "".join(f"{k}={str(v).replace(chr(10), ' ')}\n" for k, v in sorted(props.items()))
    # once per run: another worker may have written it
    with OutputDir.open(Path(alluredir), mode=0o755) as out, contextlib.suppress(FileExistsError):
        out.write_file(path.name, body.encode(), mode=0o644)
    return path
