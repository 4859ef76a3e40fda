"""Capability skips: a missing capability skips naming it and how to get it;
under ``--agentbox-strict`` it fails instead."""

from __future__ import annotations

import os

import pytest

from agentbox_harness.session import HarnessSession

MARKER_CAPS = {
    "needs_kvm": ("kvm-device",),
    "needs_libkrun": ("libkrun", "libkrunfw"),
}


def missing(session: HarnessSession, names: tuple[str, ...]) -> list[str]:
    by = {c.name: c for c in session.checks}
    out = []
    for n in names:
        c = by.get(n)
        if c is not None and not c.ok:
            out.append(f"{n}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else ""))
    return out


def unavailable(session: HarnessSession, reason: str) -> None:
    """Skip, or fail in strict mode."""
    if session.strict:
        pytest.fail(f"missing capability (strict mode): {reason}", pytrace=False)
    pytest.skip(f"missing capability: {reason}")


def require_backend(session: HarnessSession, backend: str) -> None:
    usable, why = session.backends.get(backend, (False, f"unknown backend {backend}"))
    if not usable:
        unavailable(session, f"backend {backend} unavailable: {why}")


def check_markers(session: HarnessSession, item: pytest.Item) -> None:
    for marker, caps in MARKER_CAPS.items():
        if item.get_closest_marker(marker):
            gone = missing(session, caps)
            if gone:
                unavailable(session, "; ".join(gone))
    if item.get_closest_marker("needs_root") and os.geteuid() != 0:
        unavailable(session, "needs root on the host (run the suite as root or with sudo)")
