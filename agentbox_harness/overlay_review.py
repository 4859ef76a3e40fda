"""Review what a guest did to an ``overlay-review`` workspace: its overlay's upper layer read
against the source (the lower layer).

- :func:`scan` lists the files the guest added, modified, deleted and renamed. Deletions are the
  overlay's whiteouts (a 0/0 character device, or a ``.wh.<name>`` file where the overlay could
  not make a device), opaque directories (a directory the guest removed and made again:
  ``.wh..wh..opq`` or the ``trusted.overlay.opaque``/``user.fuseoverlayfs.opaque`` xattr), and
  a source file or symlink the guest replaced with a directory (or the reverse). A deleted file
  whose exact content reappears under a new name is a rename.
- :func:`patch` renders the review as a git-style unified diff (renames as ``rename from/to``,
  symlinks as their target text with mode 120000, binary and special files named, not dumped).
- :func:`apply` carries the review out on the source.

Both layers are read through a descriptor of their root, one component at a time and never
through a symlink (:mod:`agentbox_runtime.beneath`): a project symlink pointing out of the
project (``a -> /home/me``) is a link whose target text is its content, and a path below it
(``a/x``) is simply not in the source, so no host file outside the project reaches a review or
a patch. Only regular files are opened (``O_NONBLOCK``), so a FIFO the guest made cannot hang it.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from agentbox_runtime.beneath import lstat_beneath, open_beneath, open_parent, walk_beneath

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.fuseoverlayfs.opaque", "user.overlay.opaque")
MAX_DIFF_BYTES = 1 << 20  # larger files are named in the patch, not diffed
LINK_MODE = "120000"


@dataclass
class Review:
    """What the guest changed, as paths relative to the workspace, each list sorted."""

    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (old, new)

    @property
    def paths(self) -> list[str]:
        """Every path the review touches (both names of a rename)."""
        return sorted({*self.added, *self.modified, *self.deleted, *(p for pair in self.renamed for p in pair)})

    def __bool__(self) -> bool:
        return bool(self.added or self.modified or self.deleted or self.renamed)


class _Layer:
    """One side of the review (the source or the upper dir), read through a descriptor of its root:
    no entry is reached through a symlink, and only regular files are opened."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def __enter__(self) -> _Layer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        os.close(self.fd)

    def lstat(self, rel: str) -> os.stat_result | None:
        """The entry itself (a symlink as a link), or None when the layer has no ``rel`` of its own."""
        return lstat_beneath(self.fd, rel)

    def readlink(self, rel: str) -> bytes:
        """The target text of the symlink ``rel``."""
        with open_parent(self.fd, rel) as (parent, name):
            return os.fsencode(os.readlink(name, dir_fd=parent))

    def open_file(self, rel: str) -> int:
        """A read descriptor of the regular file ``rel`` (``OSError`` for anything else)."""
        fd = open_beneath(self.fd, rel, os.O_RDONLY | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", rel)
        return fd

    def read(self, rel: str, limit: int) -> bytes:
        """At most ``limit`` bytes of the regular file ``rel``."""
        with os.fdopen(self.open_file(rel), "rb") as f:
            return f.read(limit)

    def digest(self, rel: str) -> str | None:
        """The content key of ``rel`` (a link's target, a file's bytes); None for other kinds."""
        st = self.lstat(rel)
        if st is None:
            return None
        if stat.S_ISLNK(st.st_mode):
            return "link:" + hashlib.sha256(self.readlink(rel)).hexdigest()
        if not stat.S_ISREG(st.st_mode):
            return None
        with os.fdopen(self.open_file(rel), "rb") as f:
            return "file:" + hashlib.file_digest(f, "sha256").hexdigest()

    def files_under(self, rel: str) -> list[str]:
        """The non-directory entries of this layer at or below ``rel`` (symlinks are entries)."""
        st = self.lstat(rel)
        if st is None:
            return []
        if not stat.S_ISDIR(st.st_mode):
            return [rel]
        return sorted(_join(rel_dir, name) for rel_dir, _dirs, others, _fd in walk_beneath(self.fd, rel)
                      for name in others)


def _join(rel_dir: str, name: str) -> str:
    return f"{rel_dir}/{name}" if rel_dir else name


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(dir_fd: int) -> bool:
    try:
        os.lstat(OPAQUE_MARKER, dir_fd=dir_fd)
        return True
    except OSError:
        pass
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(dir_fd, name) == b"y":
                return True
        except OSError:
            continue
    return False


def _same(low: _Layer, up: _Layer, rel: str, a: os.stat_result, b: os.stat_result) -> bool:
    if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
        return False
    if stat.S_ISLNK(a.st_mode):
        return low.readlink(rel) == up.readlink(rel)
    if stat.S_ISREG(a.st_mode):
        return stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode) and a.st_size == b.st_size \
            and low.digest(rel) == up.digest(rel)
    return True  # the same kind of special file: nothing to compare


