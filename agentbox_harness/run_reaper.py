"""Leak protection that does not depend on fixture teardown running.

Every pytest process that uses a harness fixture keeps a registry file
``<cache>/agentbox/harness-runs/<run label>.json`` naming its owner process
(pid and start time), its run label (put on every container it starts) and
the directories it created (per-test tmp roots and state bases) and mounts.

- At session start, :func:`reap_dead_runs` reaps what a run whose owner
  process is gone left behind: its labelled containers, recorded VM processes
  and task dirs (through :mod:`agentbox_runtime.microvm.task_reaper`), recorded mounts and
  loop devices backed by files under its roots. Nothing else is touched: a
  live run's registry is never read for reaping and nothing unrecorded is
  ever unmounted or removed.
- At session end, :func:`leaks` lists what this run created that is still
  there; the plugin reports it (and fails the run under ``--agentbox-strict``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agentbox_harness.wait import WaitTimeout, retry
from agentbox_guest_init.contract import LABEL_HARNESS_RUN
from agentbox_runtime.microvm import task_reaper as vm_reaper
from agentbox_runtime import guest_registry
from agentbox_runtime.container import podman_api
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.state import StateLayout

TOOL_TIMEOUT_S = 60.0
UNLISTED = "containers not listed"
"""How a leak or reap line starts when Podman could not be asked for a run's containers."""


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/agentbox`` (else ``~/.cache/agentbox``): image caches and run registries."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agentbox"


def registry_dir() -> Path:
    """Where run registries live (mode 0700)."""
    path = cache_root() / "harness-runs"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


@dataclass
class RunRegistry:
    """What one pytest process created; persisted after every change."""

    path: Path
    run_label: str
    owner: int = field(default_factory=os.getpid)
    owner_start: str | None = field(default_factory=lambda: vm_reaper.start_time(os.getpid()))
    roots: list[str] = field(default_factory=list)
    state_bases: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, run_label: str) -> RunRegistry:
        """A new registry for ``run_label`` owned by this process."""
        reg = cls(registry_dir() / f"{run_label}.json", run_label)
        reg.save()
        return reg

    @classmethod
    def load(cls, path: Path) -> RunRegistry:
        """A registry file; refused (ValueError) unless it is a regular file owned by us."""
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise ValueError(f"run registry {path} is not a regular file owned by uid {os.geteuid()}")
        data = json.loads(path.read_text())
        return cls(path, str(data["run_label"]), int(data["owner"]), data.get("owner_start"),
                   list(data.get("roots", [])), list(data.get("state_bases", [])), list(data.get("mounts", [])))

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_label": self.run_label, "owner": self.owner, "owner_start": self.owner_start,
                                   "roots": self.roots, "state_bases": self.state_bases, "mounts": self.mounts}))
        tmp.replace(self.path)

    def _add(self, items: list[str], path: Path) -> None:
        if str(path) not in items:
            items.append(str(path))
            self.save()

    def add_root(self, path: Path) -> None:
        """A directory this run owns (mounts and loop devices under it are ours)."""
        self._add(self.roots, path)

    def add_state_base(self, path: Path) -> None:
        """A state base whose ``agentbox/microvm/running`` records this run's VMs."""
        self._add(self.state_bases, path)

    def add_mount(self, path: Path) -> None:
        """A mount point this run created (removed again with :meth:`drop_mount`)."""
        self._add(self.mounts, path)

    def drop_mount(self, path: Path) -> None:
        if str(path) in self.mounts:
            self.mounts.remove(str(path))
            self.save()

    def owner_alive(self) -> bool:
        return vm_reaper.same_process(self.owner, self.owner_start)


# --- what is there ---------------------------------------------------------
def labelled_containers(run_label: str) -> list[str]:
    """``<short id> <name>`` of the Podman containers (any state) carrying
    ``io.agentbox.harness.run=<run_label>`` (a Podman API query; none without Podman)."""
    if shutil.which("podman") is None:
        return []
    return [f"{c.id} {c.name}" for c in podman_api.containers({LABEL_HARNESS_RUN: run_label})]


