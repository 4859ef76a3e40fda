"""The ``workspace`` fixture's object: a project directory mounted at /workspace."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from agentbox_runtime.state import StateLayout

MODES = ("direct", "copy", "overlay-review")


@dataclass
class Workspace:
    """A host directory the guest sees at /workspace, with its slug and state root.

    Modes: ``direct`` (the directory itself), ``copy`` (a private copy),
    ``overlay-review`` (the guest writes into an upper layer: :meth:`changes`
    lists them, :meth:`apply` copies them onto the source, :meth:`discard`
    drops them).
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

    def changes(self) -> list[str]:
        """Paths (relative) the guest wrote, in overlay-review mode."""
        if self._upper is None:
            raise ValueError("changes() needs an overlay-review workspace")
        return sorted(str(p.relative_to(self._upper)) for p in self._upper.rglob("*") if p.is_file())

    def apply(self) -> None:
        """Copy the guest's writes onto the source directory."""
        for rel in self.changes():
            dest = self.source / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self._upper / rel, dest)  # type: ignore[operator]

    def discard(self) -> None:
        """Drop the guest's writes (remount an empty upper layer)."""
        if self._upper is None:
            raise ValueError("discard() needs an overlay-review workspace")
        self.close()
        shutil.rmtree(self._upper)
        self._upper.mkdir()
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
