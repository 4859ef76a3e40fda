"""``agentbox microvm`` end to end with real boots (TCG here) of localhost/agentbox:latest,
on both VMMs: ``--vmm qemu``, and ``--vmm libkrun`` through the QEMU-backed libkrun
stand-in (the production helper and ctypes calls, a real guest).

All runs of one VMM share one isolated state base (XDG_STATE_HOME) so the image
is ingested once per VMM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbox_runtime.vmm.krun_guest import libkrun_disk_serial

pytestmark = [pytest.mark.vm, pytest.mark.slow]

IMAGE = "localhost/agentbox:latest"
BOOT_TIMEOUT_S = 900
DEV_UID = 1000


@pytest.fixture(scope="module", params=["qemu", "libkrun"])
def vmm(request: pytest.FixtureRequest) -> str:
    """``--vmm`` of every run in the module: qemu, then libkrun (the stand-in)."""
    return str(request.param)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, vmm: str, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86_64")
    if subprocess.run(["podman", "image", "exists", IMAGE], timeout=60).returncode != 0:
        pytest.skip(f"needs the guest image {IMAGE} (build it with `agentbox image build`)")
    base = tmp_path_factory.mktemp(f"microvm-state-{vmm}")
    extra = {"AGENTBOX_LIBKRUN_LIBRARY": str(request.getfixturevalue("libkrun_standin"))} if vmm == "libkrun" else {}
    yield {**os.environ, "XDG_STATE_HOME": str(base), **extra}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():  # a failed test's fuse mounts
        if line.split()[4].startswith(str(base)):
            subprocess.run(["umount", "-l", line.split()[4]], capture_output=True, timeout=60)


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """A project dir owned by uid 1000 when run as root (the guest's dev takes the owner's ids)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    if os.geteuid() == 0:
        os.chown(ws, DEV_UID, DEV_UID)
    return ws


def agentbox(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=BOOT_TIMEOUT_S)


def app_dir(env: dict[str, str]) -> Path:
    return Path(env["XDG_STATE_HOME"]) / "agentbox"


def markers(env: dict[str, str]) -> list[tuple[str, int, int]]:
    return [(str(p), p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (app_dir(env) / "microvm" / "images").glob("blobs/*/*/agentbox-compatible")]


def leftovers(env: dict[str, str]) -> list[str]:
    tasks = [str(p) for p in app_dir(env).glob("*/microvm-tasks/*")]
    recs = [str(p) for p in (app_dir(env) / "microvm" / "running").glob("*.json")]
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4].startswith(str(app_dir(env)))]
    return tasks + recs + mounts


def test_exit_status_passes_through_and_second_run_reuses_cache(env: dict[str, str], workspace: Path, vmm: str) -> None:
    first = agentbox(env, workspace, "microvm", "--vmm", vmm, "--", "sh", "-c", "echo ok; exit 3")
    assert first.returncode == 3, first.stderr[-3000:]
    assert "ok" in first.stdout.splitlines()
    cached = markers(env)
    assert len(cached) == 1
    second = agentbox(env, workspace, "microvm", "--vmm", vmm, "--", "sh", "-c", "echo again")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "again" in second.stdout.splitlines()
    assert markers(env) == cached  # the entry was not rewritten: no second ingestion
    assert leftovers(env) == []


