"""Checks for host tools: Podman, Buildah, OCI runtimes (crun's krun handler, the QEMU-backed
``agentbox-krun-runtime``), btrfs, blkid, fuse-overlayfs, QEMU, passt, the image."""

from __future__ import annotations

import json
import os
import shutil

from agentbox_runtime.container import host_conf, podman_api
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.hostcheck.check import Check, run_tool, tool_check
from agentbox_runtime.hostcheck.crun import SELECT_QEMU_RUNTIME
from agentbox_runtime.hostcheck.parsers import podman_summary, qemu_accelerators
from agentbox_runtime.images.recipe import DEFAULT_TAG
from agentbox_runtime.oci.locate import runtime_path
from agentbox_runtime.tasks.krun_podman_argv import select_krun_runtime

OCI_RUNTIMES = ("crun", "runc", "krun", "crun-krun", "youki", "runsc", "kata-runtime")


def check_podman() -> Check:
    """Podman version, rootless or not, its default OCI runtime and the runtimes on PATH.

    Whether Podman can really run a container here is not probed (crun may
    refuse this host's cgroup layout; see the ``cgroups`` line).
    """
    base = tool_check("podman", ("podman",), ("--version",), "podman")
    if not base.ok:
        return base
    runtimes = [r for r in OCI_RUNTIMES if shutil.which(r)]
    try:  # through the Podman API, as every structured read (the session's service)
        info = json.dumps(podman_api.info())
    except AgentboxError as exc:
        return Check("podman", False, "unusable", f"{base.detail}; {exc}",
                     "run 'podman info' to see the cause (storage or containers.conf errors)")
    return Check("podman", True, "ok",
                 f"{base.detail}; {podman_summary(info)}; OCI runtimes on PATH: {', '.join(runtimes) or 'none'}")


def check_podman_conf() -> Check:
    """Whether container mode (and the harness) run Podman with agentbox's own ``containers.conf``
    (runc, ulimits inside the host's limits) because this host's defaults cannot run containers."""
    why = host_conf.needed()
    if why is None:
        return Check("podman-conf", True, "ok", "Podman's own defaults run containers here")
    chosen = os.environ.get(host_conf.ENV)
    detail = (f"{why}: container mode uses $CONTAINERS_CONF={chosen} (yours)" if chosen else
              f"{why}: container mode applies agentbox's containers.conf itself (runtime runc, ulimits "
              f"inside the host's limits; {host_conf.default_path()})")
    return Check("podman-conf", True, "ok", detail)


def check_krun_runtime() -> Check:
    """The QEMU-backed OCI runtime ``agentbox-krun-runtime`` for ``agentbox libkrun`` (it needs no
    +LIBKRUN crun): its path or that it is not installed, which runtime libkrun tasks use now, and
    how to select it."""
    try:
        selected = f"libkrun tasks use {select_krun_runtime(None)}"
    except AgentboxError as exc:
        selected = f"the krun runtime selection is invalid: {exc}"
    try:
        path = runtime_path()
    except AgentboxError as exc:
        return Check("krun-runtime", False, "missing", f"QEMU-backed krun runtime: {exc}; {selected}",
                     "reinstall agentbox-harness (pip install -e .) to get agentbox-krun-runtime")
    return Check("krun-runtime", True, "ok",
                 f"QEMU-backed krun runtime {path}; {selected} (default crun); "
                 f"select it with {SELECT_QEMU_RUNTIME}")


def check_runc() -> Check:
    """runc on PATH (the harness runs real containers with ``--runtime runc`` where crun refuses the host)."""
    return tool_check("runc", ("runc",), ("--version",), "runc")


def check_buildah() -> Check:
    """Buildah on PATH (image ingestion and ``buildah unshare``)."""
    return tool_check("buildah", ("buildah",), ("--version",), "buildah")


def check_btrfs() -> Check:
    """mkfs.btrfs and btrfs on PATH (raw data disks, snapshots, resize)."""
    return tool_check("btrfs-progs", ("mkfs.btrfs", "btrfs"), ("--version",), "btrfs-progs")


def check_blkid() -> Check:
    """blkid on PATH (filesystem type probes of raw disks)."""
    return tool_check("blkid", ("blkid",), ("--version",), "util-linux")


def check_passt() -> Check:
    """passt on PATH (the default network of libkrun tasks)."""
    return tool_check("passt", ("passt",), ("--version",), "passt")


def check_fuse() -> Check:
    """fuse-overlayfs on PATH and /dev/fuse present and usable by this process."""
    base = tool_check("fuse-overlayfs", ("fuse-overlayfs",), ("--version",), "fuse-overlayfs")
    if not base.ok:
        return base
    if not os.path.exists("/dev/fuse"):
        return Check("fuse-overlayfs", False, "unusable", f"{base.detail}; /dev/fuse does not exist",
                     "modprobe fuse (or pass --device /dev/fuse into this container)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return Check("fuse-overlayfs", False, "unusable",
                     f"{base.detail}; /dev/fuse is not readable and writable by this user",
                     "chmod 0666 /dev/fuse (Debian's default) or run as root")
    return Check("fuse-overlayfs", True, "ok", f"{base.detail}; /dev/fuse usable")


def qemu_binary_name() -> str:
    """``qemu-system-<arch>`` for this machine."""
    return f"qemu-system-{os.uname().machine}"


def check_qemu() -> Check:
    """The QEMU system emulator for this arch and the accelerators it lists (``-accel help``)."""
    binary = qemu_binary_name()
    base = tool_check("qemu", (binary,), ("--version",), "qemu-system-x86")
    if not base.ok:
        return base
    rc, out = run_tool([binary, "-accel", "help"])
    accels = qemu_accelerators(out) if rc == 0 else []
    return Check("qemu", True, "ok", f"{base.detail}; accelerators: {', '.join(accels) or 'unknown'}")


def check_image() -> Check:
    """Whether the guest image ``localhost/agentbox:latest`` exists in Podman's storage."""
    if shutil.which("podman") is None:
        return Check("guest-image", False, "missing", f"cannot look for {DEFAULT_TAG}: podman not on PATH",
                     "apt-get install podman, then agentbox image build")
    try:
        present = podman_api.image_exists(DEFAULT_TAG)
    except AgentboxError as exc:
        return Check("guest-image", False, "unusable", str(exc), "run 'podman images' to see the cause")
    if present:
        return Check("guest-image", True, "ok", f"{DEFAULT_TAG} present")
    return Check("guest-image", False, "missing", f"{DEFAULT_TAG} not built", "agentbox image build")
