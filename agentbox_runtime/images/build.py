"""``agentbox image build``: the guest image in two cached stages.

1. base ``localhost/agentbox-base:<recipe hash>``: the Debian root (minutes;
   :mod:`agentbox_runtime.images.rootfs`), reused while the recipe hash is unchanged;
2. final (``localhost/agentbox:latest`` by default): ``FROM`` the base plus
   guest_init at a Nix-store-shaped path, the wrappers and in-image scripts
   (:mod:`agentbox_runtime.images.install`) and the image config, labelled
   ``io.agentbox.recipe`` and ``io.agentbox.guest-init``.

A final image whose two labels already match is up to date: nothing is built.
A change to guest_init only redoes the final layer; ``guest_init_only`` does
that explicitly and fails when there is no base. A file lock (per user, see
:func:`lock_path`) makes concurrent builds (pytest-xdist workers) build once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from agentbox_guest_init.image_user import DEFAULT_IMAGE_USER, ImageUser
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.images import recipe
from agentbox_runtime.images.commit import (commit_layer, image_id, image_labels, import_root, prune_other_tags,
                                   remove_if_untagged)
from agentbox_runtime.images.install import install_guest_init
from agentbox_runtime.images.rootfs import build_root
from agentbox_runtime.images.steps import progress
from agentbox_runtime.images.workdir import work_dir

LOCK_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class BuildResult:
    """What one build did."""

    tag: str
    base_tag: str
    recipe_hash: str
    guest_init_hash: str
    built_base: bool
    built_final: bool
    seconds: float
    log: Path

    @property
    def up_to_date(self) -> bool:
        """True when nothing had to be built."""
        return not (self.built_base or self.built_final)


def cache_dir() -> Path:
    """Where the build log lives: ``$XDG_CACHE_HOME/agentbox/image-build``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "agentbox" / "image-build"
    path.mkdir(parents=True, exist_ok=True)
    return path


def lock_path() -> Path:
    """The build lock: one per user and image storage, whatever HOME says
    (``/run/lock/agentbox-image-build.lock`` for root)."""
    if os.geteuid() == 0 and Path("/run/lock").is_dir():
        return Path("/run/lock/agentbox-image-build.lock")
    return cache_dir() / "build.lock"


def build_base(tag: str, recipe_hash: str, log: Path) -> None:
    """Debootstrap a root in a work dir and import it as the base image ``tag``."""
    with work_dir() as tmp:
        root = tmp / "root"
        build_root(root, log)
        import_root(root, tag, recipe_hash, log)


def build_final(tag: str, base: str, recipe_hash: str, gi_hash: str, guest_init_src: Path | None = None,
                user: ImageUser = DEFAULT_IMAGE_USER) -> None:
    """``FROM base``: add guest_init (from ``guest_init_src``, default the installed
    package), the image user and the config, commit as ``tag``."""
    started = time.monotonic()
    progress(f"guest_init layer on {base} ...")
    commit_layer(base, tag, recipe.image_config(recipe_hash, gi_hash, user),
                 lambda root: install_guest_init(root, gi_hash, guest_init_src, user=user))
    progress(f"guest_init layer done in {time.monotonic() - started:.1f}s")


def _is_current(tag: str, recipe_hash: str, gi_hash: str) -> bool:
    labels = image_labels(tag) or {}
    return (labels.get(recipe.LABEL_RECIPE) == recipe_hash
            and labels.get(recipe.LABEL_GUEST_INIT) == gi_hash)


def build(tag: str = recipe.DEFAULT_TAG, *, force: bool = False, guest_init_only: bool = False,
          guest_init_src: Path | None = None, user: ImageUser = DEFAULT_IMAGE_USER) -> BuildResult:
    """Build the guest image ``tag``, or confirm it is up to date.

    ``force`` rebuilds even when the labels match (the base too, unless
    ``guest_init_only``). ``guest_init_src`` is a ``guest_init`` package
    directory to install instead of the one this runtime imports. ``user`` is
    the image's non-root user and workdir (default dev, 1000:1000, /workspace);
    images of every user share one base. Progress goes to stderr; tool output
    to the build log.
    """
    started = time.monotonic()
    cache = cache_dir()
    log = cache / "build.log"
    recipe_hash, gi_hash = recipe.recipe_hash(), recipe.guest_init_hash(guest_init_src, user=user)
    base = recipe.base_tag(recipe_hash)

    def result(built_base: bool, built_final: bool) -> BuildResult:
        return BuildResult(tag, base, recipe_hash, gi_hash, built_base, built_final,
                           time.monotonic() - started, log)

    with _build_lock():
        if not force and _is_current(tag, recipe_hash, gi_hash):
            progress(f"{tag} is up to date")
            return result(False, False)
        progress(f"building {tag}; tool output goes to {log}")
        superseded = [image_id(tag), image_id(base)]  # final first: it is the base's child
        built_base = _ensure_base(base, recipe_hash, log, force=force, guest_init_only=guest_init_only)
        build_final(tag, base, recipe_hash, gi_hash, guest_init_src, user)
        for image in superseded:
            remove_if_untagged(image)
        if built_base:
            prune_other_tags(recipe.BASE_REPO, base)
        progress(f"{tag} built in {time.monotonic() - started:.1f}s")
        return result(built_base, True)


@contextmanager
def _build_lock() -> Iterator[None]:
    """Hold the one image-build lock; when another process (an xdist worker) builds, say so and
    wait for it up to ``LOCK_TIMEOUT_S``."""
    lock = FileLock(str(lock_path()))
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            progress(f"waiting for the image build another process runs (lock {lock.lock_file})")
            lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout:
        raise AgentboxError(f"image build: another build still holds {lock.lock_file} after "
                            f"{LOCK_TIMEOUT_S:.0f}s; wait for it or remove the lock if no build runs") from None
    try:
        yield
    finally:
        lock.release()


def _ensure_base(base: str, recipe_hash: str, log: Path, *, force: bool, guest_init_only: bool) -> bool:
    """Build the base image when it is missing, stale or ``force`` asks (never with
    ``guest_init_only``, which needs it to exist); whether it was built."""
    base_labels = image_labels(base)
    if guest_init_only:
        if base_labels is None:
            raise AgentboxError(f"image build --guest-init-only needs the base image {base}, which does "
                                "not exist; run 'agentbox image build' once without --guest-init-only")
        return False
    if not (force or base_labels is None or base_labels.get(recipe.LABEL_RECIPE) != recipe_hash):
        return False
    if os.geteuid() != 0:
        raise AgentboxError(f"building the base image {base} needs root (debootstrap and chroot "
                            "mounts); run 'agentbox image build' as root")
    log.write_text("")
    build_base(base, recipe_hash, log)
    return True
