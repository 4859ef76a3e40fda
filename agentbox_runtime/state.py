"""Workspace slug, names, and the on-disk state layout.

The state root of a workspace is ``<base>/agentbox/<slug>`` where ``<base>`` is
``[state].location`` from the config file, else ``$XDG_STATE_HOME``, else
``$HOME/.local/state``. Managed directories are created mode 0700 and a
symlink anywhere in a managed path is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from agentbox_runtime.config import load_config
from agentbox_runtime.errors import AgentboxError, InputError

SLUG_MAX = 32


def workspace_slug(cwd: Path) -> str:
    """The slug of a workspace directory: its lowercased basename with runs of
    other characters collapsed to ``-``, at most 32 characters, ``workspace``
    when nothing is left. ``/tmp/My repo.name!`` gives ``my-repo-name``."""
    out: list[str] = []
    for ch in cwd.name:
        if ch.isascii() and ch.isalnum():
            out.append(ch.lower())
        elif out and out[-1] != "-":
            out.append("-")
    slug = "".join(out).strip("-")[:SLUG_MAX].strip("-")
    return slug or "workspace"


def random_suffix() -> str:
    """16 lowercase hex digits from the kernel's random source."""
    return os.urandom(8).hex()


def task_container_name(slug: str) -> str:
    """A fresh task name ``<slug>-<16 hex>`` (also the microvm task id)."""
    return f"{slug}-{random_suffix()}"


def task_hostname(slug: str) -> str:
    """The guest hostname ``<slug>-agentbox``."""
    return f"{slug}-agentbox"


def resize_container_name(task_name: str) -> str:
    """The maintenance container name for a resize: ``<task name>-resize``."""
    return f"{task_name}-resize"


def canonical_cwd(cwd: Path | None = None) -> Path:
    """The canonical working directory (symlinks resolved)."""
    try:
        path = (cwd or Path.cwd()).resolve(strict=True)
    except OSError as exc:
        raise AgentboxError(f"failed to canonicalize current directory: {exc}") from None
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"the workspace path {ascii(str(path))} is not valid UTF-8; accepted: a directory whose "
                         "path is UTF-8 (it names the workspace state and the guest mount)") from None
    return path


def state_base(env: Mapping[str, str] | None = None) -> Path:
    """The base directory that holds ``agentbox/`` (config, XDG or HOME)."""
    env = os.environ if env is None else env
    config = load_config(env)
    if config.state_location is not None:
        return config.state_location
    if env.get("XDG_STATE_HOME", "").startswith("/"):  # XDG: relative values are ignored
        return Path(env["XDG_STATE_HOME"])
    if env.get("HOME"):
        return Path(env["HOME"]) / ".local" / "state"
    raise InputError("HOME is not set and XDG_STATE_HOME is not available")


def refuse_symlinks(path: Path, stop: Path | None = None) -> None:
    """Raise if ``path`` or any existing parent below ``stop`` is a symlink."""
    current = path
    while True:
        if current.is_symlink():
            raise AgentboxError(f"refusing to use managed path '{path}': '{current}' is a symlink")
        if current == stop or current.parent == current:
            return
        current = current.parent


def ensure_private_dir(path: Path, stop: Path | None = None) -> Path:
    """Create ``path`` (and parents) with mode 0700; refuse a symlink at ``path``
    or at any parent up to ``stop`` (up to ``/`` when ``stop`` is None)."""
    refuse_symlinks(path, stop)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.is_dir():
        raise AgentboxError(f"managed path '{path}' is not a directory")
    return path


def check_state_dir(state_root: Path) -> None:
    """Refuse (InputError, exit 2) a workspace state dir reached through a symlink in its managed
    part, owned by another user, or writable by group or others. A missing dir passes (nothing
    is created)."""
    try:
        refuse_symlinks(state_root, state_root.parent)
    except AgentboxError as exc:
        raise InputError(str(exc)) from None
    try:
        st = os.lstat(state_root)
    except FileNotFoundError:
        return
    _check_owner(state_root, st)


def _check_owner(state_root: Path, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise InputError(f"refusing workspace state dir '{state_root}': owned by uid {st.st_uid} with mode "
                         f"{stat.S_IMODE(st.st_mode):o} (accepted: ours, not writable by group or others)")


def open_state_dir(state_root: Path) -> int:
    """An ``O_NOFOLLOW`` descriptor of the workspace state dir (created 0700 if missing), after
    :func:`check_state_dir`; destructive steps work relative to it."""
    check_state_dir(state_root)
    ensure_private_dir(state_root, state_root.parent)
    try:
        fd = os.open(state_root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise InputError(f"refusing workspace state dir '{state_root}': {exc.strerror}") from None
    try:
        _check_owner(state_root, os.fstat(fd))
    except InputError:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def maintenance_lock(state_root: Path, operation: str) -> Iterator[None]:
    """One writer per workspace disk: resize and reset hold an exclusive ``flock`` on the state dir
    itself (no lock file is written). A second one fails at once with one line (AgentboxError)
    instead of racing the first."""
    try:
        fd = os.open(state_root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield  # nothing to protect yet: the operation reports the missing state itself
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AgentboxError(f"refusing to {operation}: another resize or reset is running on the workspace "
                                f"state '{state_root}'; wait for it to finish and retry") from None
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StateLayout:
    """Where a workspace's state lives on the host."""

    workspace: Path
    slug: str
    app_dir: Path
    state_root: Path

    @classmethod
    def resolve(cls, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> StateLayout:
        """Resolve the layout for ``cwd`` (default: the current directory)."""
        workspace = canonical_cwd(cwd)
        slug = workspace_slug(workspace)
        app = state_base(env) / "agentbox"
        return cls(workspace, slug, app, app / slug)

    @classmethod
    def under(cls, base: Path, workspace: Path) -> StateLayout:
        """A layout with an explicit base directory (tests, harness)."""
        workspace = canonical_cwd(workspace)
        slug = workspace_slug(workspace)
        app = base / "agentbox"
        return cls(workspace, slug, app, app / slug)

    @property
    def sccache_dir(self) -> Path:
        return self.app_dir / "sccache"

    @property
    def microvm_image_dir(self) -> Path:
        return self.app_dir / "microvm" / "images"

    @property
    def cargo_dir(self) -> Path:
        return self.state_root / "cargo"

    @property
    def microvm_tasks_dir(self) -> Path:
        return self.state_root / "microvm-tasks"

    def ensure(self) -> StateLayout:
        """Create the app dir and state root (0700); a symlink at either is refused.

        Directories above the app dir belong to the user (``$HOME`` may well be
        a symlink) and are not checked."""
        ensure_private_dir(self.app_dir, self.app_dir)
        ensure_private_dir(self.state_root, self.app_dir)
        return self
