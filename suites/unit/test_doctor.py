"""Doctor parsing helpers and the backend decision table."""

from runtime.doctor import Check, cgroup_layout, crun_has_krun, qemu_accelerators, usable_backends


def test_crun_version_text() -> None:
    assert crun_has_krun("crun version 1.14\ncommit: x\n+SYSTEMD +SELINUX +LIBKRUN +WASM:wasmedge")
    assert not crun_has_krun("crun version 1.8.1\ncommit: x\n+SYSTEMD +SELINUX +APPARMOR +CAP +SECCOMP")


def test_qemu_accel_help() -> None:
    assert qemu_accelerators("Accelerators supported in QEMU binary:\ntcg\nkvm\n") == ["tcg", "kvm"]


def test_cgroup_layouts() -> None:
    v1 = "30 25 0:26 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    v2 = "31 25 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert cgroup_layout(v2) == "v2"
    assert cgroup_layout(v1 + v2) == "hybrid"
    assert cgroup_layout(v1) == "v1"
    assert cgroup_layout("") == "none"


def _checks(**bad: str) -> list[Check]:
    names = ["podman", "crun-krun", "libkrunfw", "kvm-device", "libkrun", "buildah", "qemu", "fuse-overlayfs"]
    return [Check(n, n not in bad, "missing" if n in bad else "ok", bad.get(n, "fine"), "get it")
            for n in names]


def test_backend_table_names_what_is_missing() -> None:
    table = usable_backends(_checks())
    assert all(ok for ok, _ in table.values())
    table = usable_backends(_checks(**{"libkrun": "libkrun.so.1 not found", "crun-krun": "no +LIBKRUN"}))
    assert table["krun-direct"] == (False, "libkrun: libkrun.so.1 not found (fix: get it)")
    assert table["krun-podman"][0] is False and "no +LIBKRUN" in table["krun-podman"][1]
    assert table["qemu"] == (True, "usable") and table["container"] == (True, "usable")
