"""Doctor parsing helpers, file-system checks on a fake /proc and the backend decision table."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from agentbox_runtime.doctor import (BACKENDS, CHECKS, KRUN_PODMAN_QEMU, Check, check_by_name, krun_podman_runtime, render_text,
                            usable_backends)
from agentbox_runtime.doctor.system import check_cgroups, check_disk
from agentbox_runtime.hostcheck.check import run_tool, version_line
from agentbox_runtime.hostcheck.parsers import (can_read_write, cgroup_layout, crun_has_krun, load_failure,
                                                podman_summary, qemu_accelerators, subid_ranges)
from agentbox_runtime.vmm.choice import check_libkrun

CRUN_PLAIN = """crun version 1.8.1
commit: f8a096be060b22ccd3d5f3ebe44108517fbf6c30
rundir: /run/crun
spec: 1.0.0
+SYSTEMD +SELINUX +APPARMOR +CAP +SECCOMP +EBPF +YAJL
"""
CRUN_KRUN = CRUN_PLAIN.replace("+YAJL", "+CRIU +LIBKRUN +WASM:wasmedge +YAJL")

V1 = "".join(f"{30 + i} 31 0:{26 + i} / /sys/fs/cgroup/{c} rw,relatime - cgroup cgroup rw,{c}\n"
             for i, c in enumerate(("cpu", "memory", "pids")))
V2 = "41 31 0:38 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
UNIFIED = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
ROOT = "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"


def test_crun_version_with_and_without_libkrun() -> None:
    assert crun_has_krun(CRUN_KRUN)
    assert not crun_has_krun(CRUN_PLAIN)
    assert not crun_has_krun("crun version 1.8.1\n+LIBKRUNFW_ONLY")


def test_qemu_accel_help() -> None:
    out = "Accelerators supported in QEMU binary:\ntcg\nkvm\n"
    assert qemu_accelerators(out) == ["tcg", "kvm"]
    assert qemu_accelerators("Accelerators supported in QEMU binary:\ntcg\n") == ["tcg"]
    assert qemu_accelerators("") == []


def test_cgroup_layout_from_mountinfo_text() -> None:
    assert cgroup_layout(ROOT + V2) == "v2"
    assert cgroup_layout(ROOT + V1 + UNIFIED) == "hybrid"
    assert cgroup_layout(ROOT + V1) == "v1"
    assert cgroup_layout(ROOT) == "none"


@pytest.mark.parametrize(("mountinfo", "ok", "layout"), [
    (ROOT + V2, True, "v2"), (ROOT + V1 + UNIFIED, False, "hybrid"), (ROOT + V1, False, "v1")])
def test_cgroup_check_reads_proc_self_mountinfo(fs: FakeFilesystem, mountinfo: str, ok: bool,
                                                layout: str) -> None:
    fs.create_file("/proc/self/mountinfo", contents=mountinfo)
    check = check_cgroups()
    assert (check.name, check.ok) == ("cgroups", ok)
    assert check.detail.startswith(f"cgroup layout {layout}:")
    if layout == "hybrid":
        assert "runc" in check.detail and "cgroups in hybrid mode not supported" in check.detail
    assert check.status == ("ok" if ok else "info") and (ok or check.fix)


def test_cgroup_check_without_proc(fs: FakeFilesystem) -> None:
    assert check_cgroups() == Check("cgroups", False, "info", "cannot read /proc/self/mountinfo")


def test_disk_space_warns_under_20_gib(fs: FakeFilesystem) -> None:
    fs.create_dir("/state")
    fs.set_disk_usage(10 << 30)
    low = check_disk(Path("/state/agentbox"))
    assert (low.ok, low.status) == (False, "info")
    assert "under 20 GiB" in low.detail and "/state/agentbox" in low.detail and low.fix
    fs.set_disk_usage(100 << 30)
    assert check_disk(Path("/state")).ok


def test_podman_info_summary() -> None:
    info = ('{"host": {"security": {"rootless": false}, "ociRuntime": {"name": "crun"},'
            ' "cgroupVersion": "v1", "cgroupManager": "cgroupfs"}}')
    assert podman_summary(info) == "rootless=false runtime=crun cgroups=v1 manager=cgroupfs"
    assert podman_summary("not json") == "podman info output not understood"


def test_load_failure_says_not_found_or_load_error() -> None:
    missing = "libkrun.so.1: cannot open shared object file: No such file or directory"
    assert load_failure("libkrun.so.1", missing) == "libkrun.so.1 not found by soname in the loader path"
    assert load_failure("/opt/libkrun.so", "/opt/libkrun.so: cannot open shared object file: x") == \
        "/opt/libkrun.so not found at that path"
    dep = "libkrunfw.so.4: cannot open shared object file: No such file or directory"
    assert load_failure("/opt/libkrun.so", dep) == f"/opt/libkrun.so load error: {dep}"


def test_libkrun_env_path_missing_and_unloadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTBOX_LIBKRUN_LIBRARY", str(tmp_path / "absent.so"))
    gone = check_libkrun()
    assert (gone.ok, gone.status) == (False, "missing")
    assert "absent.so not found at that path" in gone.detail and "AGENTBOX_LIBKRUN_LIBRARY" in gone.fix
    bogus = tmp_path / "libkrun.so.1"
    bogus.write_text("not an ELF file\n")
    monkeypatch.setenv("AGENTBOX_LIBKRUN_LIBRARY", str(bogus))
    broken = check_libkrun()
    assert (broken.ok, broken.status) == (False, "unusable")
    assert f"{bogus} load error:" in broken.detail and "(from $AGENTBOX_LIBKRUN_LIBRARY)" in broken.detail


def test_subid_ranges_by_name_or_uid() -> None:
    text = "dev:100000:65536\n1001:200000:65536\nother:300000:10\nbroken line\n"
    assert subid_ranges(text, "dev", 1000) == [(100000, 65536)]
    assert subid_ranges(text, "ci", 1001) == [(200000, 65536)]
    assert subid_ranges(text, "nobody", 65534) == []


def test_device_access_by_mode_bits() -> None:
    crw600 = stat.S_IFCHR | 0o600
    assert can_read_write(crw600, 0, 0, 0, {0})
    assert not can_read_write(crw600, 0, 0, 1000, {1000})
    assert can_read_write(stat.S_IFCHR | 0o660, 0, 108, 1000, {1000, 108})
    assert can_read_write(stat.S_IFCHR | 0o666, 0, 0, 1000, {1000})
    assert not can_read_write(stat.S_IFCHR | 0o644, 0, 0, 1000, {1000})


def test_version_line_prefers_the_named_binary() -> None:
    out = "fusermount3 version: 3.14.0\nfuse-overlayfs: version 1.10\nFUSE library version 3.14.0"
    assert version_line(out, "fuse-overlayfs") == "fuse-overlayfs: version 1.10"
    assert version_line("QEMU emulator version 7.2\nCopyright", "qemu-system-x86_64") == "QEMU emulator version 7.2"
    assert version_line("", "x") == ""


def _checks(**bad: str) -> list[Check]:
    names = sorted({n for needs in BACKENDS.values() for n in needs} | set(KRUN_PODMAN_QEMU))
    return [Check(n, n not in bad, "missing" if n in bad else "ok", bad.get(n, "fine"), f"get {n}")
            for n in names]


def test_backend_table_all_usable() -> None:
    assert usable_backends(_checks()) == {b: (True, "usable") for b in BACKENDS}


def test_backend_table_names_what_is_missing_and_how_to_get_it() -> None:
    table = usable_backends(_checks(libkrun="libkrun.so.1 not found", **{"crun-krun": "no +LIBKRUN"}))
    assert table["krun-direct"] == (False, "libkrun: libkrun.so.1 not found (fix: get libkrun)")
    assert table["krun-podman"] == (True, "usable through agentbox-krun-runtime (QEMU); crun lacks libkrun")
    assert table["qemu"] == (True, "usable") and table["container"] == (True, "usable")
    neither = usable_backends(_checks(**{"crun-krun": "no +LIBKRUN", "krun-runtime": "not installed"}))
    assert neither["krun-podman"] == (False, "crun-krun: no +LIBKRUN (fix: get crun-krun); or through "
                                             "agentbox-krun-runtime: krun-runtime: not installed (fix: get krun-runtime)")


def test_krun_podman_picks_crun_with_libkrun_first_then_the_qemu_backed_runtime() -> None:
    assert krun_podman_runtime(_checks()) == "crun"
    assert krun_podman_runtime(_checks(**{"crun-krun": "no +LIBKRUN"})) == "qemu"
    assert krun_podman_runtime(_checks(**{"crun-krun": "no +LIBKRUN", "qemu": "missing"})) is None


def test_backend_table_shared_needs() -> None:
    table = usable_backends(_checks(**{"kvm-device": "/dev/kvm does not exist", "fuse-overlayfs": "gone"}))
    assert table["krun-direct"][0]  # krun-direct: its probe boot decides
    assert table["krun-podman"] == (True, "usable through agentbox-krun-runtime (QEMU); crun lacks libkrun")
    assert table["qemu"] == (True, "usable")
    assert table["container"] == (False, "fuse-overlayfs: gone (fix: get fuse-overlayfs)")
    cgroups = usable_backends(_checks(cgroups="cgroup layout hybrid", **{"krun-runtime": "not installed"}))
    assert not cgroups["krun-podman"][0] and cgroups["container"][0]


def test_krun_direct_needs_a_passed_probe_boot_not_just_a_library_that_loads() -> None:
    table = usable_backends(_checks(**{"krun-direct-boot": "libkrun loads but has not booted a guest here yet"}))
    assert table["krun-direct"] == (False, "krun-direct-boot: libkrun loads but has not booted a guest here yet "
                                           "(fix: get krun-direct-boot)")
    assert table["qemu"] == (True, "usable")


def test_backend_needs_are_known_checks() -> None:
    assert {n for needs in BACKENDS.values() for n in needs} | set(KRUN_PODMAN_QEMU) <= set(CHECKS)


def test_check_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyError, match="unknown doctor check 'nope'; known: podman, "):
        check_by_name("nope")

    def broken() -> Check:
        raise RuntimeError("boom")

    monkeypatch.setitem(CHECKS, "broken", broken)
    assert check_by_name("broken") == Check("broken", False, "unusable", "check failed: RuntimeError: boom",
                                            "report this as an agentbox doctor bug")


def test_text_report_puts_fix_lines_under_failures() -> None:
    checks = [Check("podman", True, "ok", "podman version 4.3.1", "unused"),
              Check("libkrun", False, "missing", "libkrun.so.1 not found", "build it"),
              Check("kvm-boot", False, "info", "TCG: line one\nline two")]
    lines = render_text(checks).splitlines()
    assert lines[1].split() == ["podman", "ok", "podman", "version", "4.3.1"]
    assert lines[2].split()[:2] == ["libkrun", "missing"] and lines[3].strip() == "fix: build it"
    assert lines[4].endswith("TCG: line one | line two")
    assert "  krun-direct  unavailable: libkrun: libkrun.so.1 not found (fix: build it)" in lines


def test_rootless_needs_block_every_backend() -> None:
    table = usable_backends(_checks(idmap="dev: 0 subuids"))
    assert all(not ok and "idmap: dev: 0 subuids" in why for ok, why in table.values())


def test_run_tool_never_raises() -> None:
    assert run_tool(["sh", "-c", "echo out; echo err >&2"]) == (0, "out\nerr")
    assert run_tool(["sh", "-c", "echo out; echo err >&2"], stdout_only=True) == (0, "out")
    assert run_tool(["sh", "-c", "echo out; echo err >&2; exit 3"], stdout_only=True) == (3, "out\nerr")
    assert run_tool(["/nonexistent/agentbox-tool"]) == (127, "")
    assert run_tool(["sleep", "5"], timeout=0.2) == (124, "sleep timed out after 0.2s")
