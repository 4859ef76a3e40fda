"""Rootless Podman prep on the containers disk, and the Podman API service (reference 7.6)."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from guest_init import contract as c
from guest_init.disks import find_disk, is_mounted, require_tools, run
from guest_init.env import GuestEnv, GuestError, Identity

SUBID_START, SUBID_COUNT = 100000, 65536
USERNS_FLOOR = 28633
WRAPPER_MARK = b"agentbox-guest-init libkrun podman "
HELPER_DIRS = ("/usr/lib/podman", "/usr/libexec/podman", "/usr/local/lib/podman")


def check_subids(uid: int, gid: int) -> None:
    for name, value in (("root", 0), ("dev-uid", uid), ("dev-gid", gid)):
        if SUBID_START <= value < SUBID_START + SUBID_COUNT:
            raise GuestError(f"subordinate ID range {SUBID_START}:{SUBID_COUNT} overlaps {name} id {value}")


def rewrite_subids(path: Path) -> None:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    kept = [line for line in lines if not line.startswith(f"{c.DEV_USER}:")]
    path.write_text("\n".join(kept + [f"{c.DEV_USER}:{SUBID_START}:{SUBID_COUNT}"]) + "\n")
    os.chmod(path, 0o644)


def _find(name: str) -> str | None:
    for d in HELPER_DIRS:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return shutil.which(name)


def containers_conf(uid: int) -> str:
    conmon = _find("conmon") or "/usr/bin/conmon"
    runtime = "crun" if shutil.which("crun") else "runc"
    runtime_path = shutil.which(runtime) or f"/usr/bin/{runtime}"
    helper_dirs = []
    for tool in ("netavark", "aardvark-dns", "pasta"):
        found = _find(tool)
        if found and os.path.dirname(found) not in helper_dirs:
            helper_dirs.append(os.path.dirname(found))
    helper_dirs.append(c.IDMAP_BIN_DIR)
    quoted = ", ".join(f'"{d}"' for d in helper_dirs)
    return ("[containers]\ncgroups = \"disabled\"\n\n"
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n"
            f"runtime = \"{runtime}\"\nconmon_path = [\"{conmon}\"]\nhelper_binaries_dir = [{quoted}]\n\n"
            f"[engine.runtimes]\n{runtime} = [\"{runtime_path}\"]\n\n"
            "[network]\nnetwork_backend = \"netavark\"\n")


def storage_conf(uid: int) -> str:
    return ("[storage]\ndriver = \"btrfs\"\n"
            f"graphroot = \"{c.CONTAINERS_STORAGE_MOUNT}/storage\"\n"
            f"runroot = \"/run/user/{uid}/containers\"\n")


REGISTRIES = ("[registries.search]\nregistries = [\"docker.io\"]\n\n"
              "[registries.insecure]\nregistries = []\n\n[registries.block]\nregistries = []\n")
POLICY = ('{"default": [{"type": "insecureAcceptAnything"}], "transports": {"docker-daemon": '
          '{"": [{"type": "insecureAcceptAnything"}]}}}\n')


def _write_owned(path: Path, text: str, ident: Identity) -> None:
    path.write_text(text)
    os.chmod(path, 0o644)
    os.chown(path, ident.uid, ident.gid)


def prep(genv: GuestEnv, ident: Identity) -> None:
    """Kernel knobs, idmap helpers, storage on the containers disk, config files."""
    if os.geteuid() != 0:
        raise GuestError("libkrun container storage bootstrap must run as root")
    require_tools("blkid", "mount", "findmnt", "podman")
    userns = Path("/proc/sys/user/max_user_namespaces")
    if not userns.exists():
        raise GuestError(f"kernel does not expose {userns} user namespace support")
    if int(userns.read_text()) < USERNS_FLOOR:
        userns.write_text(f"{USERNS_FLOOR}\n")
    clone = Path("/proc/sys/kernel/unprivileged_userns_clone")
    if clone.exists() and int(clone.read_text() or 0) < 1:
        clone.write_text("1\n")
    tun = Path("/dev/net/tun")
    if not tun.exists():
        subprocess.run(["modprobe", "tun"], capture_output=True, timeout=30)
    if not tun.exists():
        raise GuestError("rootless container runtime TUN device is missing at /dev/net/tun; "
                         "ensure host /dev/net/tun is passed into the libkrun guest")
    os.chmod(tun, 0o666)
    check_subids(ident.uid, ident.gid)
    rewrite_subids(Path("/etc/subuid"))
    rewrite_subids(Path("/etc/subgid"))
    idmap = Path(c.IDMAP_BIN_DIR)
    idmap.mkdir(parents=True, exist_ok=True)
    for tool in ("newuidmap", "newgidmap"):
        src = shutil.which(tool, path=os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                                      if p != str(idmap)))
        if src:
            run(["install", "-m", "4755", "-o", "0", "-g", "0", src, str(idmap / tool)], f"failed to install {tool}")
    home = Path(c.DEV_HOME)
    cfg = home / ".config/containers"
    cfg.mkdir(parents=True, exist_ok=True)
    runtime_dir = Path(f"/run/user/{ident.uid}")
    runtime_dir.mkdir(parents=True, exist_ok=True)
    os.chown(runtime_dir, ident.uid, ident.gid)
    os.chmod(runtime_dir, 0o700)
    (runtime_dir / "containers").mkdir(exist_ok=True)
    mnt = Path(c.CONTAINERS_STORAGE_MOUNT)
    mnt.mkdir(parents=True, exist_ok=True)
    if not is_mounted(str(mnt)):
        try:
            disk = find_disk(genv.containers_disk_label, genv.containers_disk_id,
                             c.CONTAINERS_DISK.preferred_device)
        except GuestError:
            raise GuestError(f"libkrun container storage btrfs disk not found (label={genv.containers_disk_label} "
                             f"id={genv.containers_disk_id})") from None
        try:
            run(["mount", "-t", "btrfs", disk, str(mnt)], "failed to mount libkrun container storage btrfs disk")
        except GuestError:
            if not is_mounted(str(mnt)):
                raise
    (mnt / "storage").mkdir(exist_ok=True)
    for p in (home / ".local", home / ".local/share", mnt, mnt / "storage", home / ".config", cfg,
              runtime_dir / "containers"):
        os.chown(p, ident.uid, ident.gid)
    _write_owned(cfg / "storage.conf", storage_conf(ident.uid), ident)
    _write_owned(cfg / "containers.conf", containers_conf(ident.uid), ident)
    _write_owned(cfg / "registries.conf", REGISTRIES, ident)
    _write_owned(cfg / "policy.json", POLICY, ident)


def is_wrapper(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return WRAPPER_MARK in f.read(8192)
    except OSError:
        return False


def real_podman() -> str:
    """``$AGENTBOX_REAL_PODMAN`` or the first podman on PATH that is not our wrapper."""
    explicit = os.environ.get(c.ENV_REAL_PODMAN)
    if explicit:
        if is_wrapper(explicit):
            raise GuestError(f"refusing to start Podman API service through compatibility wrapper {explicit}")
        return explicit
    for d in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(d, "podman")
        if os.access(candidate, os.X_OK) and not is_wrapper(candidate):
            return candidate
    raise GuestError("could not find real podman binary; set AGENTBOX_REAL_PODMAN to the image Podman path")


def _live(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(sock))
            return True
        except OSError:
            return False


def service_wait(ident: Identity, timeout: float = c.PREP_WAIT_TIMEOUT_S) -> None:
    """Start or repair the rootless Podman API socket as dev; wait until it accepts."""
    sock = Path(c.podman_socket_path(ident.uid))
    sock_dir = sock.parent
    sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.geteuid() == 0:
        os.chown(sock_dir, ident.uid, ident.gid)
    if _live(sock):
        return
    deadline = time.monotonic() + timeout
    lock_path = sock_dir / "service.lock"
    with open(lock_path, "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GuestError(f"timed out waiting for Podman API service lock {lock_path}") from None
                time.sleep(0.1)
        if _live(sock):
            return
        sock.unlink(missing_ok=True)
        home = c.DEV_HOME
        env = {"USER": c.DEV_USER, "LOGNAME": c.DEV_USER, "HOME": home, "SHELL": ident.shell,
               "XDG_RUNTIME_DIR": f"/run/user/{ident.uid}", "XDG_CONFIG_HOME": f"{home}/.config",
               "XDG_DATA_HOME": f"{home}/.local/share", "XDG_STATE_HOME": f"{home}/.local/state",
               "XDG_CACHE_HOME": f"{home}/.cache", "TMPDIR": f"{home}/.cache/tmp",
               "PATH": f"{c.IDMAP_BIN_DIR}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        for keep in ("SSL_CERT_FILE", "NIX_SSL_CERT_FILE"):
            if keep in os.environ:
                env[keep] = os.environ[keep]
        log = open(c.PODMAN_PREP_LOG, "ab")

        def drop() -> None:
            os.setsid()
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(ident.gid)
                os.setuid(ident.uid)

        subprocess.Popen([real_podman(), "system", "service", "--time=0", f"unix://{sock}"],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, preexec_fn=drop)
        log.close()
        while not _live(sock):
            if time.monotonic() > deadline:
                raise GuestError(f"rootless Podman API service did not create a live socket at {sock}")
            time.sleep(0.1)