def test_preserve_debug_keeps_rootfs_and_prints_hint(env: dict[str, str], workspace: Path, vmm: str) -> None:
    proc = agentbox(env, workspace, "microvm", "--vmm", vmm, "--preserve-debug", "--", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    notice = [line for line in proc.stderr.splitlines() if line.startswith("agentbox: preserved microvm debug state: ")]
    assert len(notice) == 1, proc.stderr[-3000:]
    root = Path(notice[0].split("task_rootfs='", 1)[1].split("'", 1)[0])
    task_dir = root.parent
    try:
        assert (task_dir / "launch.conf").is_file() and root.is_dir()
        assert any(root.glob("nix/store/*/bin/agentbox-guest-init"))
        if root.name == "rootfs-fuse-overlay":
            assert f"unmount it with `fusermount3 -u '{root}'` before deleting '{task_dir}'" in notice[0]
        elif root.name == "rootfs-btrfs-snapshot":
            assert "buildah unshare btrfs subvolume delete" in notice[0]
    finally:
        from agentbox_runtime.microvm.storage import reset_task_dir

        reset_task_dir(task_dir)


def start_and_wait_for_vm(env: dict[str, str], workspace: Path, vmm: str) -> tuple[subprocess.Popen[bytes], int]:
    """An ``agentbox microvm -- sleep 600`` parent (stderr in ``<workspace>/../parent.err``) and its
    recorded VM pid once the VM is up."""
    with open(workspace.parent / "parent.err", "wb") as err:
        parent = subprocess.Popen([sys.executable, "-m", "agentbox_runtime.cli", "microvm", "--vmm", vmm, "--", "sleep",
                                   "600"], cwd=workspace, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    running = app_dir(env) / "microvm" / "running"
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    try:
        while time.monotonic() < deadline and parent.poll() is None:
            for rec in running.glob("*.json"):
                pid = json.loads(rec.read_text()).get("pid")
                if pid:
                    return parent, pid
            time.sleep(0.2)
    except BaseException:
        parent.kill()
        raise
    parent.kill()
    pytest.fail(f"no VM process was recorded under {running} (parent status {parent.poll()})")


def vm_gone(pid: int) -> bool:
    """The recorded VM process (qemu, or the libkrun helper) no longer runs (or the pid was reused)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z" or not any(word in cmd for word in ("qemu", "launcher.py", "__agentbox_microvm_enter"))


def test_sigkill_of_parent_during_boot_leaves_nothing_after_next_run(env: dict[str, str], workspace: Path,
                                                                   vmm: str) -> None:
    parent, vm_pid = start_and_wait_for_vm(env, workspace, vmm)
    parent.send_signal(signal.SIGKILL)
    parent.wait(30)
    assert leftovers(env) != []  # the dead run left its task behind...
    after = agentbox(env, workspace, "microvm", "--vmm", vmm, "--", "true")
    assert after.returncode == 0, after.stderr[-3000:]
    assert leftovers(env) == []  # ...and the next run reaped it
    assert vm_gone(vm_pid)


def test_sigterm_of_parent_stops_vm_and_cleans_up(env: dict[str, str], workspace: Path, vmm: str) -> None:
    parent, vm_pid = start_and_wait_for_vm(env, workspace, vmm)
    parent.send_signal(signal.SIGTERM)
    try:
        status = parent.wait(120)
    finally:
        if parent.poll() is None:
            parent.kill()
    err = (workspace.parent / "parent.err").read_text(errors="replace")[-3000:]
    assert status != 0, err
    assert leftovers(env) == [] and vm_gone(vm_pid), err


def test_workspace_reads_and_writes_and_both_persistent_disks(env: dict[str, str], workspace: Path,
                                                              vmm: str) -> None:
    (workspace / "from-host").write_text("host data\n")
    script = ("cat /workspace/from-host; id -un; echo guest data > /workspace/from-guest; "
              "echo $(cat /sys/block/vda/serial); echo $(cat /sys/block/vdb/serial)")
    proc = agentbox(env, workspace, "microvm", "--vmm", vmm, "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = next(app_dir(env).glob("*/microvm-nix.raw")).parent
    assert {p.name for p in state.glob("microvm-*.raw")} == {"microvm-nix.raw", "microvm-containers.raw"}
    disks = (state / "microvm-nix.raw", state / "microvm-containers.raw")
    # qemu names each disk by its id; libkrun derives the serial from the image file (the stand-in as upstream)
    serials = (["agentbox-nix", "agentbox-containers"] if vmm == "qemu"
               else [libkrun_disk_serial(disk) for disk in disks])
    assert proc.stdout.splitlines() == ["host data", "dev", *serials], proc.stderr[-2000:]
    written = workspace / "from-guest"
    assert written.read_text() == "guest data\n"
    assert (written.stat().st_uid, written.stat().st_gid) == (os.stat(workspace).st_uid, os.stat(workspace).st_gid)


def test_a_root_owned_project_is_writable_by_dev_and_no_setuid_file_reaches_the_host(env: dict[str, str],
                                                                                    tmp_path: Path, vmm: str) -> None:
    """Issue 11 item 3: as root, in a root-owned 0755 project, the guest's dev user writes and the file
    lands owned by the project's owner; a setuid/setgid chmod of it is refused on the host share."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the case is a root-owned project")
    project = tmp_path / "root-project"
    project.mkdir(mode=0o755)
    script = ("echo x > /workspace/f && id -un && "
              "if chmod u+s /workspace/f 2>/dev/null; then echo setuid-allowed; else echo setuid-refused; fi && "
              "if chmod g+s /workspace/f 2>/dev/null; then echo setgid-allowed; else echo setgid-refused; fi")
    proc = agentbox(env, project, "microvm", "--vmm", vmm, "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["dev", "setuid-refused", "setgid-refused"], proc.stderr[-2000:]
    written = project / "f"
    assert written.read_text() == "x\n"
    st = written.stat()
    assert (st.st_uid, st.st_gid) == (0, 0) and st.st_mode & 0o6000 == 0


def test_a_comma_in_a_fuse_project_path_shares_no_other_host_directory(env: dict[str, str], tmp_path: Path,
                                                                      vmm: str) -> None:
    """Security round 2, finding 1: a project on FUSE (which cannot be id-mapped) at
    ``proj,path=<host dir>`` used to reach qemu as a plain ``-fsdev ...,path=`` value, and the guest
    read the host directory. Now the value is quoted and root shares a nosuid,nodev clone."""
    if os.geteuid() != 0 or shutil.which("fuse-overlayfs") is None:
        pytest.skip("needs root and fuse-overlayfs")
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "MARKER").write_text("host\n")
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "MARKER").write_text("project\n")
    project = Path(f"{tmp_path}/proj,path={host_dir}")
    project.mkdir(parents=True)
    subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(project)],
                   check=True, capture_output=True, timeout=60)
    try:
        proc = agentbox(env, project, "microvm", "--vmm", vmm, "--", "sh", "-c",
                        "cat /workspace/MARKER; grep ' /workspace ' /proc/mounts | wc -l")
    finally:
        subprocess.run(["fusermount", "-u", str(project)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == "project", proc.stdout
    if vmm == "qemu":
        assert "nosuid,nodev" in proc.stderr, proc.stderr[-2000:]


HARDENED_PROBE = ("grep NoNewPrivs /proc/self/status; grep CapBnd /proc/self/status; "
                  "touch /etc/probe 2>&1 | sed 's/.*: //'; "
                  "unshare -rm true 2>/dev/null && echo unshare-allowed || echo unshare-refused; "
                  "echo in-workspace > /workspace/hardened && cat /workspace/hardened")


def test_the_hardened_shell(env: dict[str, str], workspace: Path, vmm: str) -> None:
    """``agentbox microvm --hardened``: the shell gets no_new_privs, an empty bounding set and the
    seccomp filter, the root is read-only, and the workspace stays writable."""
    proc = agentbox(env, workspace, "microvm", "--vmm", vmm, "--hardened", "--", "sh", "-c", HARDENED_PROBE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.replace("\t", " ") for line in proc.stdout.splitlines()]
    assert lines == ["NoNewPrivs: 1", "CapBnd: 0000000000000000", "Read-only file system", "unshare-refused",
                     "in-workspace"], proc.stderr[-2000:]
