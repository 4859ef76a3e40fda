"""Does KVM actually boot this kernel? (cached probe boot)

``/dev/kvm`` opening is not enough: on paravirtual nested hosts a stock
kernel hangs at boot under ``-accel kvm``. The probe boots the kernel and
the initramfs with ``agentbox.probe=1`` under KVM and waits for the
initramfs marker. The verdict is cached per (kernel sha256, qemu version).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from agentbox_runtime.hostcheck.check import Check
from agentbox_runtime.vmm.initramfs import PROBE_MARKER
from agentbox_runtime.vmm.host import cache_dir, die_with_parent, qemu_binary, tail_bytes
from agentbox_runtime.vmm import shutdown

PROBE_TIMEOUT_S = 20.0
PVM_MODULE = Path("/sys/module/kvm_pvm")
"""Present when the host's KVM is PVM (pagetable-based paravirtual nesting, as on Firecracker-hosted
machines): it runs only kernels built as PVM guests (``CONFIG_PVM_GUEST``), so a stock distribution
kernel never boots under it. Seen on this project's machines: ``-cpu host`` aborts in qemu (it cannot
set MSR 0x10a, IA32_ARCH_CAPABILITIES), and without that MSR the kernel stops before its first line."""


def _cache() -> Path:

    return cache_dir() / "kvm-probe"


def _qemu_version() -> str:

    try:
        return subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True,
                              timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


PROBE_VERSION = "2"
"""Part of the cache key: a verdict cached by an older probe (whose detail may not say why) is redone."""


def _key(kernel: Path) -> str:
    h = hashlib.sha256(kernel.read_bytes()).hexdigest()[:20]
    return f"{h}-{hashlib.sha256((PROBE_VERSION + _qemu_version()).encode()).hexdigest()[:12]}"


def pvm_host(module: Path = PVM_MODULE) -> bool:
    """True when the host's KVM is PVM (see :data:`PVM_MODULE`)."""
    return module.is_dir()


def why_not(detail: str, pvm: bool) -> str:
    """A failed probe's detail, naming PVM when the host has it (the likely reason)."""
    if not pvm:
        return detail
    return (f"{detail}; this host's KVM is PVM (kvm_pvm loaded), which runs only PVM-guest kernels "
            "(CONFIG_PVM_GUEST), so a stock kernel cannot use it")


def probe(kernel: Path, initrd: Path, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Boot once under KVM; (booted, detail)."""
    booted, detail = _boot(kernel, initrd, timeout)
    return booted, detail if booted else why_not(detail, pvm_host())


def _boot(kernel: Path, initrd: Path, timeout: float) -> tuple[bool, str]:

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "console.log"
        argv = [qemu_binary(), "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
                "-machine", "pc", "-accel", "kvm", "-cpu", "host", "-m", "256",
                "-kernel", str(kernel), "-initrd", str(initrd),
                "-append", "console=ttyS0 quiet loglevel=0 panic=-1 rdinit=/init agentbox.probe=1",
                "-serial", f"file:{log}"]
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=die_with_parent)  # never outlives a killed caller
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            shutdown.stop(proc, timeout=0)  # the one ladder: no guest to ask, SIGTERM then SIGKILL
            proc.communicate()
            return False, f"KVM boot did not reach the initramfs within {timeout:.0f}s (kernel hangs under KVM)"
        text = tail_bytes(log, 65536).decode(errors="replace")
        if PROBE_MARKER in text:
            return True, f"KVM booted the kernel to the initramfs in {time.monotonic() - started:.1f}s"
        said = " | ".join(err.decode(errors="replace").strip().splitlines())  # one doctor line
        return False, f"qemu -accel kvm exited {proc.returncode}: {said[-200:]}"


def kvm_boots(kernel: Path, initrd: Path) -> bool:
    """The cached verdict for ``kernel`` (probing once when unknown)."""
    if os.environ.get("AGENTBOX_QEMU_ACCEL") in ("kvm", "tcg"):
        return os.environ["AGENTBOX_QEMU_ACCEL"] == "kvm"
    cache = _cache()
    cache.mkdir(parents=True, exist_ok=True)
    entry = cache / f"{_key(kernel)}.json"
    if entry.exists():
        return bool(json.loads(entry.read_text())["kvm"])
    ok, detail = probe(kernel, initrd)
    entry.write_text(json.dumps({"kvm": ok, "detail": detail, "kernel": str(kernel)}))
    return ok


def probe_summary() -> Check:
    """The doctor's ``kvm-boot`` line: the latest cached verdict recorded so far."""
    cache = _cache()
    entries = sorted(cache.glob("*.json")) if cache.is_dir() else []
    if not entries:
        return Check("kvm-boot", False, "info",
                     "not probed yet (the first qemu boot probes KVM with the guest kernel)")
    data = json.loads(entries[-1].read_text())
    return Check("kvm-boot", bool(data["kvm"]), "ok" if data["kvm"] else "info",
                 f"{'KVM' if data['kvm'] else 'TCG'}: {data['detail']}",
                 "" if data["kvm"] else "guests boot with TCG (slower); timeouts are scaled")
