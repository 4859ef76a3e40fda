"""The merged ``/nix`` of container mode: the image's ``/nix`` under fuse-overlayfs.

The image is mounted with ``podman image mount`` and its ``/nix`` becomes the
read-only lower layer; writes land in ``<state-root>/nix-upper`` (persistent),
with ``nix-work`` as the overlay work dir and ``nix-merged`` as the mount
point that the sidecar mounts read-write and every task mounts read-only.

Rootful Podman mounts in the caller's own mount namespace (``direct``).
Rootless Podman keeps its storage in a user and mount namespace of its own,
so there every mount runs under ``podman unshare`` (``unshare``), which is
also where rootless ``podman run`` resolves ``--volume`` sources
(reference 8.3 and 8.6).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agentbox_runtime.container.state_file import MountMode
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.podman import Podman

_SUBPROCESS_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ImageMount:
    """A mounted image: where, in which namespace, and its Nix lower dir."""

    mode: MountMode
    path: str
    lowerdir: str


_ESCAPED = " \t\n\\"


def escape_mountinfo(path: str) -> str:
    """Encode ``path`` the way /proc mountinfo prints it (octal escapes)."""
    return "".join(f"\\{ord(c):03o}" if c in _ESCAPED else c for c in path)


def unescape_mountinfo(field: str) -> str:
    """Decode the octal escapes (``\\040`` etc.) of a /proc mountinfo field."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo_has(text: str, mount_point: str) -> bool:
    """True when ``mount_point`` is a mount point in mountinfo ``text``."""
    target = os.path.normpath(mount_point)
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and unescape_mountinfo(fields[4]) == target:
            return True
    return False


def is_mounted(podman: Podman, mount_point: Path, mode: MountMode) -> bool:
    """Whether ``mount_point`` is mounted in the namespace of ``mode``."""
    if mode is MountMode.DIRECT:
        return mountinfo_has(Path("/proc/self/mountinfo").read_text(), str(mount_point))
    proc = podman.capture(["unshare", "cat", "/proc/self/mountinfo"])
    return proc.returncode == 0 and mountinfo_has(proc.stdout, str(mount_point))


def _lowerdir(candidates_ok: dict[str, bool], mount: str) -> str | None:
    if candidates_ok[f"{mount}/nix"]:
        return f"{mount}/nix"
    if candidates_ok[f"{mount}/store"]:
        return mount
    return None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _attempt_direct(podman: Podman, image: str) -> ImageMount:
    path = _last_line(podman.output(["image", "mount", image], "podman image mount failed"))
    if not path or not os.path.isdir(path):
        raise AgentboxError(f"direct: image mount path '{path}' is not a directory")
    lower = _lowerdir({f"{path}/nix": os.path.isdir(f"{path}/nix"),
                       f"{path}/store": os.path.isdir(f"{path}/store")}, path)
    if lower is None:
        raise AgentboxError(f"direct: '{path}' has neither nix/ nor store/")
    return ImageMount(MountMode.DIRECT, path, lower)


def _attempt_unshare(podman: Podman, image: str) -> ImageMount:
    out = podman.output(["unshare", "podman", "image", "mount", image],
                        "podman unshare podman image mount failed")
    path = _last_line(out)
    q = shlex.quote(path)
    script = (f"test -d {q} || exit 3; test -d {q}/nix && echo nix; "
              f"test -d {q}/store && echo store; exit 0")
    proc = podman.capture(["unshare", "sh", "-c", script])
    if not path or proc.returncode != 0:
        raise AgentboxError(f"unshare: image mount path '{path}' is not a directory")
    found = proc.stdout.split()
    lower = _lowerdir({f"{path}/nix": "nix" in found, f"{path}/store": "store" in found}, path)
    if lower is None:
        raise AgentboxError(f"unshare: '{path}' has neither nix/ nor store/")
    return ImageMount(MountMode.UNSHARE, path, lower)


