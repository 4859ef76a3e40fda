"""The image's non-root user and working directory: who the shell runs as, and where it starts.

An agentbox image names them in ``/etc/agentbox/image-user``, ``key=value`` lines::

    user=agent
    uid=2000
    gid=2000
    workdir=/work

``agentbox image build --user/--uid/--gid/--workdir`` writes that file, and the same values as
image labels (``io.agentbox.user``, ``.uid``, ``.gid``, ``.workdir``) for hosts that see only the
image's config (container mode, krun-podman). An image without them (built before they existed, or
derived from one that was) has the defaults: ``dev``, 1000:1000, ``/workspace``. The home is
always ``/home/<user>``.

The ids are the image's. Where a host user owns the workspace, the guest user takes that user's
ids at start instead (as ``--userns keep-id`` does), so files it writes in the workdir belong to
the host user; the name, the home and the workdir stay the image's.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agentbox_guest_init import contract as c
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.proc import ROOT, under

FILE: Final = "/etc/agentbox/image-user"
LABELS: Final = {"user": "io.agentbox.user", "uid": "io.agentbox.uid", "gid": "io.agentbox.gid",
                 "workdir": "io.agentbox.workdir"}
"""Each field's image label."""
ID_MIN, ID_MAX = 1000, 59999
"""A normal user's ids (Debian's UID_MIN..UID_MAX), below the subordinate ids the guest's
rootless Podman maps (from 100000)."""
NAME_RE: Final = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
SYSTEM_DIRS: Final = frozenset({"bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "nix",
                                "proc", "root", "run", "sbin", "srv", "sys", "tmp", "usr", "var"})
"""Top-level directories a workdir may not be (or be under), except below ``/home/<user>``."""
MAX_FILE_BYTES: Final = 4096


def _check_name(value: str) -> str:
    if not NAME_RE.fullmatch(value) or value == "root":
        raise ValueError(f"invalid user name {value!r}: expected a lowercase login name (a letter or '_', then up "
                         "to 31 of a-z, 0-9, '_', '-'), not root")
    return value


def _check_id(field: str, value: int) -> int:
    if not ID_MIN <= value <= ID_MAX:
        raise ValueError(f"invalid {field} {value}: expected a number from {ID_MIN} to {ID_MAX} (a normal user's id)")
    return value


def _check_workdir(value: str, home: str) -> str:
    parts = value.split("/")[1:]
    plain = value.startswith("/") and posixpath.normpath(value) == value and value != "/" and len(value) <= 200
    if not plain or not all(re.fullmatch(r"[A-Za-z0-9._-]+", p) and p not in (".", "..") for p in parts):
        raise ValueError(f"invalid workdir {value!r}: expected an absolute, normalized path of letters, digits, "
                         "'.', '_', '-' (such as /workspace)")
    if value == home or (parts[0] in SYSTEM_DIRS and not value.startswith(home + "/")):
        raise ValueError(f"invalid workdir {value!r}: expected a directory outside the system directories "
                         f"({', '.join('/' + d for d in sorted(SYSTEM_DIRS))}), or one below the home {home}")
    return value


def parse_id(field: str, text: str) -> int:
    """``text`` as the ``uid``/``gid`` field (ValueError naming what is accepted otherwise)."""
    if not re.fullmatch(r"[0-9]{1,6}", text.strip()):
        raise ValueError(f"invalid {field} {text!r}: expected a number from {ID_MIN} to {ID_MAX}")
    return _check_id(field, int(text))


@dataclass(frozen=True)
class ImageUser:
    """The image's non-root user (name, ids, home ``/home/<user>``) and its workdir.

    Built only from valid values: the constructor raises ValueError with one line saying what was
    wrong and what is accepted."""

    user: str = c.DEV_USER
    uid: int = c.DEV_UID
    gid: int = c.DEV_GID
    workdir: str = c.WORKSPACE

    def __post_init__(self) -> None:
        _check_name(self.user)
        _check_id("uid", self.uid)
        _check_id("gid", self.gid)
        _check_workdir(self.workdir, self.home)

    @property
    def home(self) -> str:
        """``/home/<user>``."""
        return f"/home/{self.user}"

    @property
    def is_default(self) -> bool:
        """True for the stock image's dev, 1000:1000, /workspace."""
        return self == ImageUser()

    @property
    def containers_storage(self) -> str:
        """Where the guest mounts the containers disk: ``~/.local/share/containers``."""
        return f"{self.home}/.local/share/containers"

    def xdg_dirs(self) -> dict[str, str]:
        """The four XDG base directories, under the home."""
        return c.dev_dirs(self.home)

    def exec_env(self) -> dict[str, str]:
        """What a command run as the user from outside its login shell (``podman exec`` into a
        container-mode task, whose environment is root's) needs: its identity, XDG dirs and the
        nix daemon."""
        return {"HOME": self.home, "USER": self.user, "LOGNAME": self.user, "NIX_REMOTE": c.NIX_REMOTE_VALUE,
                **self.xdg_dirs()}

    def fields(self) -> dict[str, str]:
        """The four fields as text, in file order."""
        return {"user": self.user, "uid": str(self.uid), "gid": str(self.gid), "workdir": self.workdir}

    def file_text(self) -> str:
        """The content of :data:`FILE`."""
        return "".join(f"{k}={v}\n" for k, v in self.fields().items())

    def labels(self) -> dict[str, str]:
        """The image labels that carry the same values."""
        return {LABELS[k]: v for k, v in self.fields().items()}

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> ImageUser:
        """From ``user``/``uid``/``gid``/``workdir`` text values; a missing one keeps its default,
        an unknown key or a bad value raises ValueError."""
        unknown = sorted(set(fields) - set(LABELS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}: expected {', '.join(LABELS)}")
        d = cls()
        return cls(user=fields.get("user", d.user),
                   uid=parse_id("uid", fields["uid"]) if "uid" in fields else d.uid,
                   gid=parse_id("gid", fields["gid"]) if "gid" in fields else d.gid,
                   workdir=fields.get("workdir", d.workdir))

    @classmethod
    def from_text(cls, text: str) -> ImageUser:
        """Parse :data:`FILE`'s ``key=value`` lines (blank lines and ``#`` comments allowed)."""
        fields: dict[str, str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"line {n}: expected key=value, got {line[:80]!r}")
            fields[key.strip()] = value.strip()
        return cls.from_fields(fields)

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> ImageUser:
        """From an image's labels (the defaults when it has none of :data:`LABELS`)."""
        return cls.from_fields({k: labels[label] for k, label in LABELS.items() if label in labels})


DEFAULT_IMAGE_USER: Final = ImageUser()
"""The stock image's user: dev, 1000:1000, /workspace (the default wherever an image user is optional)."""


def load(root: Path = ROOT) -> ImageUser:
    """The image user of the image at ``root``: its :data:`FILE`, else the defaults.

    A file that is not a regular file inside ``root`` (it is never followed through a symlink out
    of it), is larger than 4 KiB or does not parse raises GuestError naming the file."""
    path = under(root, FILE)
    try:
        inside = os.path.realpath(path).startswith(os.path.realpath(root).rstrip("/") + "/")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return ImageUser()
    except OSError as exc:
        raise GuestError(f"cannot read the image user file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not inside or not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
            raise GuestError(f"the image user file {path} must be a regular file of at most {MAX_FILE_BYTES} "
                             "bytes inside the image")
        text = f.read(MAX_FILE_BYTES).decode("utf-8", "replace")
    try:
        return ImageUser.from_text(text)
    except ValueError as exc:
        raise GuestError(f"bad image user file {path}: {exc}") from None
