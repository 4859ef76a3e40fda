"""The host report behind ``agentbox doctor`` and the harness's capability skips.

It sits on top of every backend: the probes it runs live below it (:mod:`agentbox_runtime.hostcheck`,
:mod:`agentbox_runtime.vmm.choice`), and its own lines for tools and the host in :mod:`.tools` and
:mod:`.system`.

Stable API (the pytest plugin builds its skips on it):

- :class:`Check` ``(name, ok, status, detail, fix)``, frozen;
- :func:`run_checks` ``(*, probe_kvm=False) -> list[Check]``, every check in report order;
- :func:`check_by_name` ``(name) -> Check``, one check;
- :func:`usable_backends` ``(checks) -> {backend: (usable, reason)}`` for
  ``krun-podman``, ``krun-direct``, ``qemu`` and ``container``.

Every subprocess has a short timeout and a missing tool is a result, never an
exception; a check that fails unexpectedly becomes an ``unusable`` line that
names the error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from agentbox_runtime.doctor.system import (check_cgroups, check_disk, check_idmap, check_krun_direct_boot,
                                            check_kvm_boot, check_libkrunfw, check_share_filter, check_tun,
                                            check_userns)
from agentbox_runtime.doctor.tools import (check_blkid, check_btrfs, check_buildah, check_fuse, check_image,
                                           check_krun_runtime, check_passt, check_podman, check_podman_conf,
                                           check_qemu, check_runc)
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.hostcheck.check import Check
from agentbox_runtime.hostcheck.crun import check_crun_krun
from agentbox_runtime.hostcheck.devices import check_kvm_device
from agentbox_runtime.vmm.choice import check_libkrun
from agentbox_runtime.vmm.libkrun import is_standin

__all__ = ["BACKENDS", "CHECKS", "KRUN_PODMAN_QEMU", "Check", "check_by_name", "check_kvm_device", "check_libkrun",
           "krun_podman_runtime",
           "render_json", "render_text", "run_checks", "standin_in_use", "usable_backends"]

CHECKS: dict[str, Callable[[], Check]] = {
    "podman": check_podman,
    "buildah": check_buildah,
    "crun-krun": check_crun_krun,
    "krun-runtime": check_krun_runtime,
    "runc": check_runc,
    "podman-conf": check_podman_conf,
    "btrfs-progs": check_btrfs,
    "blkid": check_blkid,
    "fuse-overlayfs": check_fuse,
    "passt": check_passt,
    "qemu": check_qemu,
    "kvm-device": check_kvm_device,
    "kvm-boot": check_kvm_boot,
    "libkrun": check_libkrun,
    "libkrunfw": check_libkrunfw,
    "krun-direct-boot": check_krun_direct_boot,
    "net-tun": check_tun,
    "user-namespaces": check_userns,
    "idmap": check_idmap,
    "share-filter": check_share_filter,
    "cgroups": check_cgroups,
    "disk-space": check_disk,
    "guest-image": check_image,
}
"""Check name -> check function, in report order."""

_ROOTLESS = ("user-namespaces", "idmap")  # both pass for root
BACKENDS: dict[str, tuple[str, ...]] = {
    "krun-podman": ("podman", "crun-krun", "libkrunfw", "kvm-device", "net-tun", "passt", "cgroups",
                    "btrfs-progs", "blkid", *_ROOTLESS),
    "krun-direct": ("libkrun", "krun-direct-boot", "share-filter", "buildah", "btrfs-progs", "blkid", *_ROOTLESS),
    "qemu": ("qemu", "share-filter", "buildah", "btrfs-progs", "blkid", *_ROOTLESS),
    "container": ("podman", "runc", "fuse-overlayfs", *_ROOTLESS),
}
"""Backend -> the checks it needs (all of them). qemu falls back to TCG, so it does not need /dev/kvm.
krun-direct needs a passed probe boot through the library that loads (which proves libkrunfw and
KVM too; their own lines say why a boot failed)."""

KRUN_PODMAN_QEMU: tuple[str, ...] = ("podman", "krun-runtime", "qemu", "share-filter", "net-tun", "btrfs-progs",
                                     "blkid", *_ROOTLESS)
"""krun-podman without crun's krun handler: Podman running ``agentbox-krun-runtime``, which boots the
container's rootfs with qemu (KVM when proven, TCG otherwise)."""


