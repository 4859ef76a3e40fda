"""Background rootless Podman prep on the containers disk (reference 7.6).

Kernel knobs (user namespaces, ``/dev/net/tun``), the subordinate id range
and setuid idmap helpers, storage on the containers disk with the btrfs
driver, and dev's ``storage.conf``, ``containers.conf``,
``registries.conf`` and ``policy.json``. The API socket is not started
here (see :mod:`agentbox_guest_init.podman_service`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init.disks import Expand, find_contract_disk
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.identity import Identity
from agentbox_guest_init.proc import ROOT, Runner, check, is_mounted, require_tools, run_tool, under

SUBID_START, SUBID_COUNT = 100000, 65536
USERNS_FLOOR = 28633
MAX_USERNS = "/proc/sys/user/max_user_namespaces"
USERNS_CLONE = "/proc/sys/kernel/unprivileged_userns_clone"
TUN = "/dev/net/tun"
# Where distributions keep Podman's helpers (Debian: /usr/lib/podman, /usr/libexec/podman).
HELPER_DIRS = ("/usr/local/libexec/podman", "/usr/local/lib/podman", "/usr/libexec/podman", "/usr/lib/podman")
Which = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Engine:
    """The binaries ``containers.conf`` names."""

    conmon: str
    runtime: str  # "crun", or "runc" when crun is missing
    runtime_path: str
    helper_dirs: tuple[str, ...]
    netavark: bool


def find_helper(name: str, *, dirs: Sequence[str] = HELPER_DIRS, which: Which = shutil.which) -> str | None:
    """``name`` in Podman's helper dirs, else on PATH."""
    for d in dirs:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    return which(name)


def discover_engine(*, dirs: Sequence[str] = HELPER_DIRS, which: Which = shutil.which) -> Engine:
    """conmon, crun (or runc), and the dirs holding netavark, aardvark-dns, pasta and Podman's helpers."""
    conmon = find_helper("conmon", dirs=dirs, which=which)
    if conmon is None:
        raise GuestError("rootless Podman needs conmon; none found in "
                         f"{', '.join(dirs)} or on PATH")
    runtime, runtime_path = "crun", which("crun")
    if runtime_path is None:
        runtime, runtime_path = "runc", which("runc")
    if runtime_path is None:
        raise GuestError("rootless Podman needs an OCI runtime; neither crun nor runc is on PATH")
    helper_dirs: list[str] = []
    for tool in ("netavark", "aardvark-dns", "pasta"):
        found = find_helper(tool, dirs=dirs, which=which)
        if found and os.path.dirname(found) not in helper_dirs:
            helper_dirs.append(os.path.dirname(found))
    helper_dirs += [d for d in dirs if d not in helper_dirs and os.path.isdir(d)]
    helper_dirs.append(c.IDMAP_BIN_DIR)
    netavark = find_helper("netavark", dirs=dirs, which=which) is not None
    return Engine(conmon, runtime, runtime_path, tuple(helper_dirs), netavark)


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def containers_conf(engine: Engine) -> str:
    """dev's ``containers.conf``: no cgroups, cgroupfs, file events, the discovered binaries."""
    text = ("[containers]\ncgroups = \"disabled\"\n\n"
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n"
            f"runtime = \"{engine.runtime}\"\nconmon_path = {_toml_list([engine.conmon])}\n"
            f"helper_binaries_dir = {_toml_list(engine.helper_dirs)}\n\n"
            f"[engine.runtimes]\n{engine.runtime} = {_toml_list([engine.runtime_path])}\n")
    if engine.netavark:
        text += "\n[network]\nnetwork_backend = \"netavark\"\n"
    return text


def storage_conf(ident: Identity) -> str:
    """The user's ``storage.conf``: the btrfs driver on the containers disk."""
    return ("[storage]\ndriver = \"btrfs\"\n"
            f"graphroot = \"{ident.image.containers_storage}/storage\"\n"
            f"runroot = \"/run/user/{ident.uid}/containers\"\n")


REGISTRIES_CONF = ("[registries.search]\nregistries = [\"docker.io\"]\n\n"
                   "[registries.insecure]\nregistries = []\n\n[registries.block]\nregistries = []\n")
POLICY_JSON = json.dumps({"default": [{"type": "insecureAcceptAnything"}],
                          "transports": {"docker-daemon": {"": [{"type": "insecureAcceptAnything"}]}}},
                         indent=2) + "\n"


def check_subids(uid: int, gid: int) -> None:
    """The subordinate range must not contain root, the dev uid or the dev gid."""
    for name, value in (("root", 0), ("dev-uid", uid), ("dev-gid", gid)):
        if SUBID_START <= value < SUBID_START + SUBID_COUNT:
            raise GuestError(f"subordinate ID range {SUBID_START}:{SUBID_COUNT} overlaps {name} id {value}")


def rewrite_subids(path: Path, name: str = c.DEV_USER) -> None:
    """Drop the user's lines and append ``<name>:100000:65536`` (0644)."""
    from agentbox_guest_init.home import replace_dev_line

    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    path.write_text(replace_dev_line(text, f"{name}:{SUBID_START}:{SUBID_COUNT}"))
    os.chmod(path, 0o644)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except ValueError:
        return 0