def _whiteout_target(name: str) -> str | None:
    """The name a ``.wh.<name>`` file deletes, or None when it is no valid name."""
    gone = name[len(WHITEOUT_PREFIX):]
    return None if gone in ("", ".", "..") or "/" in gone else gone


@dataclass
class _Changes:
    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)


def _dir_deletions(low: _Layer, up: _Layer, rel_dir: str, dir_fd: int) -> set[str]:
    """What the source had under ``rel_dir`` that is gone because the guest replaced the whole
    directory (opaque, or a file or link that became a directory)."""
    if not rel_dir:
        return set()
    below = low.lstat(rel_dir)
    replaced = below is not None and not stat.S_ISDIR(below.st_mode)
    if replaced or _opaque(dir_fd):
        return {f for f in low.files_under(rel_dir) if f == rel_dir or up.lstat(f) is None}
    return set()


def _review_entry(changes: _Changes, low: _Layer, up: _Layer, rel_dir: str, name: str, dir_fd: int) -> None:
    """Record what one non-directory entry of the upper dir means: a whiteout deletes, a new name is
    added, a file over a source directory replaces it, a different file is modified."""
    rel = _join(rel_dir, name)
    if name == OPAQUE_MARKER:
        return
    gone = _whiteout_target(name) if name.startswith(WHITEOUT_PREFIX) else None
    if gone is not None:
        changes.deleted |= set(low.files_under(_join(rel_dir, gone)))
        return
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if _is_whiteout(st):
        changes.deleted |= set(low.files_under(rel))
        return
    base = low.lstat(rel)
    if base is None:
        changes.added.append(rel)
    elif stat.S_ISDIR(base.st_mode):  # the guest put a file where the source has a directory
        changes.deleted |= set(low.files_under(rel))
        changes.added.append(rel)
    elif not _same(low, up, rel, base, st):
        changes.modified.append(rel)


def scan(lower: Path, upper: Path) -> Review:
    """The review of ``upper`` (the overlay's upper dir) against ``lower`` (the source)."""
    changes = _Changes()
    with _Layer(lower) as low, _Layer(upper) as up:
        for rel_dir, _dirs, others, dir_fd in walk_beneath(up.fd):
            changes.deleted |= _dir_deletions(low, up, rel_dir, dir_fd)
            for name in others:
                _review_entry(changes, low, up, rel_dir, name, dir_fd)
        review = Review(sorted(changes.added), sorted(changes.modified), sorted(changes.deleted))
        _pair_renames(review, low, up)
    return review


def _pair_renames(review: Review, low: _Layer, up: _Layer) -> None:
    """A deleted file whose content is exactly an added file's is a rename (each used once)."""
    by_digest: dict[str, list[str]] = {}
    for rel in review.added:
        key = up.digest(rel)
        if key is not None:
            by_digest.setdefault(key, []).append(rel)
    for old in list(review.deleted):
        key = low.digest(old)
        candidates = by_digest.get(key) if key is not None else None
        if candidates:
            new = candidates.pop(0)
            review.renamed.append((old, new))
            review.deleted.remove(old)
            review.added.remove(new)
    review.renamed.sort()


@dataclass(frozen=True)
class _Blob:
    """One side of a file diff: git's mode and the content (None: not a regular file or link)."""

    mode: str
    data: bytes | None

    @property
    def is_link(self) -> bool:
        return self.mode == LINK_MODE


