"""The guest side of libkrun mode, run inside a real privileged Podman container of the guest image.

No VM: the two persistent raw btrfs disks (64 GiB sparse) are attached as loop
devices and the container runs ``agentbox-guest-init libkrun enter -- sh -c ...``
exactly as the libkrun guest would, with the disk flags and host ids in its
environment. That proves, on any Linux host, that the image and guest_init
together prepare ``/nix`` on disk 0 (overlay + nix-daemon) and rootless Podman
on disk 1 (btrfs storage driver), drop to ``dev``, keep the Nix store across
restarts, and grow a filesystem after the host grew its image.

Each disk gets a unique label (passed through the contract's label variables),
so a privileged container that sees every host block device still finds only
this test's disks.

Where the host withholds CAP_SYS_RESOURCE even from root (some CI sandboxes,
this project's machines), no container can raise RLIMIT_NOFILE to enter's
floor of 524288; there ``nofile_shim.c`` is preloaded to forgive exactly that
EPERM (a host boundary a real VM does not have), and everything else is real.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentbox_guest_init import contract
from agentbox_guest_init.image_user import ImageUser

ULIMITS = ("--ulimit", "nofile=16384:16384", "--ulimit", "nproc=8192:8192")
RUN_TIMEOUT_S = 600
GIB = 1 << 30
CAP_SYS_RESOURCE = 24
SHIM_SOURCE = Path(__file__).with_name("nofile_shim.c")
SHIM_IN_GUEST = "/opt/agentbox-test/nofile_shim.so"


def _host_has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def _guest_init_ready() -> bool:
    try:
        from agentbox_guest_init import enter, nix_prep, podman_prep, resize  # noqa: F401
    except ImportError:
        return False
    return hasattr(enter, "enter") and hasattr(resize, "resize")


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices and privileged rootful Podman"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("podman", "buildah", "losetup", "mkfs.btrfs")),
                       reason="needs podman, buildah, losetup and mkfs.btrfs: "
                              "apt-get install podman buildah util-linux btrfs-progs"),
    pytest.mark.skipif(not _guest_init_ready(), reason="guest_init has no libkrun enter/resize yet"),
]


@dataclass(frozen=True)
class Disk:
    """One raw image attached as a loop device, with its unique label."""

    path: Path
    device: str
    label: str


@pytest.fixture(scope="module")
def image() -> str:
    """``AGENTBOX_TEST_IMAGE``, else the guest image with the current guest_init (built or up to date)."""
    from agentbox_runtime.images.build import build

    return os.environ.get("AGENTBOX_TEST_IMAGE") or build().tag


def _losetup(*args: str) -> str:
    proc = subprocess.run(["losetup", *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"losetup {' '.join(args)}: {proc.stderr}"
    return proc.stdout.strip()


@pytest.fixture()
def disks(tmp_path: Path) -> Iterator[dict[str, Disk]]:
    """The nix and containers disks (64 GiB sparse btrfs) attached as loop devices; detached after."""
    from agentbox_runtime.disks import LIBKRUN_DISKS, RawDisk, SubprocessRunner, create

    made: dict[str, Disk] = {}
    tag = uuid.uuid4().hex[:8].upper()
    try:
        for raw in LIBKRUN_DISKS:
            label = f"{raw.spec.label}_{tag}"
            unique = RawDisk(raw.file_name, type(raw.spec)(raw.spec.key, raw.spec.index, raw.spec.block_id,
                                                           label, raw.spec.preferred_device), raw.diag)
            path = unique.path(tmp_path)
            create(unique, path, SubprocessRunner())
            made[raw.spec.key] = Disk(path, _losetup("--find", "--show", str(path)), label)
        yield made
    finally:
        for disk in made.values():
            subprocess.run(["losetup", "-d", disk.device], capture_output=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def nofile_shim(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The compiled shim when this host cannot grant enter's nofile floor, else None."""
    if _host_has_cap_sys_resource():
        return None
    if shutil.which("gcc") is None:
        pytest.skip("this host withholds CAP_SYS_RESOURCE, so libkrun enter's RLIMIT_NOFILE floor needs "
                    "the test shim, which needs gcc: apt-get install gcc")
    out = tmp_path_factory.mktemp("shim") / "nofile_shim.so"
    proc = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(SHIM_SOURCE), "-ldl"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture()
def guest(image: str, disks: dict[str, Disk], nofile_shim: Path | None) -> Iterator[Guest]:
    g = Guest(image, disks, nofile_shim)
    try:
        yield g
    finally:
        g.remove_all()


