"""Host paths through qemu's own option parser: what qemu opens is the path we named, whatever it holds.

Finding 1 of security round 2: ``-fsdev local,path={path}`` with a comma in the project
path let the path add options of its own (``proj,path=/etc`` shared ``/etc``). Every
builder of qemu argv quotes its values (:mod:`agentbox_runtime.vmm.qemu_opts`). These
tests start the real ``qemu-system -S`` with the product's own share, disk and port
arguments for generated paths, ask QMP that the machine is built, and read from
``/proc/PID/fd`` which directory and file qemu opened, and where it made the socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agentbox_runtime.retry import retry
from agentbox_runtime.vmm import qemu
from agentbox_runtime.vmm.host import qemu_binary

pytestmark = pytest.mark.skipif(shutil.which(qemu_binary()) is None, reason=f"needs {qemu_binary()}")

# Names a project directory may have: anything but '/' and NUL, with qemu's separators often.
NAME_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0")
NAMES = st.one_of(
    st.text(NAME_CHARS, min_size=1, max_size=24),
    st.builds(lambda a, b: f"{a},path={b}", st.text(NAME_CHARS, max_size=8), st.sampled_from(["/etc", "/", "/root"])),
    st.text(st.sampled_from(",=: 'x\"\\"), min_size=1, max_size=12),
).filter(lambda name: name not in (".", "..") and len(name.encode()) < 60)


def _qmp_ready(path: Path, proc: subprocess.Popen[bytes]) -> None:
    """Wait until qemu answers QMP: by then every -fsdev, -drive and -chardev is open."""
    def answered(last_try: bool) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"qemu exited {proc.returncode}: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(path))
                reader = s.makefile("rb")
                json.loads(reader.readline())
                s.sendall(b'{"execute":"qmp_capabilities"}\n')
                return "return" in json.loads(reader.readline())
        except (FileNotFoundError, ConnectionRefusedError):
            if last_try:
                raise
            return False

    retry(answered, timeout=30.0, interval=0.05)


def _opened(pid: int) -> set[str]:
    opened = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            opened.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return opened


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short private directory (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="qopt-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start(argv: list[str], qmp: Path) -> subprocess.Popen[bytes]:
    full = [qemu_binary(), "-S", "-nodefaults", "-no-user-config", "-display", "none", "-machine", "pc",
            "-accel", "tcg", "-chardev", f"socket,id=qmp,path={qmp},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control", "-device", "virtio-serial-pci,id=vser", *argv]
    return subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=NAMES)
@example(name="proj,path=/etc")
@example(name="ws,security_model=passthrough,readonly=off")
@example(name=",,")
def test_qemu_opens_exactly_the_named_share_disk_and_socket(scratch: Path, name: str) -> None:
    case = Path(tempfile.mkdtemp(dir=scratch))
    project = case / name  # "proj,path=/etc" is the directory /etc below "proj,path="
    project.mkdir(parents=True)
    flat = name.replace("/", "_")
    disk = case / f"{flat}.img"
    disk.write_bytes(bytes(4096))
    sock = case / f"s{flat}"[:40]
    argv = (qemu.share_args("ws", project, "agentbox-workspace")
            + qemu.disk_args(0, "agentbox-nix", disk)
            + qemu.port_args("agent", "org.agentbox.agent", "socket", path=sock, server="on", wait="off"))
    proc = _start(argv, case / "qmp.sock")
    try:
        _qmp_ready(case / "qmp.sock", proc)
        opened = _opened(proc.pid)
        assert str(project) in opened, (name, sorted(opened))
        assert str(disk) in opened, (name, sorted(opened))
        assert not {"/etc", "/", "/root"} & opened, (name, sorted(opened))
        assert sock.exists() and os.path.isdir(project), name
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_a_read_only_flag_in_a_disk_path_stays_part_of_the_name(scratch: Path) -> None:
    """``readonly=on`` spelled in a file name does not make qemu open the disk read-only (nor
    fail to parse): the name is opened as it is, read-write."""
    disk = scratch / "nix,readonly=on.raw"
    disk.write_bytes(bytes(4096))
    proc = _start(qemu.disk_args(0, "agentbox-nix", disk), scratch / "qmp.sock")
    try:
        _qmp_ready(scratch / "qmp.sock", proc)
        fds = {os.readlink(f"/proc/{proc.pid}/fd/{fd}"): fd for fd in os.listdir(f"/proc/{proc.pid}/fd")}
        assert str(disk) in fds, sorted(fds)
        flags = int(Path(f"/proc/{proc.pid}/fdinfo/{fds[str(disk)]}").read_text().split("flags:")[1].split()[0], 8)
        assert flags & os.O_ACCMODE == os.O_RDWR
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
