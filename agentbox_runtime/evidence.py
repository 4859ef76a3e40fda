"""Evidence bundles: a test's guest transcript, console log and launch config, redacted, with an
index that makes any later change visible.

A bundle is a directory of files plus ``index.json``::

    {"format": 1, "files": {"<relative path>": "<sha256>", ...}, "root_sha256": "<sha256>"}

``root_sha256`` is the SHA-256 of the listing ``"<sha256>  <path>\\n"`` of every file, sorted by
path, so one value pins the whole bundle (keep it elsewhere, e.g. in a CI log, to detect a
rewritten index too). :func:`verify` rechecks a bundle and names every file that changed, went
missing or appeared; ``agentbox evidence verify <dir>`` is its command line.

Nothing is written before :func:`redact` ran over it: the values of environment variables whose
names look secret (:data:`SECRET_NAME`) and every registered secret become ``[REDACTED]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agentbox_runtime.errors import InputError

INDEX = "index.json"
FORMAT = 1
REDACTED = "[REDACTED]"
SECRET_NAME = re.compile(r"(?i)(secret|token|passw(or)?d|passphrase|api[_-]?key|access[_-]?key|private[_-]?key|"
                         r"credential|auth|cookie|session[_-]?id)")
"""Environment variable names whose values are never written."""
MIN_SECRET_CHARS = 4  # shorter values would redact ordinary text


@dataclass
class Redactor:
    """The secrets to keep out of a bundle: registered values and secret-looking env values."""

    secrets: set[str] = field(default_factory=set)

    def register(self, value: str) -> None:
        """Never write ``value`` (at least MIN_SECRET_CHARS characters; shorter ones are refused)."""
        if len(value) < MIN_SECRET_CHARS:
            raise InputError(f"a registered secret must have at least {MIN_SECRET_CHARS} characters")
        self.secrets.add(value)

    def register_env(self, env: Mapping[str, str]) -> None:
        """Register the values of ``env`` whose names match :data:`SECRET_NAME`."""
        for name, value in env.items():
            if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_CHARS:
                self.secrets.add(value)

    def text(self, text: str) -> str:
        """``text`` with every secret replaced (longest first, so a secret containing another goes whole)."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        return text

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` with secret-looking names' values and registered secrets redacted."""
        return {k: REDACTED if SECRET_NAME.search(k) else self.text(v) for k, v in env.items()}

    def data(self, data: bytes) -> bytes:
        """Redact bytes (decoded as UTF-8 with surrogate escapes, so binary survives unchanged)."""
        if not self.secrets:
            return data
        return self.text(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def root_digest(files: Mapping[str, str]) -> str:
    """The SHA-256 of the sorted ``"<sha256>  <path>\\n"`` listing."""
    return _sha256("".join(f"{files[p]}  {p}\n" for p in sorted(files)).encode())


def write_bundle(directory: Path, files: Mapping[str, bytes], redactor: Redactor) -> str:
    """Write ``files`` (relative path -> content, redacted here) and the index into ``directory``
    (created, private); return the root SHA-256."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    digests: dict[str, str] = {}
    for rel, content in sorted(files.items()):
        if rel == INDEX or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise InputError(f"evidence file name {rel!r} is not accepted; accepted: a relative path inside the bundle")
        data = redactor.data(content)
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        digests[rel] = _sha256(data)
    root = root_digest(digests)
    index = {"format": FORMAT, "files": digests, "root_sha256": root}
    (directory / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return root


def _listed(directory: Path) -> Iterable[str]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() or path.is_symlink():
            rel = str(path.relative_to(directory))
            if rel != INDEX:
                yield rel


def verify(directory: Path) -> tuple[str, list[str]]:
    """Recheck a bundle: (root SHA-256 from its index, the problems), each problem naming a file:
    ``changed: F``, ``missing: F``, ``not in the index: F``, or the index itself not adding up.
    InputError when ``directory`` is not a bundle."""
    index_path = directory / INDEX
    if not directory.is_dir():
        raise InputError(f"{directory} is not a directory; accepted: an evidence bundle directory (with {INDEX})")
    try:
        index = json.loads(index_path.read_text())
        files = index["files"]
        root = str(index["root_sha256"])
        if not isinstance(files, dict) or index.get("format") != FORMAT:
            raise ValueError
    except FileNotFoundError:
        raise InputError(f"{directory} has no {INDEX}; accepted: an evidence bundle directory "
                         "(written by pytest --agentbox-evidence)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{index_path} is not a format-{FORMAT} evidence index") from None
    problems = []
    for rel, digest in sorted(files.items()):
        path = directory / rel
        if path.is_symlink() or not path.is_file():
            problems.append(f"missing: {rel}")
        elif _sha256(path.read_bytes()) != digest:
            problems.append(f"changed: {rel}")
    problems += [f"not in the index: {rel}" for rel in _listed(directory) if rel not in files]
    if root_digest(files) != root:
        problems.append(f"changed: {INDEX} (its file list does not add up to its root_sha256)")
    return root, problems
