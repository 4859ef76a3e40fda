"""Review what a guest did to an ``overlay-review`` workspace: its overlay's upper layer read
against the source (the lower layer).

- :func:`scan` lists the files the guest added, modified, deleted and renamed. Deletions are the
  overlay's whiteouts (a 0/0 character device, or a ``.wh.<name>`` file where the overlay could
  not make a device) and opaque directories (a directory the guest removed and made again:
  ``.wh..wh..opq`` or the ``trusted.overlay.opaque``/``user.fuseoverlayfs.opaque`` xattr). A
  deleted file whose exact content reappears under a new name is a rename.
- :func:`patch` renders the review as a git-style unified diff (renames as ``rename from/to``,
  binary files named, not dumped).
- :func:`apply` carries the review out on the source.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.fuseoverlayfs.opaque", "user.overlay.opaque")
MAX_DIFF_BYTES = 1 << 20  # larger files are named in the patch, not diffed


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


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(directory: Path) -> bool:
    if (directory / OPAQUE_MARKER).exists():
        return True
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(directory, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _files_under(root: Path, rel: str) -> list[str]:
    """The non-directory entries of the lower layer at or below ``rel``."""
    top = root / rel
    if top.is_symlink() or not top.is_dir():
        return [rel] if top.is_symlink() or top.exists() else []
    return sorted(str(p.relative_to(root)) for p in top.rglob("*") if p.is_symlink() or not p.is_dir())


def _content(path: Path) -> bytes:
    return ("->" + os.readlink(path)).encode() if path.is_symlink() else path.read_bytes()


def _same(a: Path, b: Path) -> bool:
    if a.is_symlink() or b.is_symlink():
        return a.is_symlink() and b.is_symlink() and os.readlink(a) == os.readlink(b)
    sa, sb = a.stat(), b.stat()
    return stat.S_IMODE(sa.st_mode) == stat.S_IMODE(sb.st_mode) and sa.st_size == sb.st_size \
        and a.read_bytes() == b.read_bytes()


def scan(lower: Path, upper: Path) -> Review:
    """The review of ``upper`` (the overlay's upper dir) against ``lower`` (the source)."""
    added: list[str] = []
    modified: list[str] = []
    deleted: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(upper):
        here = Path(dirpath)
        rel_dir = here.relative_to(upper)
        if here != upper and _opaque(here):  # the guest replaced the whole directory
            lower_dir = lower / rel_dir
            kept = {str(p.relative_to(upper)) for p in here.rglob("*")}
            deleted |= {f for f in _files_under(lower, str(rel_dir)) if f not in kept} if lower_dir.is_dir() else set()
        for name in [*filenames, *(d for d in dirnames if (here / d).is_symlink())]:
            path = here / name
            rel = str(rel_dir / name) if str(rel_dir) != "." else name
            if name == OPAQUE_MARKER:
                continue
            if name.startswith(WHITEOUT_PREFIX):
                gone = str(rel_dir / name[len(WHITEOUT_PREFIX):]) if str(rel_dir) != "." else name[len(WHITEOUT_PREFIX):]
                deleted |= set(_files_under(lower, gone))
                continue
            st = os.lstat(path)
            if _is_whiteout(st):
                deleted |= set(_files_under(lower, rel))
                continue
            base = lower / rel
            if base.is_symlink() or base.is_file():
                if not _same(base, path):
                    modified.append(rel)
            else:
                added.append(rel)
    review = Review(sorted(added), sorted(modified), sorted(deleted))
    _pair_renames(review, lower, upper)
    return review


def _pair_renames(review: Review, lower: Path, upper: Path) -> None:
    """A deleted file whose content is exactly an added file's is a rename (each used once)."""
    by_digest: dict[str, list[str]] = {}
    for rel in review.added:
        by_digest.setdefault(hashlib.sha256(_content(upper / rel)).hexdigest(), []).append(rel)
    for old in list(review.deleted):
        candidates = by_digest.get(hashlib.sha256(_content(lower / old)).hexdigest())
        if candidates:
            new = candidates.pop(0)
            review.renamed.append((old, new))
            review.deleted.remove(old)
            review.added.remove(new)
    review.renamed.sort()


def _lines(path: Path | None) -> list[str] | None:
    """Text lines of ``path`` (empty for None), or None when it is binary or too large."""
    if path is None:
        return []
    data = _content(path)
    if len(data) > MAX_DIFF_BYTES or b"\0" in data:
        return None
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def _git_mode(path: Path) -> str:
    return "100755" if os.stat(path).st_mode & 0o111 else "100644"


def _file_diff(rel_a: str, rel_b: str, a: Path | None, b: Path | None) -> str:
    old, new = _lines(a), _lines(b)
    head = f"diff --git a/{rel_a} b/{rel_b}\n"
    if a is not None and b is not None and not a.is_symlink() and not b.is_symlink():
        mode_a, mode_b = _git_mode(a), _git_mode(b)
        if mode_a != mode_b:
            head += f"old mode {mode_a}\nnew mode {mode_b}\n"
    if a is None:
        head += "new file mode 100644\n"
    elif b is None:
        head += "deleted file mode 100644\n"
    if old is None or new is None:
        return head + f"Binary files {'a/' + rel_a if a else '/dev/null'} and {'b/' + rel_b if b else '/dev/null'} differ\n"
    body = "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                   for line in difflib.unified_diff(old, new, f"a/{rel_a}" if a else "/dev/null",
                                                    f"b/{rel_b}" if b else "/dev/null"))
    return head + body


def patch(review: Review, lower: Path, upper: Path) -> str:
    """The review as a git-style unified diff (``git apply`` reads it)."""
    parts = []
    for rel in review.added:
        parts.append(_file_diff(rel, rel, None, upper / rel))
    for rel in review.modified:
        parts.append(_file_diff(rel, rel, lower / rel, upper / rel))
    for rel in review.deleted:
        parts.append(_file_diff(rel, rel, lower / rel, None))
    for old, new in review.renamed:
        parts.append(f"diff --git a/{old} b/{new}\nsimilarity index 100%\nrename from {old}\nrename to {new}\n")
    return "".join(parts)


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
    for rel in review.deleted:
        _remove(lower / rel, lower)
    for old, new in review.renamed:
        (lower / new).parent.mkdir(parents=True, exist_ok=True)
        os.replace(lower / old, lower / new)
        _remove(lower / old, lower)
    for rel in [*review.added, *review.modified]:
        src, dest = upper / rel, lower / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.is_file():
            dest.unlink()
        if src.is_symlink():
            os.symlink(os.readlink(src), dest)
        else:
            shutil.copy2(src, dest)
