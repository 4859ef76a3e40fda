"""``agentbox evidence verify``: recheck an evidence bundle (:mod:`agentbox_runtime.evidence`).

A bundle to verify is untrusted input: its index may name files outside it, and any entry may be
a symlink, a FIFO or a device. So every name in the index must be a plain relative path
(:func:`~agentbox_runtime.evidence.bad_name`); every file, ``index.json`` included, is opened
relative to the bundle's descriptor, one level at a time, with ``O_NOFOLLOW|O_NONBLOCK``, only
when it is a regular file (anything else is refused by name, never opened), and read up to a size
cap. Every name that reaches the output is escaped (:func:`escape`), so a planted name stays on
its own line and cannot pass for an ``ok`` line.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agentbox_runtime.errors import InputError
from agentbox_runtime.evidence import FORMAT, INDEX, bad_name, root_digest
from agentbox_runtime.private_dir import file_kind

INDEX_MAX_BYTES = 16 << 20
"""The largest ``index.json`` read."""
FILE_MAX_BYTES = 256 << 20
"""The largest bundle file hashed (the harness leaves files over 64 MiB out before redaction)."""
MAX_ENTRIES = 100_000
"""The most entries walked when looking for files the index does not list."""
MAX_DEPTH = 32
"""The deepest directory level walked."""
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = _READ_FLAGS | os.O_DIRECTORY
_ACCEPTED = "accepted: a regular file inside the bundle"


@dataclass(frozen=True)
class Verdict:
    """What :func:`check` found: the index's root SHA-256, its file count, and the problems."""

    root: str
    files: int
    problems: list[str]


class Refused(Exception):
    """A bundle entry that is not read: its one-line reason (the name already escaped)."""


def escape(text: str) -> str:
    """``text`` on one line that cannot imitate another: backslashes doubled, control and other
    non-printable characters (newline, carriage return, escape, bidi controls) and undecodable
    bytes written as backslash escapes."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte os.fsdecode could not decode
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _open_regular(dir_fd: int, name: str, shown: str, cap: int) -> int:
    """``name`` in ``dir_fd`` opened for reading: only a regular file no larger than ``cap`` (checked
    with lstat before the open and on the descriptor after it); Refused otherwise."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"refused: {shown}: it is {file_kind(st.st_mode)}; {_ACCEPTED}")
    fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
        os.close(fd)
        raise Refused(f"refused: {shown}: it was replaced while being opened; {_ACCEPTED}")
    if now.st_size > cap:
        os.close(fd)
        raise Refused(f"refused: {shown}: it is larger than {cap} bytes; accepted: up to {cap} bytes")
    return fd


def _chunks(fd: int, shown: str, cap: int) -> Iterator[bytes]:
    """The content of ``fd`` (closed at the end), Refused once it passes ``cap`` bytes."""
    total = 0
    try:
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > cap:
                raise Refused(f"refused: {shown}: it grew past {cap} bytes; accepted: up to {cap} bytes")
            yield chunk
    finally:
        os.close(fd)


def _read_index(bundle_fd: int, shown: str) -> tuple[dict[str, str], str]:
    """The index's (files, root SHA-256); InputError when it is missing, not a regular file, too
    large, or not a format-1 index."""
    try:
        fd = _open_regular(bundle_fd, INDEX, INDEX, INDEX_MAX_BYTES)
        raw = b"".join(_chunks(fd, INDEX, INDEX_MAX_BYTES))
    except FileNotFoundError:
        raise InputError(f"{shown} has no {INDEX}; accepted: an evidence bundle directory "
                         "(written by pytest --agentbox-evidence)") from None
    except Refused as exc:
        raise InputError(f"{shown}: {str(exc).removeprefix('refused: ')}") from None
    except OSError as exc:
        raise InputError(f"{shown}/{INDEX} cannot be read: {exc.strerror}") from None
    try:
        index = json.loads(raw)
        files, root = index["files"], index["root_sha256"]
        if (index.get("format") != FORMAT or not isinstance(files, dict) or not isinstance(root, str)
                or not all(isinstance(v, str) for v in files.values())):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise InputError(f"{shown}/{INDEX} is not a format-{FORMAT} evidence index") from None
    return files, root


