"""A harness ``containers.conf`` for hosts whose Podman defaults do not run.

Podman reads ``$CONTAINERS_CONF`` (only that file) when it is set. On hosts
where crun refuses the cgroup layout, or where Podman's default ulimits
exceed the host's hard limits (``runc create failed: ... error setting
rlimits``), point it at the file this module writes; every Podman call of
the process (sidecar, probe, task, ``podman unshare``) then uses runc and
ulimits within the host's limits, and the agentbox argv stays exactly the
reference form::

    export CONTAINERS_CONF=$(python -c \\
        'from runtime.container.host_conf import ensure; print(ensure())')
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Final

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
        "# written by agentbox-harness (runtime.container.host_conf)\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "\n[engine]\n"
        f'runtime = "{runtime}"\n'
    )


def default_path() -> Path:
    """``$XDG_RUNTIME_DIR`` (else /tmp) ``/agentbox-harness-<uid>/containers.conf``."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(base) / f"agentbox-harness-{os.getuid()}" / "containers.conf"


def ensure(path: Path | None = None, runtime: str = "runc") -> Path:
    """Write the harness ``containers.conf`` (if it differs) and return its path."""
    target = path or default_path()
    text = render(runtime, *host_ulimits())
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not target.exists() or target.read_text() != text:
        tmp = target.with_name(target.name + f".tmp.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, target)
    return target
