"""Persistent host mounts shared by libkrun and container tasks (reference 3.5)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agentbox_guest_init.contract import ENV_SCCACHE_DIR
from agentbox_guest_init.image_user import DEFAULT_IMAGE_USER, ImageUser
from agentbox_runtime.errors import AgentboxError, InputError
from agentbox_runtime.state import StateLayout, ensure_private_dir


def mount_arg(source: Path, target: str, options: str | None = None) -> str:
    """``<src>:<dst>[:<opts>]``; the source must be valid UTF-8."""
    text = os.fsdecode(source)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"path '{text!r}' is not valid UTF-8 and cannot be mounted") from None
    return f"{text}:{target}" + (f":{options}" if options else "")


@dataclass(frozen=True)
class Volumes:
    """The ordered volume arguments and the env that goes with them."""

    args: tuple[str, ...]
    env: tuple[str, ...]

    def argv(self) -> list[str]:
        out: list[str] = []
        for v in self.args:
            out += ["--volume", v]
        for e in self.env:
            out += ["--env", e]
        return out


def task_volumes(layout: StateLayout, home: Path | None = None, create: bool = True,
                 user: ImageUser = DEFAULT_IMAGE_USER) -> Volumes:
    """Workspace (at the image user's workdir), ~/.codex, ~/.pi, cargo and the shared sccache (in
    the image user's home), in that order."""
    if home is None:
        if not os.environ.get("HOME"):
            raise AgentboxError("HOME is not set; cannot mount ~/.codex into the task")
        home = Path(os.environ["HOME"])
    codex, pi = home / ".codex", home / ".pi"
    if create:
        codex.mkdir(parents=True, exist_ok=True)
        pi.mkdir(parents=True, exist_ok=True)
        ensure_private_dir(layout.cargo_dir, layout.app_dir)
        ensure_private_dir(layout.sccache_dir, layout.app_dir)
    sccache = f"{user.home}/.cache/sccache"
    return Volumes(
        (mount_arg(layout.workspace, user.workdir),
         mount_arg(codex, f"{user.home}/.codex"),
         mount_arg(pi, f"{user.home}/.pi"),
         mount_arg(layout.cargo_dir, f"{user.home}/.cargo"),
         mount_arg(layout.sccache_dir, sccache)),
        (f"{ENV_SCCACHE_DIR}={sccache}",),
    )