def _blob(layer: _Layer, rel: str) -> _Blob | None:
    """``rel`` in ``layer`` for the patch (a link as its target text), or None when it has none."""
    st = layer.lstat(rel)
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        return _Blob(LINK_MODE, layer.readlink(rel))
    mode = "100755" if st.st_mode & 0o111 else "100644"
    return _Blob(mode, layer.read(rel, MAX_DIFF_BYTES + 1) if stat.S_ISREG(st.st_mode) else None)


def _lines(blob: _Blob | None) -> list[str] | None:
    """Text lines of ``blob`` (empty for None), or None when it is binary, too large or special."""
    if blob is None:
        return []
    data = blob.data
    if data is None or len(data) > MAX_DIFF_BYTES or b"\0" in data:
        return None
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def _file_diff(rel_a: str, rel_b: str, a: _Blob | None, b: _Blob | None) -> str:
    if a is None and b is None:
        return ""
    if a is not None and b is not None and a.is_link != b.is_link:  # git shows a type change as delete + add
        return _file_diff(rel_a, rel_a, a, None) + _file_diff(rel_b, rel_b, None, b)
    old, new = _lines(a), _lines(b)
    head = f"diff --git a/{rel_a} b/{rel_b}\n"
    if a is not None and b is not None and a.mode != b.mode:
        head += f"old mode {a.mode}\nnew mode {b.mode}\n"
    if a is None and b is not None:
        head += f"new file mode {b.mode}\n"
    elif b is None and a is not None:
        head += f"deleted file mode {a.mode}\n"
    if old is None or new is None:
        return head + f"Binary files {'a/' + rel_a if a else '/dev/null'} and {'b/' + rel_b if b else '/dev/null'} differ\n"
    body = "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                   for line in difflib.unified_diff(old, new, f"a/{rel_a}" if a else "/dev/null",
                                                    f"b/{rel_b}" if b else "/dev/null"))
    return head + body


def patch(review: Review, lower: Path, upper: Path) -> str:
    """The review as a git-style unified diff (``git apply`` reads it). Each side is read inside
    its own layer only: a path that leaves it through a symlink has no content there."""
    parts = []
    with _Layer(lower) as low, _Layer(upper) as up:
        for rel in review.added:
            parts.append(_file_diff(rel, rel, None, _blob(up, rel)))
        for rel in review.modified:
            parts.append(_file_diff(rel, rel, _blob(low, rel), _blob(up, rel)))
        for rel in review.deleted:
            parts.append(_file_diff(rel, rel, _blob(low, rel), None))
    for old, new in review.renamed:
        parts.append(f"diff --git a/{old} b/{new}\nsimilarity index 100%\nrename from {old}\nrename to {new}\n")
    return "".join(parts)


def _refuse_links(layer: _Layer, rel: str) -> None:
    """Raise ``ValueError`` when a directory on ``rel``'s way in ``layer`` is a symlink or not a
    directory: :func:`apply` never reads or writes through one."""
    components = rel.split("/")[:-1]
    for i in range(1, len(components) + 1):
        prefix = "/".join(components[:i])
        st = layer.lstat(prefix)
        if st is None:
            return  # missing from here on: apply makes real directories
        if not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"refusing to apply {rel!r}: {prefix!r} in {layer.root} is not a directory "
                             "(a symlink or a file); apply only writes inside the tree")


def _remove(path: Path, stop: Path) -> None:
    """Remove ``path`` and then each directory above it that became empty, up to ``stop``."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    parent = path.parent
    while parent != stop and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def apply(review: Review, lower: Path, upper: Path) -> None:
    """Carry ``review`` out on ``lower``: deletions, renames, then added and modified files."""
    with _Layer(lower) as low, _Layer(upper) as up:
        for rel in review.deleted:
            _refuse_links(low, rel)
            _remove(lower / rel, lower)
        for old, new in review.renamed:
            _refuse_links(low, old)
            _refuse_links(low, new)
            (lower / new).parent.mkdir(parents=True, exist_ok=True)
            os.replace(lower / old, lower / new)
            _remove(lower / old, lower)
        for rel in [*review.added, *review.modified]:
            _refuse_links(low, rel)
            _refuse_links(up, rel)
            src, dest = upper / rel, lower / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink() or dest.is_file():
                dest.unlink()
            if src.is_symlink():
                os.symlink(os.readlink(src), dest)
            else:
                shutil.copy2(src, dest)
