"""The sidecar state file ``<state-root>/nix-sidecar.state`` (reference 8.4).

It records which sidecar stack (image, image mount, merged ``/nix`` mount
mode, proxy port) belongs to a workspace, so the next ``agentbox container``
can reuse it or clean it up. A file that cannot be parsed is deleted with a
notice on stderr and the stack is rebuilt; a state written by a legacy
(non-container) configuration is kept only so it can be cleaned up.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TextIO

from agentbox_runtime.errors import AgentboxError

_REQUIRED = ("image", "image_id", "image_mount_path", "sidecar_name")


class MountMode(StrEnum):
    """Where the image and the merged ``/nix`` overlay are mounted.

    ``direct``: in the caller's own mount namespace (rootful Podman).
    ``unshare``: inside ``podman unshare`` (rootless Podman's namespace).
    """

    DIRECT = "direct"
    UNSHARE = "unshare"


class StateParseError(AgentboxError):
    """The state file is malformed; its text is the reason."""


@dataclass(frozen=True)
class SidecarState:
    """One parsed ``nix-sidecar.state``."""

    image: str
    image_id: str
    image_mount_path: str
    sidecar_name: str
    mount_mode: MountMode = MountMode.DIRECT
    proxy_port: int | None = None
    native_config: bool = True

    def matches(self, image: str, image_id: str, sidecar_name: str) -> bool:
        """True when this state describes the stack for exactly these values."""
        return (self.image, self.image_id, self.sidecar_name) == (image, image_id, sidecar_name)

    def render(self) -> str:
        """The file text, in the reference's key order."""
        lines = [
            f"image={self.image}",
            f"image_id={self.image_id}",
            f"image_mount_path={self.image_mount_path}",
            f"sidecar_name={self.sidecar_name}",
            f"mount_mode={self.mount_mode.value}",
        ]
        if self.proxy_port is not None:
            lines.append(f"proxy_port={self.proxy_port}")
        return "\n".join(lines) + "\n"


def parse_state(text: str, file: str) -> SidecarState:
    """Parse state-file ``text``; ``file`` only names the file in errors.

    Raises :class:`StateParseError` with the reference wording:
    ``unsupported mount_mode '<v>' in '<file>'``,
    ``invalid proxy_port '<v>' in '<file>'`` or ``'<file>' is incomplete``.
    """
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), value.strip())
    mode_text = values.get("mount_mode", MountMode.DIRECT.value)
    try:
        mode = MountMode(mode_text)
    except ValueError:
        raise StateParseError(f"unsupported mount_mode '{mode_text}' in '{file}'") from None
    port: int | None = None
    if "proxy_port" in values:
        port_text = values["proxy_port"]
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise StateParseError(f"invalid proxy_port '{port_text}' in '{file}'")
        port = int(port_text)
    if any(not values.get(key) for key in _REQUIRED):
        raise StateParseError(f"'{file}' is incomplete")
    native = values.get("runtime_mode", "native") == "native" and \
        values.get("network_mode", "passt") == "passt"
    return SidecarState(
        image=values["image"], image_id=values["image_id"],
        image_mount_path=values["image_mount_path"], sidecar_name=values["sidecar_name"],
        mount_mode=mode, proxy_port=port, native_config=native,
    )


def load_state(path: Path, stderr: TextIO | None = None) -> SidecarState | None:
    """Read the state file at ``path``; ``None`` when there is none.

    A file that cannot be read or parsed (including a symlink) is deleted
    and ``agentbox: ignored stale sidecar state '<file>'; recreating sidecar
    stack (<reason>)`` is printed to ``stderr``; the caller then behaves as
    if there were no state. Failing to delete it is an :class:`AgentboxError`.
    """
    if not os.path.lexists(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read()
        return parse_state(data.decode("utf-8"), str(path))
    except (OSError, UnicodeDecodeError, StateParseError) as exc:
        reason = exc if isinstance(exc, StateParseError) else \
            StateParseError(f"failed to read '{path}': {exc}")
        try:
            os.unlink(path)
        except OSError as rm_exc:
            raise AgentboxError(
                f"failed to remove stale sidecar state '{path}': {rm_exc}") from rm_exc
        out = stderr if stderr is not None else sys.stderr
        print(f"agentbox: ignored stale sidecar state '{path}'; recreating sidecar stack "
              f"({reason})", file=out)
        return None


def write_state(path: Path, state: SidecarState) -> None:
    """Write ``state`` to ``path`` atomically with mode 0600."""
    tmp = path.with_name(path.name + f".tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(state.render())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_state(path: Path) -> None:
    """Delete the state file if it exists."""
    path.unlink(missing_ok=True)