def _unescape(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mounts_under(roots: list[str]) -> list[str]:
    """Mount points at or below any of ``roots`` (deepest first)."""
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        point = _unescape(line.split()[4])
        if any(point == r or point.startswith(r.rstrip("/") + "/") for r in roots):
            found.append(point)
    return sorted(set(found), key=len, reverse=True)


def loops_under(roots: list[str]) -> list[tuple[str, str]]:
    """``(loop device, backing file)`` for loop devices backed by a file below ``roots``."""
    out = []
    for dev in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if any(backing.startswith(r.rstrip("/") + "/") for r in roots):
            out.append((f"/dev/{dev.name}", backing))
    return out


def _layouts(state_bases: list[str]) -> list[StateLayout]:
    apps = [Path(base) / "agentbox" for base in state_bases]
    return [StateLayout(app, app.name, app, app) for app in apps if app.is_dir()]


def live_vms(state_bases: list[str], run_label: str) -> list[str]:
    """This run's recorded VM processes in these state bases that are still running (a state base
    shared with other runs through ``--agentbox-state-dir`` also holds theirs: never counted)."""
    out = []
    for layout in _layouts(state_bases):
        for rec in vm_reaper.records(layout):
            pid = rec.get("pid")
            if rec.get("run_label") == run_label and isinstance(pid, int) \
                    and vm_reaper.same_process(pid, rec.get("start")):
                out.append(f"VM process {pid} (task dir {rec.get('task_dir')})")
    return out


def task_dirs(state_bases: list[str], keep: set[str], run_label: str, roots: list[str]) -> list[str]:
    """This run's task dirs (``<state root>/microvm-tasks/*``) still present, except the preserved ones in
    ``keep``: those recorded with this run's label, and unrecorded ones under this run's own roots."""
    labels = {Path(str(rec["task_dir"])).name: rec.get("run_label")
              for layout in _layouts(state_bases) for rec in vm_reaper.records(layout)}
    out = []
    for base in state_bases:
        for d in sorted(Path(base).glob("agentbox/*/microvm-tasks/*")):
            if not d.is_dir() or str(d) in keep:
                continue
            ours = labels[d.name] == run_label if d.name in labels else _under(str(d), roots)
            if ours:
                out.append(str(d))
    return out


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def leaks(reg: RunRegistry, keep: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """One line per resource this run created that is still there (``keep``: preserved paths)."""
    tasks = task_dirs(reg.state_bases, keep, reg.run_label, reg.roots)
    found, out = _run_containers(reg)
    out += [f"container {c} (label {LABEL_HARNESS_RUN}={reg.run_label})" for c in found]
    out += live_vms(reg.state_bases, reg.run_label)
    out += [f"mount {m}" for m in mounts_under(reg.roots + reg.mounts + tasks)
            if not any(m == k or m.startswith(k + "/") for k in keep)]
    out += [f"loop device {dev} (backing {f})" for dev, f in loops_under(reg.roots)]
    out += [f"task dir {d}" for d in tasks]
    return out


def _run_containers(reg: RunRegistry) -> tuple[list[str], list[str]]:
    """This run's labelled containers (``<id> <name>``) but preserved guests' (only ``agentbox rm``
    removes those), and a :data:`UNLISTED` line when Podman could not be asked."""
    kept = guest_registry.preserved_containers()
    try:
        found = labelled_containers(reg.run_label)
    except AgentboxError as exc:
        return [], [f"{UNLISTED} (label {LABEL_HARNESS_RUN}={reg.run_label}): {exc}"]
    return [c for c in found if c.split()[-1] not in kept and c.split()[0] not in kept], []


# --- reaping ---------------------------------------------------------------
def _unmount(point: str) -> bool:
    for argv in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
        try:
            if subprocess.run([*argv, point], capture_output=True, timeout=TOOL_TIMEOUT_S).returncode == 0:
                return True
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
    return False


def _reap_containers(reg: RunRegistry) -> list[str]:
    """Remove this run's labelled containers (``rm -f -t 0`` through the API); an :data:`UNLISTED`
    line when Podman could not be asked, which keeps the registry for the next run to try again."""
    found, done = _run_containers(reg)
    for c in found:
        try:
            removed = podman_api.remove_container(c.split()[0])
        except AgentboxError as exc:
            done.append(f"{UNLISTED}: container {c} not removed: {exc}")
        else:
            done += [f"container {c}"] if removed else []
    return done


def reap(reg: RunRegistry) -> list[str]:
    """Remove everything ``reg`` recorded that is still there; one line per thing reaped."""
    kept_paths = guest_registry.preserved_paths()
    done = _reap_containers(reg)
    for base in reg.state_bases:
        app = Path(base) / "agentbox"
        if app.is_dir():
            done += [f"task {t}" for t in vm_reaper.reap_stale(StateLayout(app, app.name, app, app),
                                                               include_label=reg.run_label)]
    for point in mounts_under(reg.roots + reg.mounts):  # never a shared state base: other runs' mounts live there
        if any(point == k or point.startswith(k.rstrip("/") + "/") for k in kept_paths):
            continue
        if _unmount(point):
            done.append(f"mount {point}")
    for dev, backing in loops_under(reg.roots):
        if subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=TOOL_TIMEOUT_S).returncode == 0:
            done.append(f"loop device {dev} ({backing})")
    return done


def reap_dead_runs() -> list[str]:
    """Reap the registries of runs whose owner process is gone; what was reaped.

    A registry whose owner is alive (a concurrent run) is left alone."""
    done: list[str] = [f"guest record {g}" for g in guest_registry.prune_stale()]
    root = cache_root() / "harness-runs"
    if not root.is_dir():
        return done
    for path in sorted(root.glob("*.json")):
        try:
            reg = RunRegistry.load(path)
        except (OSError, ValueError, KeyError):
            continue
        if reg.owner_alive():
            continue
        lines = reap(reg)
        done += lines
        if not any(line.startswith(UNLISTED) for line in lines):
            path.unlink(missing_ok=True)
    return done


def settled(probe: Callable[[], list[str]], wait_s: float) -> list[str]:
    """What ``probe`` still finds after giving exiting processes up to ``wait_s`` seconds to go
    (empty as soon as it finds nothing)."""
    found: list[str] = []

    def gone(_last_try: bool) -> bool:
        found[:] = probe()
        return not found

    with contextlib.suppress(WaitTimeout):
        retry(gone, timeout=wait_s, interval=0.25)
    return found


def settle(reg: RunRegistry, keep: set[str], wait_s: float = 5.0) -> list[str]:
    """The leaks of ``reg`` after giving exiting processes up to ``wait_s`` seconds to go."""
    return settled(lambda: leaks(reg, keep), wait_s)
