"""A harness ``containers.conf`` for hosts whose Podman defaults do not run.

Podman reads ``$CONTAINERS_CONF`` (only that file) when it is set. On hosts
where crun refuses the cgroup layout, or where Podman's default ulimits
exceed the host's hard limits (``runc create failed: ... error setting
rlimits``), point it at the file this module writes; every Podman call of
the process (sidecar, probe, task, ``podman unshare``) then uses runc and
ulimits within the host's limits, and the agentbox argv stays exactly the
reference form::

    export CONTAINERS_CONF=$(python -c \\
        'from agentbox_runtime.container.host_conf import ensure; print(ensure())')
"""

from __future__ import annotations

import contextlib
import os
import resource
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from agentbox_runtime.hostcheck.parsers import cgroup_layout
from agentbox_runtime.private_dir import runtime_dir

ENV: Final = "CONTAINERS_CONF"
NOFILE_CAP: Final = 16384
NPROC_CAP: Final = 8192


def host_ulimits() -> tuple[int, int]:
    """(nofile, nproc) soft=hard values within this host's hard limits."""
    def capped(kind: int, cap: int) -> int:
        hard = resource.getrlimit(kind)[1]
        return cap if hard == resource.RLIM_INFINITY else min(cap, hard)
    return capped(resource.RLIMIT_NOFILE, NOFILE_CAP), capped(resource.RLIMIT_NPROC, NPROC_CAP)


def render(runtime: str = "runc", nofile: int = NOFILE_CAP, nproc: int = NPROC_CAP) -> str:
    """The ``containers.conf`` text: OCI runtime and default ulimits."""
    return (
        "# written by agentbox-harness (agentbox_runtime.container.host_conf)\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "\n[engine]\n"
        f'runtime = "{runtime}"\n'
    )


PODMAN_DEFAULT_NOFILE: Final = 1048576


def needed(mountinfo: str | None = None) -> str | None:
    """Why this host's Podman defaults cannot run containers (None: they can): a cgroup layout that
    crun refuses (anything but a pure cgroup2 mount), or a hard open-files limit below the
    1048576 that Podman asks for."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            mountinfo = ""
    layout = cgroup_layout(mountinfo)
    if layout not in ("v2", "none"):
        return f"the cgroup layout is {layout} (crun needs a unified cgroup2 mount)"
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < PODMAN_DEFAULT_NOFILE:
        return f"the hard open-files limit {hard} is below Podman's default {PODMAN_DEFAULT_NOFILE}"
    return None


def apply_if_needed() -> Path | None:
    """Point ``$CONTAINERS_CONF`` at the harness file when this host needs it and the user has not
    chosen one; the path, or None when nothing changed."""
    if os.environ.get(ENV) or needed() is None:
        return None
    path = ensure()
    os.environ[ENV] = str(path)
    return path


@contextlib.contextmanager
def applied(path: Path | None = None) -> Iterator[Path]:
    """``$CONTAINERS_CONF`` pointing at the harness file for the duration of the block (restored
    afterwards: nothing outlives the caller)."""
    target = ensure(path)
    previous = os.environ.get(ENV)
    os.environ[ENV] = str(target)
    try:
        yield target
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous


def default_path() -> Path:
    """``containers.conf`` in the per-user private runtime dir (:mod:`agentbox_runtime.private_dir`), never a
    shared /tmp path: a dir another user created first is refused, not used."""
    return runtime_dir("podman") / "containers.conf"


def ensure(path: Path | None = None, runtime: str = "runc") -> Path:
    """Write the harness ``containers.conf`` (if it differs) and return its path.

    The file is written 0600 through a new temporary file (``O_EXCL|O_NOFOLLOW``)
    renamed over the target, so a planted symlink is replaced, never followed."""
    target = path or default_path()
    text = render(runtime, *host_ulimits())
    if path is not None:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if _current(target) != text:
        tmp = target.with_name(target.name + f".tmp.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    return target


def _current(target: Path) -> str | None:
    """The target's text when it is a regular file we own (anything else is rewritten)."""
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > 65536:
            return None
        return f.read()
