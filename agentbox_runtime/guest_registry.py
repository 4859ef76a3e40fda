"""Harness guests that ``agentbox ps``, ``agentbox attach`` and ``agentbox rm`` know.

A harness machine that can be attached to writes one record here when it
starts and removes it when it stops: a qemu guest (its ``org.agentbox.attach``
port is a second agent channel), a krun-direct guest (libkrun bridges a unix
socket to the agent's attach vsock port), a krun-podman task (the agent's TCP
attach port, published on 127.0.0.1 and guarded by a token kept only in the
record and the guest: both prove they hold it before anything else crosses the
port, and ``attach`` refuses once the container is gone) or a container-mode task (``podman exec``). ``--preserve-debug`` marks a
failed test's records ``preserved`` and leaves the guest running: then only
``agentbox rm`` stops it and deletes what the record lists, and the reaper of
later runs leaves it alone.

Records are JSON files in ``<state base>/agentbox/guests/`` (a private 0700 dir),
one per guest, named by its id; a record that is not a regular file of ours is
ignored.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agentbox_runtime.errors import InputError
from agentbox_runtime.processes import same_process, start_time
from agentbox_runtime.private_dir import ensure_private
from agentbox_runtime.state import state_base

MAX_RECORD_BYTES = 65536


@dataclass
class GuestRecord:
    """One guest: how to reach it and what removing it deletes."""

    id: str
    backend: str  # "qemu" | "krun-direct" | "krun-podman" | "container"
    test: str
    state: str = "running"  # "running" (its harness process owns it) | "preserved"
    created: float = field(default_factory=time.time)
    owner: int = field(default_factory=os.getpid)
    owner_start: str | None = None
    pid: int | None = None  # the VMM
    pid_start: str | None = None
    attach_socket: str | None = None  # a unix socket that reaches the agent (qemu, krun-direct)
    attach_tcp: int | None = None  # a 127.0.0.1 port that reaches the agent (krun-podman, while `container` runs)
    attach_token: str | None = None  # both ends prove they hold it (HMAC, protocol.ClientAuth); never sent
    container: str | None = None  # the container `attach` execs into
    containers: list[str] = field(default_factory=list)  # every container `rm` removes (the sidecar too)
    cleanup: list[str] = field(default_factory=list)  # shell commands `agentbox rm` runs, in order
    paths: list[str] = field(default_factory=list)  # what `agentbox rm` deletes afterwards

    def vm_alive(self) -> bool:
        return self.pid is not None and same_process(self.pid, self.pid_start)

    def owner_alive(self) -> bool:
        return same_process(self.owner, self.owner_start)

    def status(self) -> str:
        """``running`` (its test runs), ``preserved`` (kept for debugging), or ``stopped``."""
        if self.pid is not None and not self.vm_alive():
            return "stopped"
        if self.state == "preserved":
            return "preserved"
        return "running" if self.owner_alive() else "stopped"


def registry_dir() -> Path:
    return ensure_private(state_base() / "agentbox" / "guests")


def new_id(backend: str) -> str:
    return f"{backend}-{secrets.token_hex(4)}"


def save(record: GuestRecord) -> Path:
    """Write (or rewrite) ``record``."""
    if record.owner_start is None:
        record.owner_start = start_time(record.owner)
    if record.pid is not None and record.pid_start is None:
        record.pid_start = start_time(record.pid)
    path = registry_dir() / f"{record.id}.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(record), f)
    os.replace(tmp, path)
    return path


def forget(guest_id: str) -> None:
    (registry_dir() / f"{guest_id}.json").unlink(missing_ok=True)


def records() -> list[GuestRecord]:
    """Every readable record, oldest first."""
    out = []
    for p in sorted(registry_dir().glob("*.json")):
        try:
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > MAX_RECORD_BYTES:
                continue
            out.append(GuestRecord(**json.loads(p.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(out, key=lambda r: r.created)


def find(guest_id: str) -> GuestRecord:
    """The record whose id is ``guest_id`` or starts with it (InputError naming the known ids)."""
    known = records()
    hits = [r for r in known if r.id == guest_id] or [r for r in known if r.id.startswith(guest_id)]
    if len(hits) == 1:
        return hits[0]
    ids = ", ".join(r.id for r in known) or "none (agentbox ps lists them)"
    what = "matches several guests" if hits else "is not a known guest"
    raise InputError(f"'{guest_id}' {what}; known: {ids}")


def prune_stale() -> list[str]:
    """Forget records whose test process is gone and that were not preserved (a killed run's; the
    reaper stops their guests); the ids forgotten."""
    gone = [r.id for r in records() if r.state != "preserved" and not r.owner_alive()]
    for guest_id in gone:
        forget(guest_id)
    return gone


def preserved_paths() -> set[str]:
    """Paths of preserved guests (the reaper and the leak check leave them alone)."""
    return {p for r in records() if r.state == "preserved" for p in r.paths}


def preserved_containers() -> set[str]:
    """Names of containers that preserved guests need (the reaper and the leak check leave them alone)."""
    return {name for r in records() if r.state == "preserved" for name in [*r.containers, r.container] if name}
