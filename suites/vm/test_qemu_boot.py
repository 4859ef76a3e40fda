"""Real qemu boots (TCG here) of the guest image through agentbox_runtime.vmm.qemu.

One boot serves the module: the guest command prints ``ok`` on the command
console, mounts the workspace as ``agentbox-guest-init`` does, writes into it as
root and as dev, tries to plant setuid/setgid files and device nodes there,
records what it sees of the attached disk, rewrites an existing setuid-root
binary of its rootfs, floods its console and its status port, and exits 3. The
host workspace belongs to another user (4242:4343, mode 0755), as a project root
owns would. The rootfs, workspace and disk paths hold commas, which qemu's option
parser would read as options of their own unless quoted.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentbox_guest_init import contract
from agentbox_guest_init.enter import NINEP_OPTIONS
from agentbox_guest_init.launch_config import LaunchConfig, LaunchDisk
from agentbox_runtime.vmm.base import VmSpec
from agentbox_runtime.vmm import console_log, qemu
from agentbox_runtime.vmm.qemu import QemuDriver, tail

pytestmark = [pytest.mark.vm, pytest.mark.slow]

IMAGE = "localhost/agentbox:latest"
BOOT_TIMEOUT_S = 600
OWNER = (4242, 4343)
CONSOLE_CAP = 128 << 10
FLOOD_BYTES = 4 * CONSOLE_CAP
STATUS_FLOOD_BYTES = 4 * qemu.STATUS_CAP
SETUID_BINARY = "usr/bin/newgrp"
GUEST_SCRIPT_BYTES = b"#!/bin/sh\necho guest\n"
DEV = f"setpriv --reuid {contract.DEV_UID} --regid {contract.DEV_GID} --clear-groups"
SCRIPT = f"""
echo ok
mkdir -p /workspace
mount -t 9p -o {NINEP_OPTIONS} {contract.WORKSPACE_TAG} /workspace
stat -c '%u %g' /workspace > /tmp/seen
echo root > /workspace/by-root
{DEV} sh -c 'echo dev > /workspace/by-dev; mkdir /workspace/dir-by-dev'
cp /tmp/seen /workspace/seen
attempt() {{ if "$@" 2>/dev/null; then echo "allowed: $*"; else echo "refused: $*"; fi; }}
{{
attempt chmod u+s /workspace/by-dev
attempt chmod g+s /workspace/by-root
attempt chmod 6755 /workspace/dir-by-dev
attempt mknod /workspace/null c 1 3
attempt mknod /workspace/loop b 7 0
attempt python3 -c "import os; os.open('/workspace/suid-new', os.O_CREAT | os.O_WRONLY, 0o4755)"
attempt python3 -c "import os; os.setxattr('/workspace/by-root', 'security.capability', bytes(20))"
}} > /workspace/attempts
if [ -b /dev/vda ]; then echo "vda $(cat /sys/block/vda/serial)" > /workspace/disk; fi
head -c {FLOOD_BYTES} /dev/zero | tr '\\0' x > /dev/ttyS0; echo; echo end-of-flood > /dev/ttyS0
printf '#!/bin/sh\\necho guest\\n' > /{SETUID_BINARY}
for port in /sys/class/virtio-ports/*; do
  dev="/dev/${{port##*/}}"
  [ "$(cat "$port/name")" = {qemu.STATUS_PORT} ] && head -c {STATUS_FLOOD_BYTES} /dev/zero | tr '\\0' y > "$dev" && echo > "$dev"
done
exit 3
"""


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A writable task rootfs: an overlay over the mounted guest image (unmounted afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (overlay mount of the guest image)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86_64 (apt-get install qemu-system-x86)")
    if subprocess.run(["podman", "image", "exists", IMAGE], timeout=60).returncode != 0:
        pytest.skip(f"needs the guest image {IMAGE} (build it with `agentbox image build`)")
    base = tmp_path_factory.mktemp("qemu-rootfs")
    lower = run("podman", "image", "mount", IMAGE)
    merged, upper, work = base / "root,fs", base / "upper", base / "work"
    for d in (merged, upper, work):
        d.mkdir()
    try:
        run("mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged))
        try:
            yield merged
        finally:
            subprocess.run(["umount", str(merged)], capture_output=True, timeout=60)
    finally:
        subprocess.run(["podman", "image", "unmount", IMAGE], capture_output=True, timeout=60)


@dataclass
class Boot:
    status: int
    console: str
    workspace: Path
    task_dir: Path
    rootfs: Path


def read_console(path: Path, sink: list[bytes]) -> None:
    """Collect the command console (a unix socket) until the guest closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        while chunk := s.recv(4096):
            sink.append(chunk)


