"""pytest11 entry point ``agentbox``: options, markers, fixtures, artifacts, reaping, summaries.

Loads cleanly in any project (nothing is probed until a fixture needs it).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from agentbox_harness import artifacts, evidence_bundle, run_reaper as reaper
from agentbox_harness.artifacts import MACHINES, REPORTS
from agentbox_harness.session import KEY, evidence_dir, harness, podman_api_scope
from agentbox_runtime import guest_registry
from agentbox_runtime.config import check_location
from agentbox_runtime.doctor import standin_in_use
from agentbox_runtime.images.recipe import DEFAULT_TAG
from agentbox_runtime.container import podman_api
from agentbox_runtime.errors import AgentboxError, InputError
from agentbox_runtime.private_dir import OutputDir, UnsafeDirectory
from agentbox_harness.caps import CAP_MARKERS, check_markers
from agentbox_runtime.microvm.task_reaper import reap_stale
from agentbox_runtime.state import StateLayout

MARKERS = {
    "vm": "boots a real guest (qemu, libkrun or krun-podman backend)",
    "needs_kvm": "needs a /dev/kvm that boots guests",
    "needs_libkrun": "needs libkrun.so and libkrunfw (or crun with +LIBKRUN)",
    "needs_root": "needs root on the host",
    "destructive": "changes host state outside the per-test state root",
    "slow": "takes minutes (image build, several boots)",
    "nightly": "runs in the nightly VM validation, not in the per-commit CI (see README)",
    "cold_boot": "qemu guests of this test boot cold instead of restoring from a snapshot template (boot "
                 "flows, kernel or initramfs behaviour)",
    "krun_podman_too": "a ``guest`` test that also runs on krun-podman (libkrun mode), besides the session backend",
}
REAPED = pytest.StashKey[list[str]]()
LEAKS = pytest.StashKey[list[str]]()
REFUSED = pytest.StashKey[list[str]]()
"""Output the run could not write (a refused output dir), for the terminal summary."""


pytest_plugins = ["agentbox_harness.fixtures"]
"""The fixtures live in their own module, registered with the plugin (no star import)."""

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("agentbox", "agentbox microVM harness")
    group.addoption("--agentbox-backend", default="auto",
                    choices=("auto", "qemu", "krun-podman", "krun-direct", "container"),
                    help="backend for VM fixtures (default: best available)")
    group.addoption("--agentbox-image", default=None, help="guest image reference (default: build localhost/agentbox:latest)")
    group.addoption("--agentbox-kernel", default=None, help="kernel for the qemu backend (default: the image's)")
    group.addoption("--agentbox-state-dir", default=None,
                    help="state root base (default: isolated per test under the pytest tmp dir)")
    group.addoption("--preserve-debug", action="store_true",
                    help="keep VMs, disks, task rootfs and logs; print commands to inspect them")
    group.addoption("--agentbox-strict", action="store_true",
                    help="a missing capability fails the test instead of skipping it; a krun backend served by a "
                         "QEMU stand-in counts as missing unless --agentbox-allow-standins")
    group.addoption("--agentbox-allow-standins", action="store_true",
                    help="count the QEMU stand-ins (agentbox-krun-runtime, the libkrun stand-in) as the krun "
                         "backends under --agentbox-strict (also AGENTBOX_ALLOW_STANDINS=1)")
    group.addoption("--agentbox-timeout-scale", type=float, default=None,
                    help="multiply every wait timeout (default: 4 under TCG, 1 with KVM)")
    group.addoption("--agentbox-timeout", type=float, default=None,
                    help="seconds a verb waits when the test passes no timeout (default: ini agentbox_timeout, "
                         "else 60; scaled like every timeout)")
    group.addoption("--agentbox-evidence", nargs="?", const="", default=None, metavar="DIR",
                    help="keep an evidence bundle per test (redacted transcript, console log, launch config, "
                         "SHA-256 index) under DIR (default results/evidence); `agentbox evidence verify` checks one")
    group.addoption("--agentbox-boot", choices=("restore", "cold"), default="restore",
                    help="qemu guests: restore from a snapshot template (default; built once per image, kernel, "
                         "memory and vCPUs) or boot each cold (the cold_boot marker does it for one test)")
    parser.addini("agentbox_timeout", "seconds a verb waits when the test passes no timeout (default 60)",
                  default="60")


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _xdist_controller(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not _is_worker(config)


def pytest_configure(config: pytest.Config) -> None:
    podman_api_scope(config)
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    if config.getoption("--preserve-debug", default=False) and _xdist_controller(config):
        raise pytest.UsageError("--preserve-debug keeps VM state for inspection and cannot run under xdist; "
                                "drop -n (or pass -n 0)")
    if _xdist_controller(config) and getattr(config.option, "testrunuid", "") is None:
        config.option.testrunuid = uuid.uuid4().hex  # known here, so the leak check can find the workers' runs
    state_dir = config.getoption("--agentbox-state-dir", default=None)
    if state_dir and Path(state_dir).is_dir():
        try:
            check_location(Path(state_dir))
        except InputError as exc:
            raise pytest.UsageError(f"--agentbox-state-dir {exc}") from None
    _check_output_dirs(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``@pytest.mark.krun_podman_too``: run the test on the session backend and on krun-podman
    (libkrun mode through Podman), each as its own item (``[qemu]``, ``[krun-podman]``)."""
    if metafunc.definition.get_closest_marker("krun_podman_too") is None:
        return
    if "agentbox_backend" not in metafunc.fixturenames:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: krun_podman_too needs the guest or "
                                "agentbox_backend fixture")
    backends = list(dict.fromkeys([harness(metafunc.config).backend, "krun-podman"]))
    metafunc.parametrize("agentbox_backend", backends, indirect=True, ids=backends)