def _file_problem(bundle_fd: int, rel: str, digest: str) -> str | None:
    """The problem with the listed file ``rel``, or None when its SHA-256 is ``digest``."""
    shown = escape(rel)
    if rel == INDEX or bad_name(rel):
        return (f"refused: {shown}: not a name inside the bundle; accepted: a relative path without '..', "
                f"'.', empty parts or a leading '/', other than {INDEX}")
    parts = rel.split("/")
    fd, opened = bundle_fd, []
    try:
        for i, part in enumerate(parts[:-1]):
            st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                where = escape("/".join(parts[:i + 1]))
                return f"refused: {shown}: {where} is {file_kind(st.st_mode)}; accepted: a directory inside the bundle"
            fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            opened.append(fd)
        digest_now = hashlib.sha256()
        for chunk in _chunks(_open_regular(fd, parts[-1], shown, FILE_MAX_BYTES), shown, FILE_MAX_BYTES):
            digest_now.update(chunk)
    except FileNotFoundError:
        return f"missing: {shown}"
    except Refused as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable: {shown}: {exc.strerror}"
    finally:
        for d in opened:
            os.close(d)
    return None if digest_now.hexdigest() == digest else f"changed: {shown}"


def _walk(dir_fd: int, prefix: str, depth: int, budget: list[int]) -> Iterator[str]:
    """Every non-directory entry below ``dir_fd`` (links not followed), as ``prefix + name``;
    Refused past :data:`MAX_DEPTH` levels or :data:`MAX_ENTRIES` entries."""
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            budget[0] -= 1
            if budget[0] < 0:
                raise Refused(f"refused: the bundle has more than {MAX_ENTRIES} entries; "
                              f"accepted: up to {MAX_ENTRIES}")
            rel = prefix + entry.name
            if not entry.is_dir(follow_symlinks=False):
                yield rel
                continue
            if depth >= MAX_DEPTH:
                raise Refused(f"refused: {escape(rel)}: deeper than {MAX_DEPTH} levels; accepted: up to {MAX_DEPTH}")
            try:
                child = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError:
                yield rel  # replaced since it was listed: report it as an entry
                continue
            try:
                yield from _walk(child, rel + "/", depth + 1, budget)
            finally:
                os.close(child)


def check(directory: Path) -> Verdict:
    """Recheck the bundle ``directory``: every file against the index, every entry the index does
    not list, and the index's own root SHA-256. Problems are one line each, names escaped:
    ``changed: F``, ``missing: F``, ``not in the index: F``, ``refused: F: why; accepted: what``.
    InputError when ``directory`` is not a bundle (no, or an unreadable, index)."""
    shown = escape(str(directory))
    try:
        bundle_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise InputError(f"{shown} is not a directory; accepted: an evidence bundle directory "
                         f"(with {INDEX})") from None
    try:
        files, root = _read_index(bundle_fd, shown)
        problems = [p for rel, digest in sorted(files.items()) if (p := _file_problem(bundle_fd, rel, digest))]
        try:
            extra = sorted(rel for rel in _walk(bundle_fd, "", 0, [MAX_ENTRIES]) if rel != INDEX and rel not in files)
            problems += [f"not in the index: {escape(rel)}" for rel in extra]
        except Refused as exc:
            problems.append(str(exc))
    finally:
        os.close(bundle_fd)
    if root_digest(files) != root:
        problems.append(f"changed: {INDEX} (its file list does not add up to its root_sha256)")
    return Verdict(root=root, files=len(files), problems=problems)


def verify(directory: Path) -> tuple[str, list[str]]:
    """(root SHA-256 from the index, the problems) of :func:`check`."""
    verdict = check(directory)
    return verdict.root, verdict.problems