class Guest:
    """Runs containers of the image with both disks attached; removes every one it started."""

    def __init__(self, image: str, disks: dict[str, Disk], shim: Path | None) -> None:
        self.image, self.disks, self.shim = image, disks, shim
        self.names: list[str] = []

    def run(self, *argv: str, entrypoint: str = contract.GUEST_INIT_PATH) -> subprocess.CompletedProcess[str]:
        name = f"agentbox-guest-test-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        nix, ctrs = self.disks["nix"], self.disks["containers"]
        env = {contract.ENV_NIX_OVERLAY: "1", contract.ENV_CONTAINERS_STORAGE: "1",
               contract.ENV_HOST_UID: "1000", contract.ENV_HOST_GID: "1000",
               contract.ENV_NIX_DISK_LABEL: nix.label, contract.ENV_CONTAINERS_DISK_LABEL: ctrs.label}
        cmd = ["podman", "run", "--rm", "--name", name, "--label", f"{contract.LABEL_ROLE}=guest-test",
               "--privileged", "--runtime", "runc", *ULIMITS, "--network", "none",
               "--device", nix.device, "--device", ctrs.device, "--entrypoint", entrypoint]
        if self.shim is not None:
            cmd += ["--volume", f"{self.shim}:{SHIM_IN_GUEST}:ro"]
            env["LD_PRELOAD"] = SHIM_IN_GUEST
        for key, value in env.items():
            cmd += ["--env", f"{key}={value}"]
        try:
            return subprocess.run([*cmd, self.image, *argv], capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"guest container timed out after {RUN_TIMEOUT_S}s; last output: {exc.stdout!r} "
                        f"{exc.stderr!r}")

    def enter(self, script: str) -> subprocess.CompletedProcess[str]:
        """``agentbox-guest-init libkrun enter -- sh -c SCRIPT`` (the shell runs as dev)."""
        return self.run("libkrun", "enter", "--", "sh", "-c", script)

    def remove_all(self) -> None:
        for name in self.names:
            subprocess.run(["podman", "rm", "--force", "--ignore", name], capture_output=True,
                           timeout=120, check=False)


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def _fields(out: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^(\w+)=(.*)$", out, re.M))


def _fs_bytes(device: str) -> int:
    out = subprocess.run(["btrfs", "inspect-internal", "dump-super", device], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    m = re.search(r"^dev_item\.total_bytes\s+(\d+)", out, re.M)
    assert m, out
    return int(m.group(1))


PREPARE = """set -e
agentbox-guest-init libkrun nix wait
agentbox-guest-init libkrun podman wait
echo "user=$(id -un)"
echo "uid=$(id -u)"
echo "gid=$(id -g)"
echo "home=$HOME"
echo "nix_remote=$NIX_REMOTE"
echo "podman=$(podman info --format '{{.Host.Security.Rootless}} {{.Store.GraphDriverName}}')"
echo "graphroot=$(podman info --format '{{.Store.GraphRoot}}')"
echo "nixmount=$(findmnt -no FSTYPE /nix)"
echo "kept-$MARK" > "$TMPDIR/kept.txt"
echo "added=$(nix-store --add "$TMPDIR/kept.txt")"
"""


def test_enter_prepares_nix_and_rootless_podman_and_persists(guest: Guest) -> None:
    mark = uuid.uuid4().hex
    first = _fields(_ok(guest.enter(f"MARK={mark}\n{PREPARE}")))
    assert (first["user"], first["uid"], first["gid"]) == ("dev", "1000", "1000")
    assert first["home"] == contract.DEV_HOME
    assert first["nix_remote"] == contract.NIX_REMOTE_VALUE
    assert first["podman"] == "true btrfs"
    assert first["graphroot"] == f"{ImageUser().containers_storage}/storage"
    assert first["nixmount"] == "overlay"
    stored = first["added"]
    assert stored.startswith("/nix/store/") and stored.endswith("-kept.txt"), first

    second = _ok(guest.enter(f"set -e; agentbox-guest-init libkrun nix wait; "
                             f"nix-store --check-validity {stored}; cat {stored}"))
    assert second.strip().splitlines()[-1] == f"kept-{mark}"


def test_resize_grows_the_nix_filesystem_after_the_host_grew_the_image(guest: Guest,
                                                                        disks: dict[str, Disk]) -> None:
    nix = disks["nix"]
    before = _fs_bytes(nix.device)
    assert before == 64 * GIB
    os.truncate(nix.path, 80 * GIB)
    _losetup("-c", nix.device)
    assert _fs_bytes(nix.device) == before  # the disk grew, the filesystem not yet
    _ok(guest.run("libkrun", "resize", "--target", "nix"))
    assert _fs_bytes(nix.device) == 80 * GIB
    assert _fs_bytes(disks["containers"].device) == 64 * GIB
