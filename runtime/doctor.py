"""Host capability checks behind ``agentbox doctor`` and the harness's capability skips.

Each check is a small function returning a frozen :class:`Check`; a missing
tool is a result, never an exception, and every subprocess has a short
timeout. :func:`usable_backends` turns the checks into a verdict per backend
with a reason that names exactly what is missing and how to get it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

TIMEOUT_S = 15.0
KVM_GET_API_VERSION = 0xAE00
MIN_FREE_BYTES = 20 << 30


@dataclass(frozen=True)
class Check:
    """One line of the doctor report."""

    name: str
    ok: bool
    status: str  # ok | missing | unusable | info
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _run(argv: list[str]) -> tuple[int, str]:
    """(exit status, stdout+stderr); 127 when the tool is missing, 124 on timeout."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S,
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        return 127, ""
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {TIMEOUT_S:.0f}s"
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _tool(name: str, binary: str, version_args: list[str], package: str) -> Check:
    if shutil.which(binary) is None:
        return Check(name, False, "missing", f"{binary} not on PATH", f"apt-get install {package}")
    rc, out = _run([binary, *version_args])
    first = out.splitlines()[0] if out else ""
    if rc != 0:
        return Check(name, False, "unusable", f"{binary} {' '.join(version_args)} exited {rc}: {first}",
                     f"reinstall {package}")
    return Check(name, True, "ok", first)


def crun_has_krun(version_text: str) -> bool:
    """Whether ``crun --version`` output lists the libkrun handler."""
    return "+LIBKRUN" in version_text


def qemu_accelerators(help_text: str) -> list[str]:
    """Accelerator names from ``qemu-system-* -accel help`` output."""
    return [line.strip() for line in help_text.splitlines()[1:] if re.fullmatch(r"\s*\w+\s*", line)]


def cgroup_layout(mountinfo: str) -> str:
    """``v2`` (unified), ``hybrid`` (v1 controllers plus a v2 mount) or ``v1``."""
    fstypes = {line.split(" - ")[1].split()[0] for line in mountinfo.splitlines() if " - " in line}
    if "cgroup2" in fstypes and "cgroup" not in fstypes:
        return "v2"
    if "cgroup2" in fstypes:
        return "hybrid"
    return "v1" if "cgroup" in fstypes else "none"


def check_podman() -> Check:
    base = _tool("podman", "podman", ["--version"], "podman")
    if not base.ok:
        return base
    rc, out = _run(["podman", "info", "--format",
                    "rootless={{.Host.Security.Rootless}} runtime={{.Host.OCIRuntime.Name}}"])
    detail = f"{base.detail}; {out}" if rc == 0 else f"{base.detail}; podman info failed: {out[-200:]}"
    return Check("podman", rc == 0, "ok" if rc == 0 else "unusable", detail,
                 "" if rc == 0 else "see 'podman info' for the cause")


def check_crun_krun() -> Check:
    if shutil.which("crun") is None:
        return Check("crun-krun", False, "missing", "crun not on PATH",
                     "apt-get install crun (and build it with libkrun for krun-podman)")
    rc, out = _run(["crun", "--version"])
    if crun_has_krun(out):
        return Check("crun-krun", True, "ok", "crun lists +LIBKRUN")
    return Check("crun-krun", False, "unusable",
                 "crun was built without libkrun ('crun --version' does not list +LIBKRUN)",
                 "install a crun built with libkrun and libkrunfw (Nix: .#crun of the agentbox flake)")


def check_qemu() -> Check:
    binary = f"qemu-system-{os.uname().machine}"
    base = _tool("qemu", binary, ["--version"], "qemu-system-x86")
    if not base.ok:
        return base
    _, out = _run([binary, "-accel", "help"])
    return Check("qemu", True, "ok", f"{base.detail}; accelerators: {', '.join(qemu_accelerators(out))}")


