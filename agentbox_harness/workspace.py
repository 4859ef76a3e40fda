"""The ``workspace`` fixture's object: a project directory mounted at /workspace."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from agentbox_harness import overlay_review
from agentbox_harness.overlay_review import Review
from agentbox_runtime.state import StateLayout

MODES = ("direct", "copy", "overlay-review")


@dataclass
class Workspace:
    """A host directory the guest sees at /workspace, with its slug and state root.

    Modes: ``direct`` (the directory itself), ``copy`` (a private copy),
    ``overlay-review`` (the guest writes into an upper layer over the source:
    :meth:`review` says what it added, modified, deleted and renamed,
    :meth:`patch` renders that as a unified diff, :meth:`apply` carries it out
    on the source, :meth:`discard` drops it). fuse-overlayfs keeps the source's listing
    once read, so what a test adds to :attr:`source` later shows in :attr:`path` only after
    :meth:`discard` (which remounts).
    """

    source: Path
    path: Path
    state: StateLayout
    mode: str = "direct"
    _upper: Path | None = None
    _mounted: bool = field(default=False)

    @property
    def mounted(self) -> bool:
        """Whether an overlay is mounted at :attr:`path` (overlay-review mode)."""
        return self._mounted

    @property
    def slug(self) -> str:
        return self.state.slug

    @classmethod
    def create(cls, source: Path, scratch: Path, state_base: Path, mode: str = "direct",
               owner: tuple[int, int] | None = None) -> Workspace:
        if mode not in MODES:
            raise ValueError(f"workspace mode '{mode}' is not one of {', '.join(MODES)}")
        source.mkdir(parents=True, exist_ok=True)
        if owner and os.geteuid() == 0:
            os.chown(source, *owner)
        if mode == "direct":
            return cls(source, source, StateLayout.under(state_base, source), mode)
        path = scratch / source.name
        if mode == "copy":
            shutil.copytree(source, path, symlinks=True)
            if owner and os.geteuid() == 0:
                os.chown(path, *owner)
            return cls(source, path, StateLayout.under(state_base, path), mode)
        upper, work = scratch / "upper", scratch / "work"
        for d in (path, upper, work):
            d.mkdir(parents=True, exist_ok=True)
        if owner and os.geteuid() == 0:
            os.chown(upper, *owner)
        subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={source},upperdir={upper},workdir={work}", str(path)],
                       check=True, capture_output=True, timeout=60)
        ws = cls(source, path, StateLayout.under(state_base, path), mode, upper)
        ws._mounted = True
        return ws

    def _layers(self, verb: str) -> tuple[Path, Path]:
        if self._upper is None:
            raise ValueError(f"{verb}() needs an overlay-review workspace; this one is '{self.mode}'")
        return self.source, self._upper

    def review(self) -> Review:
        """What the guest changed: added, modified, deleted and renamed files (see
        :mod:`agentbox_harness.overlay_review`)."""
        return overlay_review.scan(*self._layers("review"))

    def changes(self) -> list[str]:
        """Every path the guest changed (both names of a rename), sorted."""
        return self.review().paths

    def patch(self) -> str:
        """The guest's changes as a git-style unified diff against the source."""
        lower, upper = self._layers("patch")
        return overlay_review.patch(overlay_review.scan(lower, upper), lower, upper)

    def apply(self) -> Review:
        """Carry the guest's changes out on the source (deletions and renames too), then start a
        fresh upper layer, so the workspace shows the updated source; returns what was applied."""
        lower, upper = self._layers("apply")
        review = overlay_review.scan(lower, upper)
        overlay_review.apply(review, lower, upper)
        self.discard()
        return review

    def discard(self) -> None:
        """Drop the guest's writes (remount an empty upper layer)."""
        self._layers("discard")
        assert self._upper is not None
        self.close()
        owner = self._upper.stat()
        shutil.rmtree(self._upper)
        self._upper.mkdir()
        if os.geteuid() == 0:  # the merged root keeps the owner the guest's dev writes as
            os.chown(self._upper, owner.st_uid, owner.st_gid)
        work = self._upper.parent / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={self.source},upperdir={self._upper},workdir={work}",
                        str(self.path)], check=True, capture_output=True, timeout=60)
        self._mounted = True

    def close(self) -> None:
        if self._mounted:
            for argv in (["fusermount3", "-u"], ["fusermount", "-u"], ["umount", "-l"]):
                try:
                    if subprocess.run([*argv, str(self.path)], capture_output=True, timeout=60).returncode == 0:
                        break
                except FileNotFoundError:
                    continue
            self._mounted = False