def image_line(h: Any) -> str:
    """The guest image and its id when it is already built (the build itself waits for the first VM)."""
    ref = h.image_option or DEFAULT_TAG
    try:
        attrs = podman_api.image_inspect(ref) if shutil.which("podman") else None
    except AgentboxError as exc:
        return f"{ref} ({exc})"
    if attrs is None:
        return f"{ref} (not built yet: built before the first guest boots)"
    user = h.image_user()
    who = "" if user.is_default else f", user {user.user} {user.uid}:{user.gid}, workdir {user.workdir}"
    return f"{ref} ({str(attrs.get('Id', ''))[:12]}{who})"


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which backend VM fixtures use, and why (``auto`` probes libkrun once when it loads)."""
    h = harness(config)
    lines = [f"agentbox: backend {h.backend} ({h.backend_reason})",
             f"agentbox: accelerator {h.accelerator}, timeout scale {h.timeout_scale}, image {image_line(h)}, "
             f"kernel {h.kernel or 'the image /boot kernel'}"]
    for backend in ("krun-direct", "krun-podman"):
        standin = standin_in_use(backend, h.checks)
        if standin and (backend == h.backend or backend == "krun-podman"):
            lines.append(f"agentbox: {backend} runs through {standin}"
                         + ("" if h.allow_standins or not h.strict else
                            " (--agentbox-strict: its tests fail; --agentbox-allow-standins counts it)"))
    return lines


def pytest_sessionstart(session: pytest.Session) -> None:
    """Reap what dead runs left (their registries name it); a live run's things are never touched."""
    config = session.config
    if _is_worker(config):
        return
    config.stash[REAPED] = reaper.reap_dead_runs()
    state_dir = config.getoption("--agentbox-state-dir", default=None)
    if state_dir and Path(state_dir).is_dir():

        app = Path(state_dir) / "agentbox"
        config.stash[REAPED] += reap_stale(StateLayout(app, app.name, app, app))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:

    if any(item.get_closest_marker(m) for m in CAP_MARKERS):
        check_markers(harness(item.config), item)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Remember each phase's report; after teardown keep or remove the test's artifacts."""
    rep = yield
    reports = item.stash.setdefault(REPORTS, {})
    reports[rep.when] = rep
    if rep.failed and rep.when in ("setup", "call"):
        _show_live_guests(item, rep)
    if rep.when == "teardown" and KEY in item.config.stash:
        _write_evidence(item, rep, reports)
        _finalize_artifacts(item, rep, reports)
    return rep


def _show_live_guests(item: pytest.Item, rep: pytest.TestReport) -> None:
    """How to attach to the failed test's live guests: a report section and, under ``--pdb``, a line
    before the prompt (reachable now, and after the run with ``--preserve-debug``)."""
    live = [m for m in item.stash.get(MACHINES, []) if m.guest_id]
    if not live:
        return
    lines = [f"{m.name}: agentbox attach {m.guest_id}" for m in live]
    rep.sections.append(("agentbox guests", "\n".join(lines)))
    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    if item.config.getoption("usepdb", False) and reporter is not None:
        for line in lines:  # before the (Pdb) prompt: the guest is live while pdb waits
            reporter.write_line(f"agentbox: {line}")


def _write_evidence(item: pytest.Item, rep: pytest.TestReport, reports: dict[str, pytest.TestReport]) -> None:
    """The test's evidence bundle under ``--agentbox-evidence`` (a refused dir fails the teardown)."""
    session = item.config.stash[KEY]
    if session.evidence_dir is None:
        return
    try:
        root = evidence_bundle.write(item.config, item.nodeid, reports, session.evidence_dir, session.redactor)
    except AgentboxError as exc:
        _refused(rep, "evidence", exc)
        return
    if root is not None:
        rep.sections.append(("agentbox evidence", f"{root[0]} (root sha256 {root[1]})"))