def check_kvm_device() -> Check:
    path = "/dev/kvm"
    if not os.path.exists(path):
        return Check("kvm-device", False, "missing", "/dev/kvm does not exist",
                     "enable virtualization (VT-x/AMD-V or nested KVM) and load kvm_intel/kvm_amd")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Check("kvm-device", False, "unusable", f"cannot open /dev/kvm read-write: {exc.strerror}",
                     "add the user to the kvm group (usermod -aG kvm $USER)")
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return Check("kvm-device", False, "unusable", f"KVM_GET_API_VERSION failed: {exc}", "")
    finally:
        os.close(fd)
    return Check("kvm-device", True, "ok", f"/dev/kvm opens read-write, API version {version}")


def check_kvm_boot() -> Check:
    """Whether KVM boots the guest kernel (probe result, cached), when the qemu backend has one."""
    try:
        from runtime.vmm import kvm_probe  # type: ignore[attr-defined]
    except ImportError:
        return Check("kvm-boot", False, "info", "not probed (this build has no KVM boot probe)")
    return kvm_probe.probe_summary()  # type: ignore[no-any-return]


def check_libkrun() -> Check:
    explicit = os.environ.get("AGENTBOX_LIBKRUN_LIBRARY")
    names = [explicit] if explicit else ["libkrun.so.1", "libkrun.so"]
    errors = []
    for name in names:
        try:
            ctypes.CDLL(name, mode=os.RTLD_NOW)
            return Check("libkrun", True, "ok", f"{name} loads")
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    return Check("libkrun", False, "missing", "; ".join(errors),
                 "no Debian 12 package: build libkrun and libkrunfw from source or with Nix "
                 "(.#libkrun), then set AGENTBOX_LIBKRUN_LIBRARY=/path/libkrun.so.1")


def check_libkrunfw() -> Check:
    found = ctypes.util.find_library("krunfw")
    try:
        ctypes.CDLL("libkrunfw.so.4", mode=os.RTLD_NOW)
        return Check("libkrunfw", True, "ok", "libkrunfw.so.4 loads")
    except OSError:
        pass
    if found:
        return Check("libkrunfw", True, "ok", f"{found} found")
    return Check("libkrunfw", False, "missing", "libkrunfw not found by the loader",
                 "build libkrunfw from source or with Nix (.#libkrunfw)")


def check_tun() -> Check:
    path = "/dev/net/tun"
    if not os.path.exists(path):
        return Check("net-tun", False, "missing", "/dev/net/tun does not exist", "modprobe tun")
    if not os.access(path, os.R_OK | os.W_OK):
        return Check("net-tun", False, "unusable", "/dev/net/tun is not readable/writable by this user",
                     "chmod 0666 /dev/net/tun (rootless networking needs it)")
    mode = os.stat(path).st_mode & 0o777
    return Check("net-tun", True, "ok", f"/dev/net/tun mode {mode:04o}")


def check_fuse() -> Check:
    if shutil.which("fuse-overlayfs") is None:
        return Check("fuse-overlayfs", False, "missing", "fuse-overlayfs not on PATH",
                     "apt-get install fuse-overlayfs")
    if not os.path.exists("/dev/fuse"):
        return Check("fuse-overlayfs", False, "unusable", "/dev/fuse does not exist", "modprobe fuse")
    usable = os.access("/dev/fuse", os.R_OK | os.W_OK)
    return Check("fuse-overlayfs", usable, "ok" if usable else "unusable",
                 "fuse-overlayfs present, /dev/fuse " + ("usable" if usable else "not accessible"),
                 "" if usable else "make /dev/fuse readable and writable for this user")


def check_userns() -> Check:
    try:
        limit = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        return Check("user-namespaces", False, "missing", "kernel exposes no user namespace support",
                     "use a kernel with CONFIG_USER_NS")
    ok = limit > 0
    return Check("user-namespaces", ok, "ok" if ok else "unusable", f"max_user_namespaces={limit}",
                 "" if ok else "sysctl -w user.max_user_namespaces=28633")


