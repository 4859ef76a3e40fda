"""Whether crun can run krun-podman tasks itself (its libkrun handler), and how to select the
QEMU-backed runtime when it cannot."""

from __future__ import annotations

import shutil

from agentbox_runtime.hostcheck.check import Check, run_tool
from agentbox_runtime.hostcheck.parsers import crun_has_krun

SELECT_QEMU_RUNTIME = '--krun-runtime qemu (AGENTBOX_KRUN_RUNTIME=qemu, [libkrun] runtime = "qemu")'
"""How to select the QEMU-backed krun runtime, for fix texts and error lines."""


def check_crun_krun() -> Check:
    """Whether crun has the libkrun handler (``crun --version`` lists ``+LIBKRUN``)."""
    if shutil.which("crun") is None:
        return Check("crun-krun", False, "missing", "crun not on PATH",
                     "apt-get install crun (Debian's crun has no libkrun handler; see below), or select "
                     f"the QEMU-backed runtime (see krun-runtime) with {SELECT_QEMU_RUNTIME}")
    rc, out = run_tool(["crun", "--version"])
    version = out.splitlines()[0] if out else f"crun --version exited {rc}"
    if crun_has_krun(out):
        return Check("crun-krun", True, "ok", f"{version} lists +LIBKRUN")
    return Check("crun-krun", False, "unusable",
                 f"{version} was built without libkrun ('crun --version' does not list +LIBKRUN)",
                 "install a crun built with libkrun (no Debian 12 package: build crun with "
                 "--with-libkrun, or Nix .#crun of the agentbox flake), or select the QEMU-backed "
                 f"runtime (see krun-runtime) with {SELECT_QEMU_RUNTIME}")
