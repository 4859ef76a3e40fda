"""Which VMM runs a microVM here: libkrun when it loads and ``/dev/kvm`` answers, else QEMU.

Also the libkrun probe behind that choice (the doctor's ``libkrun`` line reports the same check).
"""

from __future__ import annotations

import ctypes
import os

from agentbox_runtime.hostcheck.check import Check
from agentbox_runtime.hostcheck.devices import check_kvm_device
from agentbox_runtime.hostcheck.parsers import load_failure
from agentbox_runtime.vmm.libkrun import SONAMES as LIBKRUN_SONAMES
from agentbox_runtime.vmm.libkrun import is_standin

VMMS = ("qemu", "libkrun")
"""The VMMs a microVM can run under (``auto`` picks one with :func:`choose_vmm`)."""
LIBKRUN_ENV = "AGENTBOX_LIBKRUN_LIBRARY"
LIBKRUN_FIX = ("no Debian 12 package: build libkrun and libkrunfw from source "
               "(github.com/containers/libkrun) or with Nix (nix build .#libkrun), "
               f"then set {LIBKRUN_ENV}=/path/to/libkrun.so.1")


def first_loadable(names: list[str]) -> tuple[str | None, list[str]]:
    """The first library in ``names`` that loads, and the load failures before it (one line each)."""
    failures = []
    for name in names:
        try:
            ctypes.CDLL(name, mode=os.RTLD_NOW)
        except OSError as exc:
            failures.append(load_failure(name, str(exc)))
            continue
        return name, failures
    return None, failures


def check_libkrun() -> Check:
    """libkrun loads through ctypes (``$AGENTBOX_LIBKRUN_LIBRARY``, else libkrun.so.1 then libkrun.so)."""
    explicit = os.environ.get(LIBKRUN_ENV)
    names = [explicit] if explicit else list(LIBKRUN_SONAMES)
    name, failures = first_loadable(names)
    if name is not None:
        what = " (the project's QEMU-backed stand-in, not libkrun)" if is_standin(ctypes.CDLL(name)) else ""
        return Check("libkrun", True, "ok",
                     f"{name} loads" + (f" (from ${LIBKRUN_ENV})" if explicit else "") + what)
    source = f" (from ${LIBKRUN_ENV})" if explicit else f" (${LIBKRUN_ENV} not set)"
    status = "unusable" if any(" load error: " in f for f in failures) else "missing"
    return Check("libkrun", False, status, "; ".join(failures) + source, LIBKRUN_FIX)


def choose_vmm(requested: str) -> str:
    """``requested`` when it names a VMM (``qemu``, ``libkrun``); otherwise (``auto``) ``libkrun``
    when it loads and ``/dev/kvm`` answers, else ``qemu``."""
    if requested in VMMS:
        return requested
    return "libkrun" if check_libkrun().ok and check_kvm_device().ok else "qemu"