def check_idmap() -> Check:
    user = os.environ.get("USER") or ("root" if os.geteuid() == 0 else str(os.geteuid()))
    tools = [t for t in ("newuidmap", "newgidmap") if shutil.which(t) is None]
    if tools:
        return Check("idmap", False, "missing", f"{', '.join(tools)} not on PATH", "apt-get install uidmap")
    try:
        has = any(line.startswith(f"{user}:") for line in Path("/etc/subuid").read_text().splitlines())
    except OSError:
        has = False
    detail = f"newuidmap/newgidmap present; /etc/subuid {'has' if has else 'lacks'} {user}"
    needed = os.geteuid() != 0
    return Check("idmap", has or not needed, "ok" if has or not needed else "unusable", detail,
                 "" if has or not needed else f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}")


def check_cgroups() -> Check:
    try:
        layout = cgroup_layout(Path("/proc/self/mountinfo").read_text())
    except OSError:
        layout = "unknown"
    note = {"hybrid": "crun refuses this layout; the harness runs containers with runc",
            "v1": "crun may refuse cgroup v1; the harness runs containers with runc"}.get(layout, "")
    return Check("cgroups", True, "info", f"cgroup layout {layout}" + (f" ({note})" if note else ""))


def check_disk(path: Path | None = None) -> Check:
    target = path or Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    while not target.exists() and target != target.parent:
        target = target.parent
    free = shutil.disk_usage(target).free
    ok = free >= MIN_FREE_BYTES
    return Check("disk-space", ok, "ok" if ok else "unusable", f"{free / (1 << 30):.1f} GiB free at {target}",
                 "" if ok else "free at least 20 GiB for images, raw disks and task rootfs copies")


def check_image() -> Check:
    rc, _ = _run(["podman", "image", "exists", "localhost/agentbox:latest"])
    if rc == 0:
        return Check("guest-image", True, "ok", "localhost/agentbox:latest present")
    return Check("guest-image", False, "missing", "localhost/agentbox:latest not built",
                 "agentbox image build")


CHECKS: tuple[Callable[[], Check], ...] = (
    check_podman, lambda: _tool("buildah", "buildah", ["--version"], "buildah"),
    check_crun_krun, lambda: _tool("runc", "runc", ["--version"], "runc"),
    lambda: _tool("btrfs-progs", "mkfs.btrfs", ["--version"], "btrfs-progs"),
    lambda: _tool("blkid", "blkid", ["--version"], "util-linux"),
    check_fuse, check_qemu, check_kvm_device, check_libkrun, check_libkrunfw, check_tun,
    check_userns, check_idmap, check_cgroups, check_disk, check_image,
)


def run_checks(*, probe_kvm: bool = False) -> list[Check]:
    """Every check, in report order; the KVM boot probe only when asked."""
    checks = [fn() for fn in CHECKS]
    if probe_kvm:
        checks.insert(9, check_kvm_boot())
    return checks


def usable_backends(checks: list[Check]) -> dict[str, tuple[bool, str]]:
    """Per backend: (usable, reason naming what is missing and how to get it)."""
    by = {c.name: c for c in checks}

    def need(*names: str) -> tuple[bool, str]:
        missing = [by[n] for n in names if n in by and not by[n].ok]
        if not missing:
            return True, "usable"
        return False, "; ".join(f"{c.name}: {c.detail} (fix: {c.fix})" if c.fix else f"{c.name}: {c.detail}"
                                for c in missing)

    return {
        "krun-podman": need("podman", "crun-krun", "libkrunfw", "kvm-device"),
        "krun-direct": need("libkrun", "libkrunfw", "kvm-device", "buildah"),
        "qemu": need("qemu", "buildah"),
        "container": need("podman", "fuse-overlayfs"),
    }


def render_text(checks: list[Check]) -> str:
    """The human report: one row per check, fix lines under failures, then backends."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.status:<8}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"{'':<{width}}  {'':<8}  fix: {c.fix}")
    lines.append("")
    lines.append("backends:")
    for name, (ok, why) in usable_backends(checks).items():
        lines.append(f"  {name:<12} {'usable' if ok else 'unavailable: ' + why}")
    return "\n".join(lines)
