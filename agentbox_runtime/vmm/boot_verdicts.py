"""Cached probe-boot verdicts per backend: has this backend booted a guest on this host?

``--agentbox-backend=auto`` and ``agentbox doctor`` pick a libkrun backend only
after a probe boot through it succeeded (a library that merely loads proves
nothing). A verdict is keyed by what would change the answer: for krun-direct
the sha256 of the libkrun library that loads. The probe itself lives in
:mod:`agentbox_runtime.microvm.probe`; this module only stores and reads verdicts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from agentbox_runtime.errors import AgentboxError


@dataclass(frozen=True)
class Verdict:
    """One probe boot's outcome."""

    backend: str
    key: str
    ok: bool
    detail: str
    at: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.at))
        return f"probe boot {'passed' if self.ok else 'failed'} {when}: {self.detail}"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agentbox" / "boot-probes"


def file_key(path: str | Path) -> str:
    """sha256 of a file's bytes (a library's identity)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:24]


def _path(backend: str, key: str) -> Path:
    return cache_dir() / f"{backend}-{key}.json"


def read(backend: str, key: str) -> Verdict | None:
    """The recorded verdict, or None when this backend/key was never probed."""
    try:
        raw = json.loads(_path(backend, key).read_text())
        return Verdict(**raw)
    except (OSError, ValueError, TypeError):
        return None


def record(backend: str, key: str, ok: bool, detail: str) -> Verdict:
    """Store a verdict (atomically) and return it."""
    verdict = Verdict(backend, key, ok, detail[-2000:], time.time())
    path = _path(backend, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(verdict)))
    os.replace(tmp, path)
    return verdict


KRUN_DIRECT = "krun-direct"


def krun_direct_key() -> str | None:
    """The verdict key of the libkrun library that loads now (None when none loads)."""
    from agentbox_runtime.vmm.libkrun import library_path

    try:
        return file_key(library_path())
    except (AgentboxError, OSError):
        return None
