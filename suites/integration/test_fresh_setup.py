"""scripts/setup.sh on a fresh Debian 13 (trixie) and Debian 12 (bookworm) machine, then the unit tier there.

For each suite: debootstrap a minimal root from the host's Debian mirror, copy
this repo's working tree into it, run ``scripts/setup.sh`` inside (it installs
the apt packages and makes ``.venv`` from requirements.lock with pip), then run
``.venv/bin/python -m pytest -q suites/unit -p no:cacheprovider`` there, which
must pass whole: no unit test is deselected (the root is entered with
``pivot_root`` in a private mount namespace rather than a plain chroot, because
the kernel refuses user namespaces to chrooted processes and the host-share
tests id-map through one; see suites/integration/fresh_root.py).

The wall time of each stage is printed (run with ``-s``) and written to
``results/fresh-setup-<suite>.json``, with each stage's output in
``results/fresh-setup-<suite>-<stage>.log``. Downloads are cached per suite in
``~/.cache/agentbox/fresh-setup/`` (``AGENTBOX_FRESH_SETUP_CACHE=0`` starts from
nothing, as the first run does). The root is unmounted and deleted afterwards,
pass or fail. Skips, naming what is missing: not root, no debootstrap (or none
that knows the suite), no Debian keyring, or the mirror not answering.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from suites.integration.fresh_root import FreshRoot, debian_mirror, missing_prerequisite, probe_mirror

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "results"
SUITES = {"trixie": "13", "bookworm": "12"}


def cache_dir() -> Path | None:
    if os.environ.get("AGENTBOX_FRESH_SETUP_CACHE") == "0":
        return None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "agentbox" / "fresh-setup"


@pytest.fixture(params=sorted(SUITES, reverse=True), ids=lambda s: f"debian{SUITES[s]}-{s}")
def fresh_root(request: pytest.FixtureRequest) -> Iterator[FreshRoot]:
    """A debootstrap target directory for the suite (not yet made); unmounted and deleted afterwards."""
    suite = request.param
    why = missing_prerequisite(suite)
    if why:
        pytest.skip(why)
    mirror = debian_mirror()
    why = probe_mirror(mirror, suite)
    if why:
        pytest.skip(f"the Debian mirror does not answer: {why}")
    path = Path(tempfile.mkdtemp(prefix=f"agentbox-fresh-{suite}-", dir="/var/tmp"))
    path.chmod(0o755)  # it becomes "/": apt's _apt user and the unit tier's dropped users must get through it
    root = FreshRoot(path, suite, mirror, cache_dir=cache_dir(), log_dir=RESULTS)
    try:
        yield root
    finally:
        root.destroy()
    assert not path.exists()


def test_setup_then_the_unit_tier_pass_on_a_fresh_debian(fresh_root: FreshRoot) -> None:
    times: dict[str, float] = {}
    report: dict[str, object] = {"suite": fresh_root.suite, "debian": SUITES[fresh_root.suite],
                                 "mirror": fresh_root.mirror, "cached_downloads": fresh_root.cache is not None,
                                 "stages_s": times, "status": "failed"}
    start = time.monotonic()

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        """Time one stage (a failed one too), and print it."""
        began = time.monotonic()
        try:
            yield
        finally:
            times[name] = round(time.monotonic() - began, 1)
            print(f"\nfresh-setup {fresh_root.suite}: {name} {times[name]:.1f}s", flush=True)

    try:
        with stage("debootstrap"):
            fresh_root.debootstrap()
        with stage("copy"):
            src = fresh_root.copy_repo(REPO)
        with stage("setup"):
            first = fresh_root.run(f"cd {src} && bash scripts/setup.sh", "setup", timeout=2400).stdout.splitlines()
        report["setup_output_lines"] = len(first)
        # a newcomer's first run: one line per phase, the package managers' output in the named log
        assert len(first) < 80 and all(line.startswith("setup: ") for line in first), "\n".join(first[-40:])
        fresh_root.run(f"grep -q '^Setting up podman' {src}/results/setup.log", "setup-log", timeout=60)  # fails if absent
        report["python"] = fresh_root.run(f"{src}/.venv/bin/python -c 'import platform; print(platform.python_version())'",
                                          "python", timeout=60).stdout.strip().splitlines()[-1]
        with stage("unit"):
            unit = fresh_root.run(f"cd {src} && .venv/bin/python -m pytest -q suites/unit -p no:cacheprovider",
                                  "unit", timeout=1800)
        summary = [line for line in unit.stdout.splitlines() if re.search(r"\d+ passed", line)]
        report["unit_summary"] = summary[-1].strip("= ") if summary else ""
        if fresh_root.cache:
            fresh_root.run("apt-get autoclean -q", "autoclean", timeout=300)  # keeps the cache to current versions
        report["status"] = "passed"
    finally:
        report["total_s"] = round(time.monotonic() - start, 1)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"fresh-setup-{fresh_root.suite}.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nfresh-setup {fresh_root.suite}: {json.dumps(report)}", flush=True)
    # run() already failed the test on a non-zero exit; the summary must also show the tier ran
    assert re.fullmatch(r"\d+ passed(, \d+ (skipped|xfailed|deselected))* in .*", str(report["unit_summary"]))