def _finalize_artifacts(item: pytest.Item, rep: pytest.TestReport, reports: dict[str, pytest.TestReport]) -> None:
    """Keep (``--preserve-debug``, a failure) or remove the test's artifacts; where they were kept."""
    session = item.config.stash[KEY]
    try:
        kept = artifacts.finalize(item.config, item.nodeid, reports, preserve=session.preserve_debug,
                                  doctor=[c.as_dict() for c in session.checks])
    except AgentboxError as exc:
        _refused(rep, "artifacts", exc)
        return
    if kept is not None:
        rep.sections.append(("agentbox artifacts", str(kept)))


def _refused(rep: pytest.TestReport, what: str, exc: AgentboxError) -> None:
    """An output dir refused (a planted link, another user's dir): the teardown fails with its one line."""
    line = f"agentbox {what} not written: {exc}"
    if rep.failed:
        rep.sections.append((f"agentbox {what}", line))
    else:
        rep.outcome, rep.longrepr = "failed", line


def _check_output_dirs(config: pytest.Config) -> None:
    """``--agentbox-evidence DIR`` and ``--alluredir DIR``, when they exist, must be real
    directories of ours (never a link): a usage error of one line, before anything is written."""
    for option, path in (("--agentbox-evidence", evidence_dir(config)),
                         ("--alluredir", getattr(config.option, "allure_report_dir", None))):
        if path and os.path.lexists(path):
            try:
                OutputDir.open(Path(path), create=False).close()
            except UnsafeDirectory as exc:
                raise pytest.UsageError(f"{option}: {exc}") from None


def _run_registries(config: pytest.Config) -> list[reaper.RunRegistry]:
    """This process's registry, and under an xdist controller those its workers left (they leaked)."""
    regs: list[reaper.RunRegistry] = []
    own = config.stash[KEY]._registry if KEY in config.stash else None
    if own is not None:
        regs.append(own)
    uid = getattr(config.option, "testrunuid", None)
    if _xdist_controller(config) and uid:
        for path in sorted(reaper.registry_dir().glob(f"pytest-{uid[:12]}-*.json")):
            try:
                regs.append(reaper.RunRegistry.load(path))
            except (OSError, ValueError, KeyError):
                continue
    return regs


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After every fixture is torn down (also after Ctrl-C): list what this run left behind.

    Strict mode fails the run on a leak. A clean run's registry is removed; a leaky one
    stays so the next run reaps it once this process is gone."""
    config = session.config
    keep: set[str] = set()
    if KEY in config.stash:
        keep = {path for kept in config.stash[KEY].preserved for path in kept.paths}
        keep |= guest_registry.preserved_paths()
        _write_environment(config)
    found: list[str] = []
    for reg in _run_registries(config):
        leaks = reaper.settle(reg, keep)
        found += leaks
        if not leaks and reg.owner == os.getpid():
            reg.path.unlink(missing_ok=True)
    config.stash[LEAKS] = found
    strict = bool(config.getoption("--agentbox-strict", default=False))
    preserve = bool(config.getoption("--preserve-debug", default=False))
    if found and strict and not preserve and not _is_worker(config) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _write_environment(config: pytest.Config) -> None:
    """Allure ``environment.properties`` (once per run): host, backend, accelerator, tool versions."""
    alluredir = getattr(config.option, "allure_report_dir", None)
    if not alluredir:
        return
    h = config.stash[KEY]
    by = {c.name: c.detail.splitlines()[0] if c.detail else c.status for c in h.checks}
    ran = {f"agentbox.{b}": standin_in_use(b, h.checks) or "real" for b in ("krun-direct", "krun-podman")}
    values = {"agentbox.backend": h.backend, "agentbox.timeout_scale": h.timeout_scale,
              "agentbox.strict": h.strict, **ran, **{f"tool.{n}": by[n] for n in ("qemu", "podman", "crun-krun", "libkrun")
                                              if n in by}}
    try:
        artifacts.write_allure_environment(alluredir, artifacts.environment_properties(values))
    except AgentboxError as exc:
        config.stash[REFUSED] = [f"Allure environment.properties not written: {exc}"]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    tr = terminalreporter
    reaped = config.stash.get(REAPED, [])
    if reaped:
        tr.section("agentbox: reaped what a dead run left")
        for line in reaped:
            tr.write_line(line)
    if KEY in config.stash and config.stash[KEY].preserved:
        tr.section("agentbox: preserved debug state")
        for kept in config.stash[KEY].preserved:
            for line in kept.lines:
                tr.write_line(line)
    for line in config.stash.get(REFUSED, []):
        tr.write_line(f"agentbox: {line}")
    leaks = config.stash.get(LEAKS, [])
    if leaks:
        tr.section("agentbox: leaked resources")
        for line in leaks:
            tr.write_line(line)
        if config.getoption("--agentbox-strict", default=False):
            tr.write_line("--agentbox-strict: leaks fail the run")