@pytest.fixture(scope="module")
def boot(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    base = tmp_path_factory.mktemp("qemu-boot")
    workspace, task_dir, disk = base / "ws,path=", base / "task", base / "disk,readonly=on.raw"
    workspace.mkdir()
    workspace.chmod(0o755)
    os.chown(workspace, *OWNER)
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    launch = LaunchConfig(
        task_rootfs=str(rootfs), workspace_source=str(workspace), workspace_tag=contract.WORKSPACE_TAG,
        workspace_target="/workspace", ram_mib=1024, vcpus=2, workdir="/", exec_path="/bin/sh",
        disks=(LaunchDisk("agentbox-test-disk", str(disk)),), argv=("sh", "-c", SCRIPT))
    with pytest.MonkeyPatch.context() as env:
        env.setenv(console_log.ENV_MAX, str(CONSOLE_CAP))
        handle = QemuDriver().start(VmSpec(rootfs=rootfs, launch=launch, task_dir=task_dir, accel="tcg"))
    chunks: list[bytes] = []
    reader = threading.Thread(target=read_console, args=(handle.console_socket, chunks), daemon=True)
    reader.start()
    try:
        status = handle.wait(BOOT_TIMEOUT_S)
    finally:
        handle.kill()
    reader.join(30)
    return Boot(status, b"".join(chunks).decode(errors="replace"), workspace, task_dir, rootfs)


def test_command_output_reaches_the_console_and_exit_status_is_returned(boot: Boot) -> None:
    assert boot.status == 3, tail(boot.task_dir / "console.log")
    assert "ok" in boot.console.splitlines() or "ok\r" in boot.console.splitlines(), boot.console


def test_the_guest_dev_user_owns_the_workspace_and_its_writes_land_as_the_owner(boot: Boot) -> None:
    assert (boot.workspace / "seen").read_text().split() == [str(contract.DEV_UID), str(contract.DEV_GID)], \
        tail(boot.task_dir / "console.log")
    by_dev, dir_by_dev, by_root = boot.workspace / "by-dev", boot.workspace / "dir-by-dev", boot.workspace / "by-root"
    assert by_dev.read_text() == "dev\n"
    assert (by_dev.stat().st_uid, by_dev.stat().st_gid) == OWNER
    assert (dir_by_dev.stat().st_uid, dir_by_dev.stat().st_gid) == OWNER
    assert by_root.read_text() == "root\n" and by_root.stat().st_uid == 0  # root stays root: the invoking user


def test_the_guest_cannot_plant_setuid_files_device_nodes_or_capabilities(boot: Boot) -> None:
    attempts = (boot.workspace / "attempts").read_text().splitlines()
    assert len(attempts) == 7 and all(a.startswith("refused: ") for a in attempts), attempts
    for path in boot.workspace.rglob("*"):
        mode = path.lstat().st_mode
        assert not (mode & 0o6000) and not stat.S_ISCHR(mode) and not stat.S_ISBLK(mode), path
        assert "security.capability" not in os.listxattr(path, follow_symlinks=False), path


def test_attached_disk_is_vda_with_its_id_as_serial(boot: Boot) -> None:
    assert (boot.workspace / "disk").read_text().split() == ["vda", "agentbox-test-disk"]


def test_a_guest_flooding_its_console_cannot_grow_the_log_past_the_cap(boot: Boot) -> None:
    log = boot.task_dir / "console.log"
    older = console_log.rotated(log)
    assert older.exists(), tail(log)
    assert log.stat().st_size + older.stat().st_size <= CONSOLE_CAP
    assert "end-of-flood" in tail(log, 5)


def test_a_guest_rewrite_of_a_setuid_root_binary_loses_the_bit_on_the_host(boot: Boot) -> None:
    """Security round 2, finding 4: qemu runs as root without CAP_FSETID, so the kernel clears
    S_ISUID when the guest truncates and writes an existing setuid-root file of its rootfs."""
    binary = boot.rootfs / SETUID_BINARY
    assert binary.read_bytes() == GUEST_SCRIPT_BYTES, tail(boot.task_dir / "console.log")
    st = binary.stat()
    assert st.st_uid == 0 and not st.st_mode & (stat.S_ISUID | stat.S_ISGID), oct(st.st_mode)


def test_a_guest_flooding_its_status_port_cannot_grow_the_status_file(boot: Boot) -> None:
    """Finding 5: the status port is recorded with a cap, like the console; the exit status written
    after the flood still reads."""
    status = boot.task_dir / "status"
    size = status.stat().st_size + (console_log.rotated(status).stat().st_size
                                    if console_log.rotated(status).exists() else 0)
    assert size <= qemu.STATUS_CAP
    assert console_log.rotated(status).exists()
    assert boot.status == 3


def test_paths_with_commas_are_the_paths_qemu_opened(boot: Boot) -> None:
    """Finding 1: the workspace, rootfs and disk were named with commas, yet the guest saw them."""
    assert (boot.workspace / "by-root").read_text() == "root\n"
    assert (boot.workspace / "disk").read_text().split()[0] == "vda"
    argv = (boot.task_dir / "qemu.argv").read_text()
    assert "root,,fs" in argv and "disk,,readonly=on.raw" in argv
