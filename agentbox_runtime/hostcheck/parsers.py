"""Pure parsers behind the host probes (tool output and /proc, /etc text in; facts out)."""

from __future__ import annotations

import json
import re
import stat


def crun_has_krun(version_text: str) -> bool:
    """Whether ``crun --version`` output lists the libkrun handler (``+LIBKRUN``)."""
    return any("+LIBKRUN" in line.split() for line in version_text.splitlines())


def qemu_accelerators(help_text: str) -> list[str]:
    """Accelerator names from ``qemu-system-* -accel help`` (the lines after the heading)."""
    return [line.strip() for line in help_text.splitlines()
            if re.fullmatch(r"\s*[a-z][a-z0-9_-]*\s*", line)]


def cgroup_layout(mountinfo: str) -> str:
    """The cgroup layout from ``/proc/self/mountinfo`` text.

    ``v2`` (only a unified cgroup2 mount), ``hybrid`` (v1 controller mounts
    plus a cgroup2 mount), ``v1`` (only v1 controller mounts) or ``none``.
    """
    fstypes = set()
    for line in mountinfo.splitlines():
        _, sep, tail = line.partition(" - ")
        if sep and tail.split():
            fstypes.add(tail.split()[0])
    if "cgroup2" in fstypes:
        return "hybrid" if "cgroup" in fstypes else "v2"
    return "v1" if "cgroup" in fstypes else "none"


def cgroup_meaning(layout: str) -> str:
    """What a cgroup ``layout`` (from :func:`cgroup_layout`) means for crun and runc."""
    return {
        "v2": "unified cgroup v2: crun and runc both work",
        "hybrid": ("crun refuses it ('cgroups in hybrid mode not supported, drop all controllers from "
                   "cgroupv2'); runc works: run containers with --runtime runc"),
        "v1": "legacy cgroup v1: runc works; crun's libkrun handler expects cgroup v2",
    }.get(layout, "no cgroup filesystem mounted: containers cannot be limited")


def podman_summary(info_json: str) -> str:
    """``rootless=<bool> runtime=<name> cgroups=<v1|v2> manager=<...>`` from ``podman info --format json``."""
    try:
        host = json.loads(info_json)["host"]
    except (ValueError, KeyError, TypeError):
        return "podman info output not understood"
    parts = [f"rootless={str(host.get('security', {}).get('rootless')).lower()}",
             f"runtime={host.get('ociRuntime', {}).get('name', '?')}"]
    if host.get("cgroupVersion"):
        parts.append(f"cgroups={host['cgroupVersion']}")
    if host.get("cgroupManager"):
        parts.append(f"manager={host['cgroupManager']}")
    return " ".join(parts)


def load_failure(name: str, message: str) -> str:
    """Classify a ``ctypes.CDLL(name)`` error: not found by the loader, or a load error.

    A missing dependency (``libkrunfw.so.4: cannot open ...``) is a load error
    of ``name``, not a missing ``name``.
    """
    if message.startswith(f"{name}: cannot open shared object file"):
        where = "not found at that path" if "/" in name else "not found by soname in the loader path"
        return f"{name} {where}"
    return f"{name} load error: {message}"


def subid_ranges(text: str, user: str, uid: int) -> list[tuple[int, int]]:
    """``(start, count)`` ranges of /etc/subuid or /etc/subgid text for ``user`` (by name or uid)."""
    out = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (user, str(uid)) and fields[1].isdigit() and fields[2].isdigit():
            out.append((int(fields[1]), int(fields[2])))
    return out


def can_read_write(mode: int, owner: int, group: int, uid: int, gids: set[int]) -> bool:
    """Whether a user (``uid`` in ``gids``) may open a file of this mode and ownership read-write."""
    if uid == 0:
        return True
    if uid == owner:
        want = stat.S_IRUSR | stat.S_IWUSR
    elif group in gids:
        want = stat.S_IRGRP | stat.S_IWGRP
    else:
        want = stat.S_IROTH | stat.S_IWOTH
    return mode & want == want
