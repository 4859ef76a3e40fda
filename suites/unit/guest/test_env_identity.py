"""The env contract (7.3, 7.14), identity rules and the shell environment (7.9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentbox_guest_init import contract as c
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.identity import Identity, dev_identity, resolve_identity
from agentbox_guest_init.shell_env import nix_remote_env, shell_env


@pytest.mark.parametrize("value,expected", [("1", True), ("", False), ("0", False), ("true", False),
                                            ("yes", False), (" 1", False), ("1\n", False), ("01", False)])
def test_flags_are_true_only_for_exactly_1(value: str, expected: bool) -> None:
    env = {name: value for name in (c.ENV_NIX_OVERLAY, c.ENV_CONTAINERS_STORAGE, c.ENV_USE_PASST,
                                    c.ENV_ENTER_AS_ROOT, c.ENV_KVM_DROP_TO_DEV)}
    g = GuestEnv.parse(env)
    assert (g.nix_overlay, g.containers_storage, g.use_passt, g.enter_as_root, g.kvm_drop_to_dev) == (expected,) * 5
    assert g.libkrun_disks is expected


def test_defaults_for_disk_names_and_workspace() -> None:
    g = GuestEnv.parse({c.ENV_NIX_DISK_ID: "", c.ENV_CONTAINERS_DISK_LABEL: ""})
    assert (g.nix_disk_id, g.nix_disk_label) == ("agentbox-nix", "AGENTBOX_NIX")
    assert (g.containers_disk_id, g.containers_disk_label) == ("agentbox-containers", "AGENTBOX_CONTAINERS")
    assert (g.host_uid, g.host_gid, g.workspace_tag) == (None, None, None)
    assert (g.workspace_target, g.workspace_fstype) == ("/workspace", "")  # auto: the transport offering the tag


def test_explicit_values_are_taken() -> None:
    g = GuestEnv.parse({c.ENV_HOST_UID: "1234", c.ENV_HOST_GID: "4294967295", c.ENV_NIX_DISK_LABEL: "L",
                        c.ENV_MICROVM_WORKSPACE_FSTYPE: "9p", c.ENV_MICROVM_WORKSPACE_TAG: "ws"})
    assert (g.host_uid, g.host_gid, g.nix_disk_label, g.workspace_fstype, g.workspace_tag) == (
        1234, 4294967295, "L", "9p", "ws")


@pytest.mark.parametrize("bad", ["-1", "abc", "4294967296", "1.0", " 5", "١٢"])
def test_bad_host_ids_name_the_variable(bad: str) -> None:
    with pytest.raises(GuestError, match=f"^invalid numeric value in {c.ENV_HOST_GID}$"):
        GuestEnv.parse({c.ENV_HOST_GID: bad})


def test_root_needs_host_ids_for_libkrun() -> None:
    with pytest.raises(GuestError, match="^AGENTBOX_HOST_UID is required for libkrun guest init$"):
        resolve_identity(GuestEnv(host_gid=5), "fish", euid=0, egid=0)
    with pytest.raises(GuestError, match="^AGENTBOX_HOST_GID is required for libkrun guest init$"):
        resolve_identity(GuestEnv(host_uid=5), "fish", euid=0, egid=0)
    with pytest.raises(GuestError, match="^AGENTBOX_HOST_UID is required for microvm enter$"):
        resolve_identity(GuestEnv(), "fish", euid=0, egid=0, mode="microvm")


@pytest.mark.parametrize("uid,gid", [(0, 1000), (1000, 0), (0, 0)])
def test_root_host_ids_must_be_non_root(uid: int, gid: int) -> None:
    with pytest.raises(GuestError, match=f"^libkrun host UID/GID must identify the non-root dev user, got {uid}:{gid}$"):
        resolve_identity(GuestEnv(host_uid=uid, host_gid=gid), "fish", euid=0, egid=0)


def test_identity_as_root_and_not_as_root() -> None:
    g = GuestEnv(host_uid=1234, host_gid=2345)
    assert resolve_identity(g, "/bin/bash", euid=0, egid=0) == Identity(1234, 2345, "/bin/bash")
    # not root: the current ids win, host ids are ignored
    assert resolve_identity(g, "fish", euid=1500, egid=1600) == Identity(1500, 1600, "fish")


def test_dev_identity_prefers_contract_then_passwd_then_1000(tmp_path: Path) -> None:
    assert dev_identity(GuestEnv(), tmp_path) == Identity(1000, 1000, "/bin/sh")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\ndev:x:1500:1501:dev:/home/dev:/usr/bin/fish\n")
    assert dev_identity(GuestEnv(), tmp_path) == Identity(1500, 1501, "/usr/bin/fish")
    assert dev_identity(GuestEnv(host_uid=7, host_gid=8), tmp_path) == Identity(7, 8, "/usr/bin/fish")
    assert dev_identity(GuestEnv(host_uid=0, host_gid=8), tmp_path) == Identity(1500, 1501, "/usr/bin/fish")


def test_shell_env_without_storage() -> None:
    env = shell_env(Identity(1234, 1234, "/usr/bin/fish"), GuestEnv(), "/usr/bin:/bin")
    assert env == {"USER": "dev", "LOGNAME": "dev", "HOME": "/home/dev", "SHELL": "/usr/bin/fish",
                   "XDG_CONFIG_HOME": "/home/dev/.config", "XDG_DATA_HOME": "/home/dev/.local/share",
                   "XDG_STATE_HOME": "/home/dev/.local/state", "XDG_CACHE_HOME": "/home/dev/.cache",
                   "TMPDIR": "/home/dev/.cache/tmp"}


def test_shell_env_with_container_storage_points_docker_at_podman() -> None:
    env = shell_env(Identity(1234, 1234, "fish"), GuestEnv(containers_storage=True), "/usr/bin")
    assert env["XDG_RUNTIME_DIR"] == "/run/user/1234"
    assert env["PATH"] == "/run/agentbox/idmap-bin:/usr/bin"
    assert env["DOCKER_HOST"] == "unix:///run/user/1234/podman/podman.sock" == c.docker_host(1234)


def test_nix_remote_only_with_the_overlay() -> None:
    assert nix_remote_env(GuestEnv()) == {}
    assert nix_remote_env(GuestEnv(nix_overlay=True)) == {"NIX_REMOTE": "unix:///nix/var/nix/daemon-socket/socket"}
