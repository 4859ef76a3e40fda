"""Evidence bundles: a test's guest transcript, console log and launch config, redacted, with an
index that makes any later change visible.

A bundle is a directory of files plus ``index.json``::

    {"format": 1, "files": {"<relative path>": "<sha256>", ...}, "root_sha256": "<sha256>"}

``root_sha256`` is the SHA-256 of the listing ``"<sha256>  <path>\\n"`` of every file, sorted by
path, so one value pins the whole bundle (keep it elsewhere, e.g. in a CI log, to detect a
rewritten index too). :mod:`agentbox_runtime.evidence_verify` rechecks a bundle and names every
file that changed, went missing or appeared; ``agentbox evidence verify <dir>`` is its command line.
Bundles are written through :class:`~agentbox_runtime.private_dir.OutputDir`: no link on the path
is followed and every file is created new.

Nothing is written before a :class:`Redactor` ran over it: the values of environment variables
whose names look secret (:data:`SECRET_NAME`) and every registered secret become ``[REDACTED]``
(by known value), and output that looks like a credential (tokens, PEM private keys,
``Authorization:`` and cookie header values; see :mod:`agentbox_runtime.credential_patterns`)
becomes ``[REDACTED:<kind>]`` (by pattern), wherever it appears: a transcript's argv and env, the
console log, the launch config.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agentbox_runtime.credential_patterns import redact_credentials
from agentbox_runtime.errors import InputError, one_line
from agentbox_runtime.private_dir import OutputDir

INDEX = "index.json"
FORMAT = 1
REDACTED = "[REDACTED]"
SECRET_NAME = re.compile(r"(?i)(secret|token|passw(or)?d|passphrase|api[_-]?key|access[_-]?key|private[_-]?key|"
                         r"credential|auth|cookie|session[_-]?id)")
"""Environment variable names whose values are never written."""
MIN_SECRET_CHARS = 4  # shorter values would redact ordinary text


@dataclass
class Redactor:
    """The secrets to keep out of a bundle: registered values, secret-looking env values and
    (always) credential-looking text."""

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
        """``text`` with every secret replaced (longest first, so a secret containing another goes
        whole), then every credential-looking run (:func:`~agentbox_runtime.credential_patterns.redact_credentials`)."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        return redact_credentials(text)

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` with secret-looking names' values and registered secrets redacted."""
        return {k: REDACTED if SECRET_NAME.search(k) else self.text(v) for k, v in env.items()}

    def data(self, data: bytes) -> bytes:
        """Redact bytes (decoded as UTF-8 with surrogate escapes, so binary survives unchanged)."""
        return self.text(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


def sha256(data: bytes) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def root_digest(files: Mapping[str, str]) -> str:
    """The SHA-256 of the sorted ``"<sha256>  <path>\\n"`` listing."""
    return sha256("".join(f"{files[p]}  {p}\n" for p in sorted(files)).encode())


def bad_name(rel: str) -> bool:
    """Whether ``rel`` is not a plain relative path inside a bundle: empty, absolute, with a
    ``.``, ``..`` or empty part, or a NUL."""
    return not rel or "\0" in rel or any(part in ("", ".", "..") for part in rel.split("/"))


def check_names(files: Iterable[str]) -> None:
    """InputError (before anything is written) for a file name a bundle cannot hold."""
    for rel in files:
        if rel == INDEX or bad_name(rel):
            raise InputError(f"evidence file name {one_line(repr(rel))} is not accepted; accepted: a relative "
                             f"path inside the bundle, without '.', '..' or a leading '/', other than {INDEX}")


def write_bundle(directory: Path, files: Mapping[str, bytes], redactor: Redactor, *, replace: bool = False) -> str:
    """Write ``files`` (relative path -> content, redacted here) and the index into ``directory``
    (created 0700; see :func:`write_into`); return the root SHA-256.

    ``directory`` is opened without following a link and must be ours (UnsafeDirectory
    otherwise). An existing one must be empty unless ``replace``: then a previous bundle's
    contents are removed first, through its descriptor, never following a link."""
    check_names(files)
    with OutputDir.open(directory) as out:
        if replace:
            out.empty()
        elif not out.is_empty():
            raise InputError(f"evidence bundle directory {one_line(str(directory))} already holds files; "
                             "accepted: a new or empty directory")
        return write_into(out, files, redactor)


def write_into(out: OutputDir, files: Mapping[str, bytes], redactor: Redactor) -> str:
    """Write ``files`` (redacted) and ``index.json`` into the empty directory ``out``, each file new
    (``O_CREAT|O_EXCL|O_NOFOLLOW``, 0600) and relative to its descriptor; return the root SHA-256."""
    check_names(files)
    digests: dict[str, str] = {}
    for rel, content in sorted(files.items()):
        data = redactor.data(content)
        out.write_file(rel, data)
        digests[rel] = sha256(data)
    root = root_digest(digests)
    index = {"format": FORMAT, "files": digests, "root_sha256": root}
    out.write_file(INDEX, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())
    return root