def mount_image(podman: Podman, image: str) -> ImageMount:
    """Mount ``image`` directly, else under ``podman unshare``; find its Nix dir.

    The lower dir is ``<mount>/nix`` when that is a directory, else the mount
    itself when it holds ``store/``. When both attempts fail the error lists
    them: ``unable to mount image '<image>' with a usable Nix lowerdir;
    attempts: <direct> | <unshare>``.
    """
    errors: list[str] = []
    for attempt in (_attempt_direct, _attempt_unshare):
        try:
            return attempt(podman, image)
        except AgentboxError as exc:
            errors.append(str(exc))
    raise AgentboxError(
        f"unable to mount image '{image}' with a usable Nix lowerdir; attempts: "
        + " | ".join(errors))


def unmount_image(podman: Podman, image: str) -> None:
    """``podman image unmount <image>`` in both namespaces, errors ignored."""
    podman.capture(["image", "unmount", image])
    podman.capture(["unshare", "podman", "image", "unmount", image])


def fuse_overlayfs_argv(lower: str, upper: Path, work: Path, merged: Path) -> list[str]:
    """The fuse-overlayfs command line that builds the merged ``/nix``."""
    return ["fuse-overlayfs", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
            str(merged)]


def require_fuse_overlayfs() -> None:
    """Fail unless fuse-overlayfs is on PATH (sidecar mode needs it)."""
    if shutil.which("fuse-overlayfs") is None:
        raise AgentboxError(
            "fuse-overlayfs is required for sidecar mode but is not installed or not "
            "available on PATH")


def mount_overlay(podman: Podman, mode: MountMode, lower: str, upper: Path,
                  work: Path, merged: Path) -> None:
    """Mount the fuse-overlayfs merged ``/nix`` at ``merged`` in ``mode``'s namespace."""
    argv = fuse_overlayfs_argv(lower, upper, work, merged)
    context = (f"fuse-overlayfs mount failed for '{merged}' (lower={lower}, upper={upper}, "
               f"work={work})")
    if mode is MountMode.UNSHARE:
        podman.output(["unshare", *argv], context)
        return
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=_SUBPROCESS_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise AgentboxError("fuse-overlayfs is not installed or not available on PATH") from exc
    if proc.returncode != 0:
        detail = proc.stderr.strip()
        raise AgentboxError(f"{context}: {detail}" if detail else context)


def _unmount_direct(merged: Path) -> None:
    for argv in (["fusermount3", "-u"], ["fusermount", "-u"], ["umount"]):
        if not mountinfo_has(Path("/proc/self/mountinfo").read_text(), str(merged)):
            return
        try:
            subprocess.run([*argv, str(merged)], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=_SUBPROCESS_TIMEOUT_S, check=False)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
    if mountinfo_has(Path("/proc/self/mountinfo").read_text(), str(merged)):
        raise AgentboxError(
            f"failed to unmount stale fuse mount '{merged}'; unmount it manually before retrying")


_UNSHARE_UNMOUNT = """\
m={m}
e={e}
mounted() {{ E="$e" awk '$5 == ENVIRON["E"] {{ found = 1 }} END {{ exit !found }}' /proc/self/mountinfo; }}
for cmd in "fusermount3 -u" "fusermount -u" "umount"; do
  mounted || exit 0
  $cmd "$m" 2>/dev/null
done
mounted && exit 2
exit 0
"""


def unmount_overlay(podman: Podman, merged: Path, mode: MountMode) -> None:
    """Unmount ``merged`` in the recorded ``mode`` (reference 8.6).

    In ``unshare`` mode the unmount runs under ``podman unshare`` first and
    then falls back to the current namespace. A mount that stays raises
    ``failed to unmount stale fuse mount '<m>'; unmount it manually before
    retrying``.
    """
    if mode is MountMode.UNSHARE:
        script = _UNSHARE_UNMOUNT.format(m=shlex.quote(str(merged)),
                                          e=shlex.quote(escape_mountinfo(str(merged))))
        proc = podman.capture(["unshare", "sh", "-c", script])
        if proc.returncode == 2:
            raise AgentboxError(
                f"failed to unmount stale fuse mount '{merged}'; unmount it manually before "
                "retrying")
    _unmount_direct(merged)


def unmount_overlay_everywhere(podman: Podman, merged: Path) -> None:
    """Unmount ``merged`` in both namespaces (used when no state says which)."""
    unmount_overlay(podman, merged, MountMode.UNSHARE)
