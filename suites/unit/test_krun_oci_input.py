"""``agentbox-krun-runtime`` (the real console script, in a subprocess) on hostile input, without
booting anything: a ``config.json`` that is not a regular file, wrongly typed or out-of-range
``process.user`` ids, and container state under a ``--root`` another user could write. Each
answer is one line on stderr with a non-zero exit, never a traceback or a hang, and a pid read
from untrusted state is never signalled. Then crun's krun handler contract: ``/.krun_config.json``
written beneath the rootfs without following an image's link, ``krun.disk.*`` as the reference's
fork reads them, vCPUs and RAM as crun 1.27.1 picks them, the container's mount tree."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentbox_runtime.microvm.task_reaper import start_time
from agentbox_runtime.oci import krun_config as krun_config_file
from agentbox_runtime.oci import krun_disks, vm_config
from agentbox_runtime.oci.bundle import Bundle, load
from agentbox_runtime.oci.locate import runtime_path
from agentbox_runtime.oci.container_state import StateStore
from agentbox_runtime.oci.state_trust import UntrustedState

CLI_TIMEOUT_S = 120  # a bound on a hang, not a speed requirement


def runtime(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``agentbox-krun-runtime`` (pyproject's console script) with ``args``."""
    return subprocess.run([runtime_path(), *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (no traceback, nothing else)."""
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("agentbox-krun-runtime: ")
    return lines[0]


def krun_config(rootfs: Path, user: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    process: dict[str, Any] = {"args": ["/bin/true"], "cwd": "/", "user": user or {"uid": 0, "gid": 0}}
    return {"ociVersion": "1.0.2", "root": {"path": str(rootfs)}, "process": process,
            "annotations": {"run.oci.handler": "krun"}, **extra}


# -- finding 12: config.json ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "symlink", "device", "directory"])
def test_create_refuses_a_config_json_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    config = bundle / "config.json"
    if kind == "fifo":
        os.mkfifo(config)
        words = "it is a FIFO"
    elif kind == "symlink":  # out of the bundle, to a config that would otherwise load
        outside = tmp_path / "elsewhere.json"
        outside.write_text(json.dumps(krun_config(tmp_path / "no-rootfs")))
        config.symlink_to(outside)
        words = "it is a symlink"
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(config, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is
        words = "it is a character device"
    else:
        config.mkdir()
        words = "it is a directory"
    line = one_error_line(runtime("--root", str(tmp_path / "root"), "create", "--bundle", str(bundle), "c1"))
    assert f"refusing {config}: {words}; accepted: a regular file config.json of at most" in line
    assert not (tmp_path / "root" / "agentbox-krun" / "c1").exists()


def test_create_refuses_an_oversized_config_json(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with open(bundle / "config.json", "wb") as f:
        f.truncate((8 << 20) + 1)
    line = one_error_line(runtime("--root", str(tmp_path / "root"), "create", "--bundle", str(bundle), "c1"))
    assert "it is over 8388608 bytes" in line


@pytest.mark.parametrize(("field", "value"), [("uid", "abc"), ("gid", "abc"), ("uid", -1), ("gid", 1 << 32),
                                              ("uid", 4294967295), ("uid", 1.5), ("uid", True), ("gid", None)])
def test_create_refuses_a_non_numeric_or_out_of_range_user_id(tmp_path: Path, field: str, value: Any) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    user = {"uid": 1000, "gid": 1000, field: value}
    # the rootfs is missing on purpose: the id is refused before it is looked at
    (bundle / "config.json").write_text(json.dumps(krun_config(tmp_path / "no-rootfs", user)))
    line = one_error_line(runtime("--root", str(tmp_path / "root"), "create", "--bundle", str(bundle), "c1"))
    assert f"process.user.{field} " in line and "is not accepted; accepted: an integer from 0 to 4294967294" in line


@pytest.mark.parametrize(("extra", "words"), [
    ({"linux": 5}, "linux 5 is not accepted; accepted: a JSON object"),
    ({"mounts": "none"}, "mounts 'none' is not accepted; accepted: a JSON array"),
    ({"hostname": ["h"]}, "hostname ['h'] is not accepted; accepted: a JSON string"),
    ({"linux": {"namespaces": {"type": "network"}}}, "linux.namespaces"),
])
def test_create_refuses_a_wrongly_typed_field_with_one_line(tmp_path: Path, extra: dict[str, Any], words: str) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(krun_config(tmp_path / "no-rootfs", **extra)))
    line = one_error_line(runtime("--root", str(tmp_path / "root"), "create", "--bundle", str(bundle), "c1"))
    assert words in line


# -- finding 13: state under --root -----------------------------------------------------------------


@pytest.fixture()
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process of ours that a forged state names."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def write_state(root: Path, container_id: str, pid: int, pid_start: str | None) -> Path:
    """A state record as the runtime writes it, private at every level; returns state.json."""
    d = root / "agentbox-krun" / container_id
    d.mkdir(parents=True)
    for level in (root, root / "agentbox-krun", d):
        level.chmod(0o700)
    state = d / "state.json"
    state.write_text(json.dumps({"id": container_id, "pid": pid, "pid_start": pid_start, "bundle": "/b",
                                 "rootfs": "/b/rootfs", "annotations": {}, "created": ""}))
    state.chmod(0o600)
    return state


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another uid needs root")


UNTRUSTED = {
    "root-owned-by-another-uid": lambda root, state: (_needs_root(), os.chown(root, 12345, 12345)),
    "root-mode-0777": lambda root, state: root.chmod(0o777),
    "state-dir-mode-0755": lambda root, state: (root / "agentbox-krun").chmod(0o755),
    "container-dir-owned-by-another-uid": lambda root, state: (_needs_root(), os.chown(state.parent, 12345, 12345)),
    "state-json-owned-by-another-uid": lambda root, state: (_needs_root(), os.chown(state, 12345, 12345)),
    "state-json-group-writable": lambda root, state: state.chmod(0o620),
}


@pytest.mark.parametrize("command", [["kill", "c1", "KILL"], ["delete", "--force", "c1"]])
@pytest.mark.parametrize("how", sorted(UNTRUSTED))
def test_a_forged_state_under_an_untrusted_root_is_refused_and_nothing_is_signalled(
        tmp_path: Path, sleeper: subprocess.Popen[bytes], how: str, command: list[str]) -> None:
    root = tmp_path / "root"
    state = write_state(root, "c1", sleeper.pid, start_time(sleeper.pid))
    UNTRUSTED[how](root, state)
    line = one_error_line(runtime("--root", str(root), *command))
    assert "refusing the runtime state at " in line and "accepted: " in line
    assert sleeper.poll() is None, "the pid named by an untrusted state was signalled"
    assert state.exists(), "nothing is removed on an untrusted state's say-so"


@pytest.mark.parametrize("how", ["root-is-a-symlink", "state-json-is-a-symlink"])
def test_a_state_reached_through_a_symlink_is_refused(tmp_path: Path, sleeper: subprocess.Popen[bytes],
                                                     how: str) -> None:
    real = tmp_path / "real"
    state = write_state(real, "c1", sleeper.pid, start_time(sleeper.pid))
    root = tmp_path / "root"
    if how == "root-is-a-symlink":
        root.symlink_to(real)
    else:
        write_state(root, "c1", 0, None).unlink()
        (root / "agentbox-krun" / "c1" / "state.json").symlink_to(state)
    line = one_error_line(runtime("--root", str(root), "kill", "c1", "KILL"))
    assert "it is a symlink" in line
    assert sleeper.poll() is None


def test_a_trusted_state_signals_only_the_process_create_started(tmp_path: Path,
                                                                 sleeper: subprocess.Popen[bytes]) -> None:
    """The control: in a private root the recorded process is signalled; a record whose start
    time is not the live process's (the pid was reused) is not running, and nothing is signalled."""
    root = tmp_path / "root"
    state = write_state(root, "c1", sleeper.pid, "1")  # not the sleeper's start time
    line = one_error_line(runtime("--root", str(root), "kill", "c1", "KILL"))
    assert line == "agentbox-krun-runtime: container c1 is not running"
    assert sleeper.poll() is None
    record = json.loads(state.read_text())
    record["pid_start"] = start_time(sleeper.pid)
    state.write_text(json.dumps(record))
    proc = runtime("--root", str(root), "kill", "c1", "KILL")
    assert proc.returncode == 0, proc.stderr
    assert sleeper.wait(timeout=CLI_TIMEOUT_S) == -9


def test_create_refuses_an_untrusted_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(UntrustedState, match=r"its mode is 0777; accepted: a real directory owned by uid"):
        StateStore(root).create("c1", tmp_path, tmp_path, {})
    assert not (root / "agentbox-krun").exists()
    fresh = tmp_path / "fresh" / "root"
    StateStore(fresh).create("c2", tmp_path, tmp_path, {})
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE((fresh / "agentbox-krun" / "c2" / "state.json").stat().st_mode) == 0o600
    assert StateStore(fresh).get("c2") is not None


# -- issue 24 item 9: crun's krun handler contract ---------------------------------------------------


def krun_bundle(tmp_path: Path, annotations: dict[str, str] | None = None, **extra: Any) -> Path:
    """A bundle whose rootfs is an empty directory; returns the bundle directory."""
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    config = krun_config(bundle / "rootfs", **extra)
    config["annotations"].update(annotations or {})
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


@pytest.mark.parametrize("planted", ["symlink", "fifo", "directory"])
def test_create_refuses_a_planted_krun_config_and_never_writes_through_it(tmp_path: Path, planted: str) -> None:
    """The image owns the rootfs: a /.krun_config.json link to a host file is refused (crun opens it
    O_NOFOLLOW beneath the rootfs), the host file is untouched; a FIFO cannot hang create."""
    bundle = krun_bundle(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("host file\n")
    name = bundle / "rootfs" / ".krun_config.json"
    words = {"symlink": "it is a symlink", "fifo": "it is a FIFO", "directory": "it is a directory"}[planted]
    if planted == "symlink":
        name.symlink_to(victim)
    elif planted == "fifo":
        os.mkfifo(name)
    else:
        name.mkdir()
    line = one_error_line(runtime("--root", str(tmp_path / "root"), "create", "--bundle", str(bundle), "c1"))
    assert f"refusing to write {name}: {words} in the image" in line
    assert victim.read_text() == "host file\n" and os.path.lexists(name)
    assert not (tmp_path / "root" / "agentbox-krun" / "c1").exists()


def test_krun_config_is_the_config_json_bytes_written_0444_as_crun_writes_it(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    data = b'{"process": {"args": ["sh"]}}\n'
    krun_config_file.write(rootfs, data)
    written = rootfs / ".krun_config.json"
    assert written.read_bytes() == data and stat.S_IMODE(written.stat().st_mode) == 0o444
    written.chmod(0o640)  # an existing regular file is rewritten in place, as O_TRUNC does
    krun_config_file.write(rootfs, b"{}")
    assert written.read_bytes() == b"{}" and stat.S_IMODE(written.stat().st_mode) == 0o640


@pytest.mark.parametrize(("annotations", "words"), [
    ({"krun.disk.1.path": "IMG", "krun.disk.1.id": "a"},
     "krun disk annotation indexes must be contiguous from 0: missing index 0"),
    ({"krun.disk.0.path": "IMG", "krun.disk.0.id": "a", "krun.disk.2.path": "IMG", "krun.disk.2.id": "b"},
     "missing index 1"),
    ({"krun.disk.00.path": "IMG", "krun.disk.00.id": "a"}, "leading zeros are not allowed"),
    ({"krun.disk.+0.path": "IMG"}, "expected a canonical non-negative decimal"),
    ({"krun.disk..path": "IMG"}, "expected a canonical non-negative decimal"),
    ({"krun.disk.": "IMG"}, "empty index"),
    ({"krun.disk.0": "IMG"}, "expected krun.disk.N.path, krun.disk.N.id or krun.disk.N.readonly"),
    ({"krun.disk.0.path": "IMG", "krun.disk.0.id": "a", "krun.disk.0.format": "qcow2"},
     "unsupported krun disk annotation 'krun.disk.0.format'"),
    ({"krun.disk.0.path": "IMG"}, "missing required krun disk annotation krun.disk.0.id"),
    ({"krun.disk.0.id": "a"}, "missing required krun disk annotation krun.disk.0.path"),
    ({"krun.disk.0.path": "", "krun.disk.0.id": "a"}, "krun.disk.0.path must not be empty"),
    ({"krun.disk.0.path": "IMG", "krun.disk.0.id": ""}, "krun.disk.0.id must not be empty"),
    ({"krun.disk.0.path": "IMG", "krun.disk.0.id": "a", "krun.disk.0.readonly": "True"},
     "krun.disk.0.readonly='True'; accepted: true, false"),
    ({"krun.disk.0.path": "IMG", "krun.disk.0.id": "a", "krun.disk.0.readonly": "1"}, "accepted: true, false"),
    ({"krun.disk.0.path": "MISSING", "krun.disk.0.id": "a"}, "cannot open krun disk 'a' from"),
    ({"krun.disk.0.path": "EMPTY", "krun.disk.0.id": "a"}, "must not be empty"),
    ({"krun.disk.0.path": "DIR", "krun.disk.0.id": "a", "krun.disk.0.readonly": "true"},
     "must be a regular raw disk image"),
])
def test_create_refuses_krun_disk_annotations_as_the_fork_does_with_one_line(tmp_path: Path,
                                                                             annotations: dict[str, str],
                                                                             words: str) -> None:
    image, empty = tmp_path / "disk.raw", tmp_path / "empty.raw"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    empty.touch()
    paths = {"IMG": str(image), "EMPTY": str(empty), "MISSING": str(tmp_path / "missing.raw"), "DIR": str(tmp_path)}
    bundle = krun_bundle(tmp_path, {k: paths.get(v, v) for k, v in annotations.items()})
    line = one_error_line(runtime("--root", str(tmp_path / "root"), "create", "--bundle", str(bundle), "c1"))
    assert words in line
    assert not (tmp_path / "root" / "agentbox-krun" / "c1").exists()


def test_krun_disks_come_in_index_order_relative_paths_from_the_bundle(tmp_path: Path) -> None:
    bundle = krun_bundle(tmp_path, {"krun.disk.1.path": "b.raw", "krun.disk.1.id": "b", "krun.disk.1.readonly": "true",
                                    "krun.disk.0.path": "/abs/a.raw", "krun.disk.0.id": "a", "krun.disk.10.path": "c",
                                    **{f"krun.disk.{i}.{f}": "x" for i in range(2, 10) for f in ("path", "id")},
                                    "krun.disk.10.id": "c"})
    disks = krun_disks.parse(load(bundle))
    assert [(d.index, d.id, d.path, d.read_only) for d in disks[:2]] == [
        (0, "a", "/abs/a.raw", False), (1, "b", str(bundle / "b.raw"), True)]
    assert [d.index for d in disks] == list(range(11))


def _vm(annotations: dict[str, str], memory_limit: int | None = None) -> Bundle:
    return Bundle(path=Path("/b"), raw=b"{}", annotations=annotations, rootfs=Path("/b/rootfs"), terminal=False,
                  netns=None, memory_limit=memory_limit)


@pytest.mark.parametrize(("annotations", "limit", "cpus", "ram"), [
    ({}, None, 16, 1024),  # affinity (20 CPUs) capped at 16; RAM 1024
    ({"krun.cpus": "3", "krun.ram_mib": "2048"}, None, 3, 2048),
    ({"krun.cpus": " +4", "krun.ram_mib": "129"}, None, 4, 129),  # strtol: blanks and a sign
    ({"krun.cpus": "0", "krun.ram_mib": "128"}, None, 16, 1024),  # 0 vCPUs: affinity; <=128 MiB: ignored
    ({"krun.ram_mib": "64"}, 512 << 20, 16, 512),  # then the memory limit
    ({}, (300 << 20) + 5, 16, 300),
    ({"krun.cpus": "300"}, None, 44, 1024),  # crun passes an uint8_t
])
def test_vcpus_and_ram_as_crun_1_27_1_picks_them(monkeypatch: pytest.MonkeyPatch, annotations: dict[str, str],
                                                 limit: int | None, cpus: int, ram: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(20)))
    bundle = _vm(annotations, limit)
    assert (vm_config.vcpus(bundle), vm_config.ram_mib(bundle)) == (cpus, ram)


@pytest.mark.parametrize(("annotations", "words"), [
    ({"krun.ram_mib": "lots"}, "krun annotation krun.ram_mib='lots' cannot be converted to an integer"),
    ({"krun.cpus": "2x"}, "krun annotation krun.cpus='2x' cannot be converted to an integer"),
    ({"krun.cpus": ""}, "cannot be converted to an integer"),
    ({"krun.cpus": "-1"}, "krun annotation krun.cpus='-1' must be a positive integer"),
    ({"krun.cpus": "256"}, "0 vCPUs as libkrun's uint8_t count"),
])
def test_a_bad_resource_annotation_is_one_line(annotations: dict[str, str], words: str) -> None:
    bundle = _vm(annotations)
    with pytest.raises(vm_config.VmConfigError) as info:
        vm_config.vcpus(bundle)
        vm_config.ram_mib(bundle)
    assert words in str(info.value) and "\n" not in str(info.value)


TREE_PROBE = """
import json, os, sys
from pathlib import Path
from agentbox_runtime.oci.bundle import Mount
from agentbox_runtime.oci import mount_tree
spec = json.loads(sys.argv[1])
mounts = [Mount(m[0], m[1], m[2], tuple(m[3])) for m in spec["mounts"]]
mount_tree.build(Path(spec["rootfs"]), Path(spec["tree"]), mounts, Path(spec["bundle"]))
tree = spec["tree"]
with open(tree + "/etc/live") as f:
    live = f.read()
mounts_seen = [line.split()[4] for line in open("/proc/self/mountinfo") if line.split()[4].startswith(tree)]
print(json.dumps({"live": live, "vol": sorted(os.listdir(tree + "/etc/vol")), "skel": sorted(os.listdir(tree + "/skel")),
                  "mounts": mounts_seen, "ro": os.access(tree + "/etc/live", os.W_OK),
                  "submounts": mount_tree.submounts(Path(tree))}))
"""


def test_the_mount_tree_is_built_beneath_the_rootfs_live_and_private(tmp_path: Path) -> None:
    """Volumes and file binds land at their destination resolved inside the rootfs (an image's
    symlink to /etc is the rootfs's /etc, a ../ escape stays inside), the host's own paths and
    mount namespace untouched; tmpcopyup brings the image's files into the tmpfs; /proc, /sys
    and /dev are left to the guest; the directory mounts are the guest's submounts."""
    if os.geteuid() != 0:
        pytest.skip("mount namespaces need root")
    rootfs, tree, vol = tmp_path / "rootfs", tmp_path / "tree", tmp_path / "vol"
    for d in (rootfs / "etc", rootfs / "skel", tree, vol):
        d.mkdir(parents=True)
    (rootfs / "skel" / ".profile").write_text("image\n")
    (rootfs / "data").symlink_to("/etc")
    (rootfs / "esc").symlink_to("../../../../../../" + str(tmp_path / "outside"))
    (vol / "from-host").write_text("host\n")
    (tmp_path / "live").write_text("live\n")
    spec = {"rootfs": str(rootfs), "tree": str(tree), "bundle": str(tmp_path), "mounts": [
        ["/data/vol", "bind", str(vol), ["rw", "rprivate", "rbind"]],
        ["/etc/live", "bind", "live", ["bind", "ro"]],  # a relative source is the bundle's
        ["/skel", "tmpfs", "tmpfs", ["rw", "nosuid", "nodev", "tmpcopyup"]],
        ["/esc/x", "tmpfs", "tmpfs", []],
        ["/proc", "proc", "proc", []], ["/dev/shm", "bind", "/dev/shm", ["bind"]], ["/sys", "sysfs", "sysfs", []]]}
    proc = subprocess.run([sys.executable, "-c", TREE_PROBE, json.dumps(spec)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["live"] == "live\n" and seen["vol"] == ["from-host"] and seen["skel"] == [".profile"]
    assert seen["ro"] is False
    assert sorted(seen["mounts"]) == sorted(str(tree / p) for p in ("", "etc/vol", "etc/live", "skel",
                                                                    f"{str(tmp_path / 'outside')[1:]}/x"))
    # what virtio-fs would announce as submounts: the directories, in mount order, not the file
    assert seen["submounts"] == ["/etc/vol", "/skel", f"{tmp_path / 'outside'}/x"]
    assert not (tmp_path / "outside").exists() and not Path("/etc/vol").exists()
    assert str(tree) not in Path("/proc/self/mountinfo").read_text()  # nothing reached this namespace
    assert (rootfs / "etc" / "vol").is_dir() and (rootfs / "etc" / "live").is_file()  # crun-made mount points
