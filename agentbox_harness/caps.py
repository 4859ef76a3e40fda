"""Capability skips, computed once per session from :mod:`agentbox_runtime.doctor`.

Markers map to capabilities:

- ``needs_kvm``: the doctor's ``kvm-device`` check;
- ``needs_libkrun``: ``libkrun`` and ``libkrunfw``;
- ``needs_root``: an effective uid of 0;
- ``vm``: the selected backend (``--agentbox-backend``, ``auto`` = best usable)
  is usable on this host.

A missing capability skips the test with a reason naming it and how to get it
(the doctor's fix line); under ``--agentbox-strict`` it fails the test instead.
"""

from __future__ import annotations

import os

import pytest

from agentbox_harness.session import HarnessSession
from agentbox_runtime.doctor import standin_in_use

MARKER_CAPS: dict[str, tuple[str, ...]] = {
    "needs_kvm": ("kvm-device",),
    "needs_libkrun": ("libkrun", "libkrunfw"),
}
"""Marker -> the doctor checks it needs."""

CAP_MARKERS = ("needs_kvm", "needs_libkrun", "needs_root", "vm")


def missing(session: HarnessSession, names: tuple[str, ...]) -> list[str]:
    """The failed doctor checks among ``names``, each as ``name: detail (fix: ...)``."""
    by = {c.name: c for c in session.checks}
    return [by[n].reason() for n in names if n in by and not by[n].ok]


def unavailable(session: HarnessSession, reason: str) -> None:
    """Skip with ``missing capability: <reason>``, or fail the test in strict mode."""
    if session.strict:
        pytest.fail(f"missing capability (--agentbox-strict): {reason}", pytrace=False)
    pytest.skip(f"missing capability: {reason}")


def require_backend(session: HarnessSession, backend: str) -> None:
    """Skip (strict: fail) unless ``backend`` is usable here, naming every failed check. Under
    ``--agentbox-strict`` a krun backend that only a QEMU stand-in would serve fails too, unless the
    run allows stand-ins: a nightly krun shard passes only when crun with libkrun (krun-podman) or
    libkrun (krun-direct) ran."""
    if backend not in session.backends:
        return  # a registered backend the doctor does not know has no host requirements
    usable, why = session.backends[backend]
    if not usable:
        unavailable(session, f"backend {backend} unavailable: {why}")
    if session.strict and not session.allow_standins:
        standin = standin_in_use(backend, session.checks)
        if standin:
            unavailable(session, f"backend {backend} would run through {standin} "
                                 "(pass --agentbox-allow-standins to count the stand-in)")


def check_markers(session: HarnessSession, item: pytest.Item) -> None:
    """Apply the capability markers of ``item`` (see the module docstring)."""
    for marker, caps in MARKER_CAPS.items():
        if item.get_closest_marker(marker):
            gone = missing(session, caps)
            if gone:
                unavailable(session, "; ".join(gone))
    if item.get_closest_marker("needs_root") and os.geteuid() != 0:
        unavailable(session, "needs_root: not running as root (fix: run the suite as root, e.g. with sudo)")
    if item.get_closest_marker("vm"):
        require_backend(session, session.backend)
