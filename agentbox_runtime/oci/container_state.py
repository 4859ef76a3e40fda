"""Per-container state of ``agentbox-krun-runtime``: one private directory per container id.

``<root>/agentbox-krun/<id>/`` holds ``state.json`` (id, pid, the pid's start time,
bundle, annotations, creation time), ``start.fifo`` (the shim waits on it until
``start``), ``started`` (written when the guest boots) and ``console.log`` (the
guest kernel's console, capped). ``<root>`` is the global ``--root`` option, by
default ``/run/agentbox-krun-runtime`` for root and
``$XDG_RUNTIME_DIR/agentbox-krun-runtime`` otherwise; every level is private, and a record
is believed only when nobody else can have written it (:mod:`agentbox_runtime.oci.state_trust`).
A signal goes to the container process only while it still is the process ``create``
started: same pid and start time, sent through a pidfd so a reused pid is never hit.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.processes import same_process, start_time
from agentbox_runtime.oci.state_trust import STATE_FILE, ensure_root, read_record
from agentbox_runtime.private_dir import ensure_private

SUBDIR = "agentbox-krun"
CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class StateError(AgentboxError):
    """The container's state is missing or unusable."""


def default_root() -> Path:
    if os.geteuid() == 0:
        return Path("/run/agentbox-krun-runtime")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return Path(base) / "agentbox-krun-runtime"


def check_id(container_id: str) -> str:
    if not CONTAINER_ID.fullmatch(container_id):
        raise StateError(f"invalid container id {container_id!r}; accepted: letters, digits, '_', '.', '-' "
                         "(at most 128)")
    return container_id


@dataclass
class ContainerState:
    """One container's directory and record."""

    dir: Path
    record: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def pid(self) -> int:
        return int(self.record.get("pid") or 0)

    @property
    def fifo(self) -> Path:
        return self.dir / "start.fifo"

    def alive(self) -> bool:
        """Whether the container process (the shim) still runs (same pid, same start time, no zombie)."""
        return self.pid > 0 and self.record.get("pid_start") is not None \
            and same_process(self.pid, self.record["pid_start"])

    def status(self) -> str:
        """``created`` (waiting for start), ``running`` or ``stopped``, as the OCI spec names them."""
        if not self.alive():
            return "stopped"
        return "running" if (self.dir / "started").exists() else "created"

    def oci_state(self) -> dict[str, Any]:
        status = self.status()
        return {"ociVersion": "1.0.2", "id": self.id, "status": status,
                "pid": self.pid if status != "stopped" else 0, "bundle": self.record.get("bundle", ""),
                "rootfs": self.record.get("rootfs", ""), "created": self.record.get("created", ""),
                "annotations": self.record.get("annotations", {}), "owner": ""}

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the container process while it still is the one ``create`` started
        (:meth:`alive` checked through a pidfd held across the check, so a pid reused in between
        is never signalled); :class:`StateError` when it is not running."""
        if not self.alive():
            raise StateError(f"container {self.id} is not running")
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            raise StateError(f"container {self.id} is not running") from None
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            os.kill(self.pid, sig)  # a kernel without pidfds: the start time was checked just above
            return
        try:
            if not self.alive():
                raise StateError(f"container {self.id} is not running")
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            raise StateError(f"container {self.id} is not running") from None
        finally:
            os.close(pidfd)

    def save(self) -> None:
        tmp = self.dir / f"{STATE_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.record))
        os.replace(tmp, self.dir / STATE_FILE)

    def set_pid(self, pid: int) -> None:
        self.record["pid"] = pid
        self.record["pid_start"] = start_time(pid)
        self.save()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class StateStore:
    """The containers under one ``--root``."""

    def __init__(self, root: Path | None = None) -> None:
        self.top = root or default_root()
        self.root = self.top / SUBDIR

    def _base(self) -> Path:
        ensure_root(self.top)
        return ensure_private(self.root)

    def create(self, container_id: str, bundle: Path, rootfs: Path, annotations: dict[str, str]) -> ContainerState:
        d = self._base() / check_id(container_id)
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            raise StateError(f"container {container_id} already exists") from None
        st = ContainerState(d, {"id": container_id, "bundle": str(bundle), "rootfs": str(rootfs),
                                "annotations": annotations, "pid": 0, "pid_start": None,
                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        st.save()
        os.mkfifo(st.fifo, 0o600)
        return st

    def get(self, container_id: str) -> ContainerState | None:
        """The container's state, or None when this runtime does not know it (it may be runc's).
        Raises :class:`~agentbox_runtime.oci.state_trust.UntrustedState` for a record someone else
        could have written."""
        record = read_record(self.top, SUBDIR, check_id(container_id))
        return None if record is None else ContainerState(self.root / container_id, record)
