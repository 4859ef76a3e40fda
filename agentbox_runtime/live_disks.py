"""Live-disk probe: is a raw image in use by a running guest? (reference 5.3)

A Podman container "uses" an image when one of its annotations is
``krun.disk.<i>.path=<image path>``. The probe fails closed: if Podman cannot
be asked, the caller's operation is refused. One interface,
:class:`RunningContainers`, with two implementations: the Podman API through
podman-py when its socket answers, and the ``podman`` CLI otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.podman import Podman

ANNOTATION_FORMAT = '{{range $key, $value := .Config.Annotations}}{{printf "%s=%s\\n" $key $value}}{{end}}'


class RunningContainers(Protocol):
    """Running containers and their annotations."""

    def annotations(self, operation: str) -> Mapping[str, Mapping[str, str]]:
        """``{container id: {annotation: value}}``; raises AgentboxError when Podman fails."""
        ...


def parse_annotation_lines(text: str) -> dict[str, str]:
    """``key=value`` lines (split on the first ``=``) into a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


class CliContainers:
    """The ``podman ps`` + ``podman inspect`` implementation."""

    def __init__(self, podman: Podman | None = None) -> None:
        self.podman = podman or Podman()

    def annotations(self, operation: str) -> dict[str, dict[str, str]]:
        ids_text = self.podman.output(
            ["ps", "--format", "{{.ID}}"],
            f"failed to list running Podman containers before libkrun {operation}")
        result: dict[str, dict[str, str]] = {}
        for cid in (line.strip() for line in ids_text.splitlines()):
            if not cid:
                continue
            text = self.podman.output(
                ["inspect", "--format", ANNOTATION_FORMAT, cid],
                f"failed to inspect running Podman container annotations before libkrun {operation}")
            result[cid] = parse_annotation_lines(text)
        return result


class ApiContainers:
    """The podman-py implementation over the Podman API socket."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def annotations(self, operation: str) -> dict[str, dict[str, str]]:
        from podman import PodmanClient

        try:
            with PodmanClient(base_url=f"unix://{self.socket_path}", timeout=30) as client:
                result: dict[str, dict[str, str]] = {}
                for container in client.containers.list():
                    config = container.attrs.get("Config") or {}
                    annos = config.get("Annotations")
                    if annos is None:
                        annos = client.containers.get(container.id).inspect().get(
                            "Config", {}).get("Annotations") or {}
                    result[container.id[:12]] = dict(annos)
                return result
        except Exception as exc:  # podman-py raises several unrelated types
            raise AgentboxError(
                f"failed to list running Podman containers before libkrun {operation}: {exc}") from None


def api_socket() -> Path | None:
    """The Podman API socket of this user, if one exists."""
    candidates = []
    if os.environ.get("CONTAINER_HOST", "").startswith("unix://"):
        candidates.append(Path(os.environ["CONTAINER_HOST"][len("unix://"):]))
    if os.geteuid() == 0:
        candidates.append(Path("/run/podman/podman.sock"))
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
        candidates.append(Path(xdg) / "podman" / "podman.sock")
    for path in candidates:
        if path.is_socket():
            return path
    return None


def default_containers(podman: Podman | None = None) -> RunningContainers:
    """podman-py when the API socket exists, the CLI otherwise."""
    sock = api_socket()
    return ApiContainers(sock) if sock else CliContainers(podman)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: same (st_dev, st_ino) when both exist (aliases through
    symlinks, bind mounts or ``..`` included), else the same normalised real path."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def users_of(path: Path, running: Mapping[str, Mapping[str, str]]) -> list[str]:
    """IDs of containers whose ``krun.disk.*.path`` annotation names the file ``path`` (by identity)."""
    return [cid for cid, annos in running.items()
            if any(k.startswith("krun.disk.") and k.endswith(".path") and same_file(v, path)
                   for k, v in annos.items())]


def refuse_if_live(path: Path, operation: str, source: RunningContainers | None = None,
                   extra_users: Iterable[str] = ()) -> None:
    """Raise when a running guest uses ``path``. ``operation`` is resize or reset.

    ``extra_users`` lets other backends (the harness's qemu VMs) report users."""
    source = source or default_containers()
    users = users_of(path, source.annotations(operation)) + list(extra_users)
    if users:
        raise AgentboxError(
            f"refusing to {operation} libkrun raw image '{path}' while running Podman "
            f"container(s) use it: {', '.join(users)}")
