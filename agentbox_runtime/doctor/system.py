"""The doctor's kernel and device lines: the KVM boot verdict, libkrunfw, tun, user namespaces, id maps,
cgroups, disk (``/dev/kvm`` and libkrun are probed in :mod:`~agentbox_runtime.hostcheck.devices` and
:mod:`~agentbox_runtime.vmm.choice`)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
from pathlib import Path

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.hostcheck.check import Check
from agentbox_runtime.hostcheck.parsers import can_read_write, cgroup_layout, cgroup_meaning, subid_ranges
from agentbox_runtime.state import state_base
from agentbox_runtime.vmm import boot_verdicts, kvm_probe, share_filter
from agentbox_runtime.vmm.choice import LIBKRUN_ENV, first_loadable

MIN_FREE_BYTES = 20 << 30
LIBKRUNFW_SONAMES = ("libkrunfw.so.5", "libkrunfw.so.4", "libkrunfw.so")


def invoking_user() -> tuple[str, int, set[int]]:
    """(name, uid, group ids) of the user running this process (what agentbox itself runs as)."""
    uid = os.geteuid()
    try:
        entry = pwd.getpwuid(uid)
        return entry.pw_name, uid, set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except KeyError:
        return str(uid), uid, {os.getegid(), *os.getgroups()}


def check_kvm_boot(probe: bool = True) -> Check:
    """Whether KVM really boots the guest kernel (the qemu backend's cached probe verdict)."""
    if not probe:
        return Check("kvm-boot", False, "info", "not probed (--no-probe)")
    return kvm_probe.probe_summary()


def check_krun_direct_boot() -> Check:
    """Whether a probe boot through the libkrun that loads now passed (the cached verdict)."""
    key = boot_verdicts.krun_direct_key()
    if key is None:
        return Check("krun-direct-boot", False, "info", "not probed: libkrun does not load (see the libkrun line)")
    verdict = boot_verdicts.read(boot_verdicts.KRUN_DIRECT, key)
    if verdict is None:
        return Check("krun-direct-boot", False, "info", "libkrun loads but has not booted a guest here yet",
                     "agentbox doctor probes it when the guest image exists (agentbox image build)")
    return Check("krun-direct-boot", verdict.ok, "ok" if verdict.ok else "unusable", verdict.describe(),
                 "" if verdict.ok else "see the detail; delete ~/.cache/agentbox/boot-probes to probe again")


def check_libkrunfw() -> Check:
    """libkrunfw (the guest kernel libkrun loads) by soname or next to ``$AGENTBOX_LIBKRUN_LIBRARY``."""
    names = list(LIBKRUNFW_SONAMES)
    explicit = os.environ.get(LIBKRUN_ENV)
    if explicit:
        names = sorted(glob.glob(os.path.join(os.path.dirname(explicit), "libkrunfw.so*"))) + names
    name, failures = first_loadable(names)
    if name is not None:
        return Check("libkrunfw", True, "ok", f"{name} loads")
    return Check("libkrunfw", False, "missing", "; ".join(failures[-len(LIBKRUNFW_SONAMES):]),
                 "no Debian 12 package: build libkrunfw from source (github.com/containers/libkrunfw) "
                 "or with Nix (nix build .#libkrunfw), next to libkrun.so")


def check_tun() -> Check:
    """/dev/net/tun exists and the invoking user may open it read-write (passt, slirp4netns)."""
    path = "/dev/net/tun"
    if not os.path.exists(path):
        return Check("net-tun", False, "missing", "/dev/net/tun does not exist", "modprobe tun")
    st = os.stat(path)
    name, uid, gids = invoking_user()
    detail = f"/dev/net/tun mode {st.st_mode & 0o777:04o}"
    if not can_read_write(st.st_mode, st.st_uid, st.st_gid, uid, gids):
        return Check("net-tun", False, "unusable", f"{detail}: not readable and writable by {name}",
                     "chmod 0666 /dev/net/tun (Debian's default; rootless networking needs it)")
    return Check("net-tun", True, "ok", f"{detail}, usable by {name}")


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def check_userns() -> Check:
    """User namespaces: max_user_namespaces and the Debian/Ubuntu unprivileged switches."""
    limit = _read_int("/proc/sys/user/max_user_namespaces")
    if limit is None:
        return Check("user-namespaces", False, "missing", "the kernel exposes no user namespace support",
                     "use a kernel built with CONFIG_USER_NS")
    if limit == 0:
        return Check("user-namespaces", False, "unusable", "max_user_namespaces=0",
                     "sysctl -w user.max_user_namespaces=28633")
    detail = [f"max_user_namespaces={limit}"]
    clone = _read_int("/proc/sys/kernel/unprivileged_userns_clone")
    detail.append("unprivileged_userns_clone=" + ("absent (not restricted)" if clone is None else str(clone)))
    apparmor = _read_int("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    if apparmor:
        detail.append("apparmor_restrict_unprivileged_userns=1")
    if os.geteuid() != 0 and (clone == 0 or apparmor):
        return Check("user-namespaces", False, "unusable",
                     "; ".join(detail) + ": unprivileged user namespaces are disabled",
                     "sysctl -w kernel.unprivileged_userns_clone=1 "
                     "(Ubuntu: kernel.apparmor_restrict_unprivileged_userns=0)")
    return Check("user-namespaces", True, "ok", "; ".join(detail))


def check_idmap() -> Check:
    """newuidmap/newgidmap and /etc/subuid, /etc/subgid entries for the invoking user (rootless only)."""
    absent = [t for t in ("newuidmap", "newgidmap") if shutil.which(t) is None]
    if absent:
        return Check("idmap", False, "missing", f"{', '.join(absent)} not on PATH", "apt-get install uidmap")
    name, uid, _ = invoking_user()
    counts = {}
    for kind in ("subuid", "subgid"):
        try:
            text = Path(f"/etc/{kind}").read_text()
        except OSError:
            text = ""
        counts[kind] = sum(n for _, n in subid_ranges(text, name, uid))
    detail = (f"newuidmap/newgidmap present; {name}: {counts['subuid']} subuids, "
              f"{counts['subgid']} subgids")
    if uid == 0:
        return Check("idmap", True, "ok", f"{detail} (root needs none)")
    short = [k for k, n in counts.items() if n < 65536]
    if short:
        return Check("idmap", False, "unusable", f"{detail}: fewer than 65536 in /etc/{' and /etc/'.join(short)}",
                     f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name}")
    return Check("idmap", True, "ok", detail)


def check_share_filter() -> Check:
    """The seccomp filter the VMM runs under (libseccomp): no setuid/setgid bit, device node or
    xattr from a guest reaches a host share. Also says how the workspace is id-mapped."""
    ok, why = share_filter.available()
    if not ok:
        return Check("share-filter", False, "missing", why, "apt-get install libseccomp2")
    mapping = ("as root, the workspace is an id-mapped mount: its owner is the guest's dev user"
               if os.geteuid() == 0 else "not root: workspace files keep their host owners in the guest")
    return Check("share-filter", True, "ok", f"{why}; {mapping}")


def check_cgroups() -> Check:
    """The cgroup layout (v1, hybrid, v2) and what it means for crun; ok only for v2."""
    try:
        layout = cgroup_layout(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return Check("cgroups", False, "info", "cannot read /proc/self/mountinfo")
    ok = layout == "v2"
    return Check("cgroups", ok, "ok" if ok else "info", f"cgroup layout {layout}: {cgroup_meaning(layout)}",
                 "" if ok else "boot with systemd.unified_cgroup_hierarchy=1 for crun (and krun); runc works here")


def check_disk(path: Path | None = None) -> Check:
    """Free space at the state root (``<state base>/agentbox``); a warning under 20 GiB."""
    if path is None:
        try:
            path = state_base() / "agentbox"
        except AgentboxError as exc:
            return Check("disk-space", False, "unusable", f"no state root: {exc}", "set HOME or XDG_STATE_HOME")
    target = path
    while not target.exists() and target != target.parent:
        target = target.parent
    free = shutil.disk_usage(target).free
    detail = f"{free / (1 << 30):.1f} GiB free at {path}" + ("" if target == path else f" (on {target})")
    if free < MIN_FREE_BYTES:
        return Check("disk-space", False, "info", f"{detail}: under 20 GiB",
                     "free at least 20 GiB there for the image cache, raw disks and task rootfs copies")
    return Check("disk-space", True, "ok", detail)