def krun_podman_runtime(checks: Sequence[Check]) -> str | None:
    """``crun`` when krun-podman can run through crun with libkrun, ``qemu`` when only through
    ``agentbox-krun-runtime``, None when through neither."""
    by = {c.name: c for c in checks}
    for name, needs in (("crun", BACKENDS["krun-podman"]), ("qemu", KRUN_PODMAN_QEMU)):
        if all(by[n].ok for n in needs if n in by):
            return name
    return None


def standin_in_use(backend: str, checks: Sequence[Check]) -> str | None:
    """What stand-in would serve ``backend`` here instead of the real thing, in words; None when the
    real thing would (or the backend has no stand-in). krun-podman runs through
    ``agentbox-krun-runtime`` when crun lacks the krun handler; krun-direct through the QEMU-backed
    libkrun stand-in when that is the library that loads."""
    if backend == "krun-podman" and krun_podman_runtime(checks) == "qemu":
        return "agentbox-krun-runtime (the QEMU stand-in), not crun with libkrun"
    if backend == "krun-direct":
        try:
            if is_standin():
                return "the QEMU-backed libkrun stand-in, not libkrun"
        except AgentboxError:
            return None
    return None


def _guarded(name: str, fn: Callable[[], Check]) -> Check:
    try:
        return fn()
    except Exception as exc:  # a broken check is a report line, never a crash
        return Check(name, False, "unusable", f"check failed: {type(exc).__name__}: {exc}",
                     "report this as an agentbox doctor bug")


def check_by_name(name: str) -> Check:
    """Run the one check called ``name`` (a key of :data:`CHECKS`).

    ``kvm-boot`` reports the KVM boot probe's recorded verdict. An unknown
    name raises ``KeyError`` naming the accepted ones.
    """
    if name not in CHECKS:
        raise KeyError(f"unknown doctor check {name!r}; known: {', '.join(CHECKS)}")
    return _guarded(name, CHECKS[name])


def run_checks(*, probe_kvm: bool = False) -> list[Check]:
    """Every check, in report order.

    The KVM boot probe's verdict is asked for only with ``probe_kvm``;
    otherwise its line says "not probed".
    """
    return [_guarded(name, (lambda: check_kvm_boot(probe_kvm)) if name == "kvm-boot" else fn)
            for name, fn in CHECKS.items()]


def usable_backends(checks: Sequence[Check]) -> dict[str, tuple[bool, str]]:
    """Per backend: ``(usable, reason)``.

    The reason is ``usable`` or, for an unusable backend, every failed check
    it needs as ``name: detail (fix: how to get it)`` joined by ``; ``. A check
    absent from ``checks`` counts as not failed.
    """
    by = {c.name: c for c in checks}
    table = {}
    for backend, needs in BACKENDS.items():
        failed = [by[n] for n in needs if n in by and not by[n].ok]
        table[backend] = (not failed, "; ".join(c.reason() for c in failed) or "usable")
    if not table["krun-podman"][0]:
        failed = [by[n] for n in KRUN_PODMAN_QEMU if n in by and not by[n].ok]
        table["krun-podman"] = ((True, "usable through agentbox-krun-runtime (QEMU); crun lacks libkrun") if not failed
                                else (False, f"{table['krun-podman'][1]}; or through agentbox-krun-runtime: "
                                             f"{'; '.join(c.reason() for c in failed)}"))
    return table


def render_text(checks: Sequence[Check]) -> str:
    """The human report: a row per check (name, status, detail), a fix line under each failure, backends."""
    width = max((len(c.name) for c in checks), default=4)
    lines = [f"{'check':<{width}}  {'status':<8}  detail"]
    for c in checks:
        detail = " | ".join(part.strip() for part in c.detail.splitlines() if part.strip())
        lines.append(f"{c.name:<{width}}  {c.status:<8}  {detail}")
        if not c.ok and c.fix:
            lines.append(f"{'':<{width}}  {'':<8}  fix: {c.fix}")
    lines += ["", "backends:"]
    for name, (ok, why) in usable_backends(checks).items():
        lines.append(f"  {name:<12} {'usable' if ok else 'unavailable: ' + why}")
    return "\n".join(lines)


def render_json(checks: Sequence[Check]) -> str:
    """``{"checks": [check dicts], "backends": {name: {"usable", "reason"}}}`` as indented JSON."""
    backends = {k: {"usable": ok, "reason": why} for k, (ok, why) in usable_backends(checks).items()}
    return json.dumps({"checks": [c.as_dict() for c in checks], "backends": backends}, indent=2)