def kernel(root: Path = ROOT) -> None:
    """User namespaces for dev and a world-usable ``/dev/net/tun``."""
    userns = under(root, MAX_USERNS)
    if not userns.exists():
        raise GuestError(f"kernel does not expose {MAX_USERNS} user namespace support")
    if _read_int(userns) < USERNS_FLOOR:
        userns.write_text(f"{USERNS_FLOOR}\n")
    clone = under(root, USERNS_CLONE)
    if clone.exists() and _read_int(clone) < 1:
        clone.write_text("1\n")
    tun = under(root, TUN)
    if not tun.exists():
        raise GuestError(f"rootless container runtime TUN device is missing at {TUN}; "
                         "ensure host /dev/net/tun is passed into the libkrun guest")
    os.chmod(tun, 0o666)


def idmap(ident: Identity, *, root: Path = ROOT, runner: Runner = run_tool, path: str | None = None) -> None:
    """subuid/subgid for dev and setuid copies of newuidmap/newgidmap in the helper dir."""
    check_subids(ident.uid, ident.gid)
    rewrite_subids(under(root, "/etc/subuid"), ident.name)
    rewrite_subids(under(root, "/etc/subgid"), ident.name)
    helper = under(root, c.IDMAP_BIN_DIR)
    helper.mkdir(parents=True, exist_ok=True)
    search = os.pathsep.join(p for p in (os.environ.get("PATH", "") if path is None else path).split(os.pathsep)
                             if p and os.path.abspath(p) != c.IDMAP_BIN_DIR)
    for tool in ("newuidmap", "newgidmap"):
        src = shutil.which(tool, path=search)
        if src is None:
            raise GuestError(f"rootless Podman needs {tool} (package uidmap); not found on PATH")
        check(runner, ["install", "-m", "4755", "-o", "0", "-g", "0", src, str(helper / tool)],
              f"failed to install {tool} into {c.IDMAP_BIN_DIR}")


def _own(path: Path, ident: Identity) -> None:
    os.chown(path, ident.uid, ident.gid)


def _write_owned(path: Path, text: str, ident: Identity) -> None:
    path.write_text(text)
    os.chmod(path, 0o644)
    _own(path, ident)


def mount_storage(genv: GuestEnv, mnt: Path, *, runner: Runner, expand: Expand) -> None:
    """Mount the containers disk at ``mnt`` unless mounted (a lost mount race is fine)."""
    if is_mounted(mnt, runner):
        return
    disk = find_contract_disk(genv, "containers", "libkrun container storage btrfs disk not found",
                              runner=runner, expand=expand)
    try:
        check(runner, ["mount", "-t", "btrfs", disk, str(mnt)], "failed to mount libkrun container storage btrfs disk")
    except GuestError:
        if not is_mounted(mnt, runner):
            raise


def storage(genv: GuestEnv, ident: Identity, engine: Engine, *, root: Path = ROOT, runner: Runner = run_tool,
            expand: Expand = glob.glob) -> None:
    """Dirs, the storage mount and dev's four config files."""
    home = under(root, ident.home)
    cfg = home / ".config/containers"
    cfg.mkdir(parents=True, exist_ok=True)
    runtime_dir = under(root, f"/run/user/{ident.uid}")
    runtime_dir.mkdir(parents=True, exist_ok=True)
    _own(runtime_dir, ident)
    os.chmod(runtime_dir, 0o700)
    (runtime_dir / "containers").mkdir(exist_ok=True)
    mnt = under(root, ident.image.containers_storage)
    mnt.mkdir(parents=True, exist_ok=True)
    mount_storage(genv, mnt, runner=runner, expand=expand)
    (mnt / "storage").mkdir(exist_ok=True)
    for p in (home / ".local", home / ".local/share", mnt, mnt / "storage", home / ".config", cfg,
              runtime_dir / "containers"):
        _own(p, ident)
    _write_owned(cfg / "storage.conf", storage_conf(ident), ident)
    _write_owned(cfg / "containers.conf", containers_conf(engine), ident)
    _write_owned(cfg / "registries.conf", REGISTRIES_CONF, ident)
    _write_owned(cfg / "policy.json", POLICY_JSON, ident)


def share_log(ident: Identity, root: Path = ROOT) -> None:
    """Let dev append to the Podman prep log: the API service started by a dev
    ``docker`` command writes its output there (reference 7.6)."""
    log = under(root, c.PODMAN_PREP_LOG)
    if log.exists():
        os.chown(log, ident.uid, ident.gid)
        os.chmod(log, 0o644)


def prep(genv: GuestEnv, ident: Identity, *, root: Path = ROOT, runner: Runner = run_tool,
         expand: Expand = glob.glob, euid: int | None = None) -> None:
    """The whole prep (root only): tools, kernel, idmap, storage and config."""
    if (os.geteuid() if euid is None else euid) != 0:
        raise GuestError("libkrun container storage bootstrap must run as root")
    require_tools("blkid", "mount", "findmnt", "podman")
    engine = discover_engine()
    kernel(root)
    idmap(ident, root=root, runner=runner)
    storage(genv, ident, engine, root=root, runner=runner, expand=expand)
    share_log(ident, root)
