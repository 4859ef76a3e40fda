"""Where a boot's time goes, from the guest's own monotonic stamps on the kernel console.

The initramfs and PID 1 write ``agentbox-phase NAME UPTIME`` lines
(:data:`agentbox_guest_init.contract.PHASE_MARK`); the agent reports its uptime when it
first answers. :func:`durations` turns them into seconds per phase:

- ``kernel_s``: kernel start to the initramfs running (decompression, early boot);
- ``modules_s``: loading the initramfs's kernel modules;
- ``root_s``: mounting the task root;
- ``init_s``: switch_root to PID 1 of the root running (mounts done);
- ``command_s``: PID 1 to the guest command answering (``enter``: identity, home,
  mounts, privilege drop, and the agent's start).

Firmware and VMM start-up are the wall time before the kernel's clock began:
``boot_s - ready uptime`` as the harness measures it.
"""

from __future__ import annotations

from agentbox_guest_init.contract import PHASE_MARK

ORDER = ("kernel", "modules", "root", "init")


def stamps(console: str) -> dict[str, float]:
    """Phase name -> guest uptime of its last stamp in ``console`` text."""
    found: dict[str, float] = {}
    for line in console.splitlines():
        at = line.find(PHASE_MARK + " ")
        if at < 0:
            continue
        parts = line[at + len(PHASE_MARK) + 1:].split()
        if len(parts) >= 2:
            try:
                found[parts[0]] = float(parts[1])
            except ValueError:
                continue
    return found


def durations(console: str, ready_uptime: float | None) -> dict[str, float]:
    """Seconds per phase (only the phases whose stamps were seen, in boot order)."""
    seen = stamps(console)
    out: dict[str, float] = {}
    previous = 0.0
    for name in ORDER:
        if name in seen:
            out[f"{name}_s"] = round(seen[name] - previous, 3)
            previous = seen[name]
    if ready_uptime is not None and seen:
        out["command_s"] = round(ready_uptime - previous, 3)
        out["guest_ready_uptime_s"] = round(ready_uptime, 3)
    return out
