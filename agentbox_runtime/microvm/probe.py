"""The krun-direct probe boot: one real guest through the helper and libkrun, cached.

It boots the guest image through ``__agentbox_microvm_enter`` with the command
``sh -c 'exit 7'`` and passes only when the helper exits 7: the library
loaded, the guest booted its root, ran the command through guest-init, and the
exit status came back. The verdict is cached per library file
(:mod:`agentbox_runtime.vmm.boot_verdicts`), so the boot happens once per library.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.microvm.task import MicrovmOptions, MicrovmTask
from agentbox_runtime.state import StateLayout
from agentbox_runtime.vmm import boot_verdicts
from agentbox_runtime.vmm.boot_verdicts import Verdict
from agentbox_runtime.vmm.host import tail

BACKEND = boot_verdicts.KRUN_DIRECT
PROBE_STATUS = 7
PROBE_TIMEOUT_S = 600.0


def probe(image: str, *, image_cache: Path | None = None, timeout: float = PROBE_TIMEOUT_S) -> Verdict:
    """The cached verdict, or boot ``image`` once through libkrun to get one."""
    key = boot_verdicts.krun_direct_key()
    if key is None:
        return Verdict(BACKEND, "", False, "libkrun does not load", 0.0)
    known = boot_verdicts.read(BACKEND, key)
    if known is not None:
        return known
    with tempfile.TemporaryDirectory(prefix="agentbox-krun-probe-") as tmp:
        ws = Path(tmp) / "workspace"
        ws.mkdir()
        layout = StateLayout.under(Path(tmp) / "state", ws)
        shared_cache = image_cache or StateLayout.resolve(ws).microvm_image_dir  # the user's image cache
        opts = MicrovmOptions(workspace=ws, image=image, vmm="libkrun", command=("sh", "-c", f"exit {PROBE_STATUS}"),
                              interactive=False, state=layout, image_cache=shared_cache, memory_mib=1024, cpus=1)
        task = MicrovmTask(opts)
        try:
            task.start()
            status = task.wait(timeout)
            ok, detail = status == PROBE_STATUS, f"guest command 'exit {PROBE_STATUS}' returned {status}"
        except (AgentboxError, OSError, RuntimeError) as exc:
            ok, detail = False, f"boot failed: {exc}"
        if not ok and task.handle is not None:
            detail += f"; console: {' | '.join(tail(task.task_dir / 'console.log', 5).splitlines())}"
        with contextlib.suppress(AgentboxError):
            task.close()
    return boot_verdicts.record(BACKEND, key, ok, detail)
