"""Device probes: whether ``/dev/kvm`` is there and answers."""

from __future__ import annotations

import fcntl
import os

from agentbox_runtime.hostcheck.check import Check

KVM_GET_API_VERSION = 0xAE00


def check_kvm_device() -> Check:
    """/dev/kvm exists, opens read-write and answers KVM_GET_API_VERSION."""
    path = "/dev/kvm"
    if not os.path.exists(path):
        return Check("kvm-device", False, "missing", "/dev/kvm does not exist",
                     "enable VT-x/AMD-V (or nested virtualization) and modprobe kvm_intel or kvm_amd")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Check("kvm-device", False, "unusable", f"cannot open /dev/kvm read-write: {exc.strerror}",
                     "usermod -aG kvm $USER (then log in again)")
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return Check("kvm-device", False, "unusable", f"KVM_GET_API_VERSION failed: {exc.strerror}",
                     "the kvm module is broken on this host; reload kvm_intel/kvm_amd")
    finally:
        os.close(fd)
    return Check("kvm-device", True, "ok", f"/dev/kvm opens read-write, KVM API version {version}")
