"""Rootless Podman prep (7.6): engine discovery, config files, subids, kernel knobs, real-podman lookup."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from agentbox_guest_init import contract as c
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.identity import Identity
from agentbox_guest_init.podman_prep import (POLICY_JSON, REGISTRIES_CONF, check_subids, containers_conf, discover_engine,
                                    kernel, rewrite_subids, storage, storage_conf)
from agentbox_guest_init.podman_service import is_wrapper, real_podman, service_env

from .conftest import Recorder

WRAPPERS = Path(__file__).resolve().parents[3] / "agentbox_guest_init/wrappers"


def exe(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def test_engine_discovery_prefers_helper_dirs_and_falls_back_to_runc(tmp_path: Path) -> None:
    lib, libexec, bin_ = tmp_path / "usr/lib/podman", tmp_path / "usr/libexec/podman", tmp_path / "bin"
    exe(lib / "netavark"), exe(lib / "aardvark-dns"), exe(libexec / "catatonit")
    on_path = {"conmon": exe(bin_ / "conmon"), "runc": exe(bin_ / "runc"), "pasta": exe(bin_ / "pasta")}
    engine = discover_engine(dirs=(str(libexec), str(lib)), which=on_path.get)
    assert (engine.conmon, engine.runtime, engine.runtime_path) == (on_path["conmon"], "runc", on_path["runc"])
    assert engine.helper_dirs == (str(lib), str(bin_), str(libexec), c.IDMAP_BIN_DIR)
    conf = tomllib.loads(containers_conf(engine))
    assert conf["containers"] == {"cgroups": "disabled"}
    assert conf["engine"]["runtime"] == "runc" and conf["engine"]["runtimes"] == {"runc": [on_path["runc"]]}
    assert conf["engine"]["conmon_path"] == [on_path["conmon"]]
    assert conf["engine"]["cgroup_manager"] == "cgroupfs" and conf["engine"]["events_logger"] == "file"
    assert conf["network"] == {"network_backend": "netavark"}


def test_engine_uses_crun_when_present(tmp_path: Path) -> None:
    tools = {"conmon": exe(tmp_path / "conmon"), "crun": exe(tmp_path / "crun"), "runc": exe(tmp_path / "runc")}
    engine = discover_engine(dirs=(), which=tools.get)
    assert (engine.runtime, engine.netavark) == ("crun", False)
    assert "network" not in tomllib.loads(containers_conf(engine))


def test_engine_needs_conmon_and_a_runtime(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="rootless Podman needs conmon"):
        discover_engine(dirs=(), which=lambda n: None)
    with pytest.raises(GuestError, match="neither crun nor runc is on PATH"):
        discover_engine(dirs=(), which={"conmon": "/usr/bin/conmon"}.get)


def test_static_config_files_parse() -> None:
    assert tomllib.loads(storage_conf(Identity(1234, 1234, "/bin/sh"))) == {"storage": {
        "driver": "btrfs", "graphroot": "/home/dev/.local/share/containers/storage",
        "runroot": "/run/user/1234/containers"}}
    reg = tomllib.loads(REGISTRIES_CONF)["registries"]
    assert reg == {"search": {"registries": ["docker.io"]}, "insecure": {"registries": []},
                   "block": {"registries": []}}
    import json

    policy = json.loads(POLICY_JSON)
    assert policy["default"] == [{"type": "insecureAcceptAnything"}]
    assert policy["transports"]["docker-daemon"][""] == [{"type": "insecureAcceptAnything"}]


@pytest.mark.parametrize("uid,gid,who,value", [(100000, 1000, "dev-uid", 100000), (1000, 165535, "dev-gid", 165535)])
def test_subid_overlap_is_refused(uid: int, gid: int, who: str, value: int) -> None:
    with pytest.raises(GuestError, match=f"^subordinate ID range 100000:65536 overlaps {who} id {value}$"):
        check_subids(uid, gid)


@pytest.mark.parametrize("outside,inside", [(99999, 100000), (165536, 165535)])
def test_subids_outside_the_range_pass(outside: int, inside: int) -> None:
    """The ids just outside 100000:65536 pass, as uid and as gid, while their neighbours inside are
    refused: the check's edges are exactly the range's."""
    for uid, gid in ((outside, 1000), (1000, outside), (outside, outside)):
        assert check_subids(uid, gid) is None
    for uid, gid, who in ((inside, 1000, "dev-uid"), (1000, inside, "dev-gid")):
        with pytest.raises(GuestError, match=f"overlaps {who} id {inside}$"):
            check_subids(uid, gid)


def test_rewrite_subids(tmp_path: Path) -> None:
    p = tmp_path / "subuid"
    p.write_text("alice:200000:65536\ndev:1:2\n")
    rewrite_subids(p)
    assert p.read_text() == "alice:200000:65536\ndev:100000:65536\n"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    missing = tmp_path / "subgid"
    rewrite_subids(missing)
    assert missing.read_text() == "dev:100000:65536\n"


def proc_tree(root: Path, userns: str | None = "15000", clone: str | None = "0", tun: bool = True) -> None:
    if userns is not None:
        (root / "proc/sys/user").mkdir(parents=True)
        (root / "proc/sys/user/max_user_namespaces").write_text(userns + "\n")
    if clone is not None:
        (root / "proc/sys/kernel").mkdir(parents=True)
        (root / "proc/sys/kernel/unprivileged_userns_clone").write_text(clone + "\n")
    if tun:
        (root / "dev/net").mkdir(parents=True)
        (root / "dev/net/tun").write_text("")
        os.chmod(root / "dev/net/tun", 0o600)


def test_kernel_raises_userns_and_opens_tun(tmp_path: Path) -> None:
    proc_tree(tmp_path)
    kernel(tmp_path)
    assert (tmp_path / "proc/sys/user/max_user_namespaces").read_text() == "28633\n"
    assert (tmp_path / "proc/sys/kernel/unprivileged_userns_clone").read_text() == "1\n"
    assert stat.S_IMODE((tmp_path / "dev/net/tun").stat().st_mode) == 0o666


def test_kernel_keeps_higher_userns(tmp_path: Path) -> None:
    proc_tree(tmp_path, userns="63000", clone=None)
    kernel(tmp_path)
    assert (tmp_path / "proc/sys/user/max_user_namespaces").read_text() == "63000\n"


def test_kernel_errors(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="^kernel does not expose /proc/sys/user/max_user_namespaces user namespace"):
        kernel(tmp_path)
    proc_tree(tmp_path, tun=False)
    with pytest.raises(GuestError, match="^rootless container runtime TUN device is missing at /dev/net/tun; "
                                         "ensure host /dev/net/tun is passed into the libkrun guest$"):
        kernel(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the dev uid needs root")
def test_storage_mounts_once_and_writes_owned_configs(tmp_path: Path) -> None:
    ident = Identity(1234, 2345, "/usr/bin/fish")
    engine = discover_engine(dirs=(), which={"conmon": "/usr/bin/conmon", "crun": "/usr/bin/crun"}.get)

    def answer(argv: list[str]) -> tuple[int, str, str]:
        if argv[0] == "findmnt":
            return 1, "", ""
        if argv[0] == "blkid":
            return (0, "AGENTBOX_CONTAINERS\n", "") if argv[-1] == "/dev/vdb" else (2, "", "")
        return 0, "", ""

    r = Recorder(fallback=answer)
    storage(GuestEnv(), ident, engine, root=tmp_path, runner=r, expand=lambda p: [])
    mnt = tmp_path / "home/dev/.local/share/containers"
    assert ["mount", "-t", "btrfs", "/dev/vdb", str(mnt)] in r.calls
    cfg = tmp_path / "home/dev/.config/containers"
    for name in ("storage.conf", "containers.conf", "registries.conf", "policy.json"):
        st = (cfg / name).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o644), name
    run_dir = tmp_path / "run/user/1234"
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700 and run_dir.stat().st_uid == 1234
    assert (mnt / "storage").stat().st_uid == 1234


def test_storage_tolerates_a_lost_mount_race(tmp_path: Path) -> None:
    from agentbox_guest_init.podman_prep import mount_storage

    findmnt = iter([1, 0])  # not mounted before, mounted (by the other racer) after our mount failed
    r = Recorder({("blkid",): (0, "AGENTBOX_CONTAINERS\n", ""), ("mount",): (32, "", "busy")},
                 fallback=lambda argv: (next(findmnt), "", ""))
    mount_storage(GuestEnv(), tmp_path, runner=r, expand=lambda p: [])
    failing = Recorder({("blkid",): (0, "AGENTBOX_CONTAINERS\n", ""), ("mount",): (32, "", "busy"),
                        ("findmnt",): (1, "", "")})
    with pytest.raises(GuestError, match="^failed to mount libkrun container storage btrfs disk: busy$"):
        mount_storage(GuestEnv(), tmp_path, runner=failing, expand=lambda p: [])


def test_the_podman_and_docker_wrappers_are_detected() -> None:
    assert is_wrapper(str(WRAPPERS / "podman")) and is_wrapper(str(WRAPPERS / "docker"))
    assert not is_wrapper("/bin/sh")


def test_real_podman_skips_wrappers(tmp_path: Path) -> None:
    wrap_dir, real_dir = tmp_path / "wrap", tmp_path / "real"
    wrap_dir.mkdir()
    (wrap_dir / "podman").write_bytes((WRAPPERS / "podman").read_bytes())
    (wrap_dir / "podman").chmod(0o755)
    real = exe(real_dir / "podman")
    assert real_podman({"PATH": f"{wrap_dir}:{real_dir}"}) == real
    with pytest.raises(GuestError, match="^could not find real podman binary; set AGENTBOX_REAL_PODMAN"):
        real_podman({"PATH": str(wrap_dir)})
    with pytest.raises(GuestError, match=f"^refusing to start Podman API service through compatibility wrapper "
                                         f"{wrap_dir}/podman$"):
        real_podman({c.ENV_REAL_PODMAN: f"{wrap_dir}/podman"})
    assert real_podman({c.ENV_REAL_PODMAN: real, "PATH": ""}) == real


def test_service_env_is_cleared_and_keeps_certificates() -> None:
    env = service_env(Identity(1234, 1234, "/usr/bin/fish"),
                      {"PATH": "/usr/bin", "SSL_CERT_FILE": "/etc/ssl/c.pem", "SECRET": "x", "LD_PRELOAD": "y"})
    assert env["PATH"] == "/run/agentbox/idmap-bin:/usr/bin" and env["SSL_CERT_FILE"] == "/etc/ssl/c.pem"
    assert env["XDG_RUNTIME_DIR"] == "/run/user/1234" and env["USER"] == "dev"
    assert "SECRET" not in env and "LD_PRELOAD" not in env and "NIX_SSL_CERT_FILE" not in env
