"""The enter flows (7.2, 7.3, 7.13, 7.14): operation order, identity drop, exec, workspace mount.

The flows run for real against a tmp root; only the privilege drop, the
exec (both would end the test process) and the prep spawns are recorded.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest

from agentbox_guest_init import contract as c
from agentbox_guest_init.container import container_enter
from agentbox_guest_init.enter import Host, default_enter, enter, mount_workspace
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.identity import Identity

from .conftest import Recorder


class Exec(Exception):
    """Raised by the recorded exec so the flow stops where the real one would be replaced."""


class Guest:
    """A tmp guest root with the files the root steps touch, and recording boundaries."""

    def __init__(self, root: Path, euid: int = 0, mounts: str = "") -> None:
        self.root = root
        for d in ("etc", "proc/sys/kernel", "dev"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
        (root / "etc/resolv.conf").write_text("nameserver 10.0.2.3\n")
        (root / "proc/sys/kernel/dmesg_restrict").write_text("0\n")
        (root / "proc/mounts").write_text(mounts)
        (root / "dev/kvm").write_text("")
        self.events: list[Any] = []
        self.runner = Recorder()
        self.host = Host(root=root, euid=euid, egid=euid, runner=self.runner,
                         getrlimit=lambda: (1024, 4096), setrlimit=lambda v: self.events.append(("setrlimit", v)),
                         drop=lambda ident: self.events.append(("drop", ident)),
                         execvpe=self._exec, start_prep=lambda kind, env: self.events.append(("prep", kind.kind)),
                         cwd=lambda: "/", chdir=lambda p: None)
        self.exec_env: dict[str, str] = {}

    def _exec(self, cmd0: str, argv: list[str], env: dict[str, str]) -> None:
        self.events.append(("exec", argv))
        self.exec_env = env
        raise Exec()


def profile_rows(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err.splitlines()
    return [line.strip().split(":")[0] for line in err if line.startswith("  ")]


BASE = {c.ENV_HOST_UID: "1234", c.ENV_HOST_GID: "1234", c.ENV_GUEST_PROFILE: "1", c.ENV_GUEST_DEBUG: "1",
        "PATH": "/usr/bin:/bin"}


def test_libkrun_enter_operation_order_keeps_components_before_exec(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    g = Guest(tmp_path)
    env = {**BASE, c.ENV_NIX_OVERLAY: "1", c.ENV_CONTAINERS_STORAGE: "1", c.ENV_USE_PASST: "1"}
    with pytest.raises(Exec):
        enter("libkrun", ["sh", "-c", "true"], env, g.host)
    assert profile_rows(capsys) == [
        "read-env", "resolve-identity", "derive-shell-env", "export-shell-env", "materialize-home",
        "fix-passt-dns", "materialize-allocator-preload", "restrict-dmesg", "expose-kvm", "start-nix-prep",
        "start-podman-prep", "export-nix-remote", "ensure-nofile-floor", "total"]
    assert g.events == [("prep", "nix"), ("prep", "podman"), ("setrlimit", (524288, 524288)),
                        ("drop", Identity(1234, 1234, g.events[3][1].shell)), ("exec", ["sh", "-c", "true"])]
    e = g.exec_env
    assert e["DOCKER_HOST"] == "unix:///run/user/1234/podman/podman.sock"
    assert e["NIX_REMOTE"] == c.NIX_REMOTE_VALUE and e["HOME"] == "/home/dev"
    assert c.ENV_GUEST_PROFILE not in e and c.ENV_GUEST_DEBUG not in e
    assert (tmp_path / "etc/resolv.conf").read_text().startswith("nameserver 169.254.1.1\n")
    assert (tmp_path / "proc/sys/kernel/dmesg_restrict").read_text() == "1\n"
    assert "dev:x:1234:1234:dev user:/home/dev:" in (tmp_path / "etc/passwd").read_text()


def test_profile_needs_both_flags_to_print(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = Guest(tmp_path)
    with pytest.raises(Exec):
        enter("libkrun", ["true"], {**BASE, c.ENV_GUEST_DEBUG: ""}, g.host)
    assert capsys.readouterr().err == ""


def test_libkrun_shell_env_is_exported_before_podman_prep(tmp_path: Path) -> None:
    """libkrun_runtime_derives_parent_shell_environment_before_podman_prep."""
    g = Guest(tmp_path)
    seen: dict[str, str] = {}
    g.host.start_prep = lambda kind, env: seen.update(env)
    with pytest.raises(Exec):
        enter("libkrun", [], {**BASE, c.ENV_CONTAINERS_STORAGE: "1"}, g.host)
    assert seen["XDG_RUNTIME_DIR"] == "/run/user/1234" and seen[c.ENV_CONTAINERS_STORAGE] == "1"
    assert g.events[-1][1] == ["fish", "-l"]


def test_enter_as_root_stays_root(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    with pytest.raises(Exec):
        enter("libkrun", ["id"], {**BASE, c.ENV_ENTER_AS_ROOT: "1"}, g.host)
    assert [e[0] for e in g.events] == ["setrlimit", "exec"]


def test_not_root_skips_root_steps_and_the_drop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = Guest(tmp_path, euid=1500)
    with pytest.raises(Exec):
        enter("libkrun", ["id"], {c.ENV_GUEST_PROFILE: "1", c.ENV_GUEST_DEBUG: "1"}, g.host)
    assert profile_rows(capsys) == ["read-env", "resolve-identity", "derive-shell-env", "export-shell-env",
                                    "ensure-nofile-floor", "total"]
    assert [e[0] for e in g.events] == ["setrlimit", "exec"]
    assert (tmp_path / "proc/sys/kernel/dmesg_restrict").read_text() == "0\n"


def test_root_without_host_ids_fails_before_anything_is_written(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    with pytest.raises(GuestError, match="^AGENTBOX_HOST_UID is required for libkrun guest init$"):
        enter("libkrun", [], {c.ENV_NIX_OVERLAY: "1"}, g.host)
    assert g.events == [] and "dev" not in (tmp_path / "etc/passwd").read_text()


def test_planned_microvm_enter_mounts_workspace_before_identity_drop_and_exec(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = Guest(tmp_path)
    env = {**BASE, c.ENV_MICROVM_WORKSPACE_TAG: "agentbox-workspace", c.ENV_NIX_OVERLAY: "1",
           c.ENV_USE_PASST: "1"}
    with pytest.raises(Exec):
        enter("microvm", ["bash"], env, g.host)
    assert profile_rows(capsys) == [
        "read-env", "mount-workspace", "resolve-identity", "derive-shell-env", "export-shell-env",
        "materialize-home", "materialize-allocator-preload", "restrict-dmesg", "expose-kvm", "start-nix-prep",
        "export-nix-remote", "ensure-nofile-floor", "total"]
    assert g.runner.tools() == ["mount -t virtiofs agentbox-workspace /workspace"]
    assert (tmp_path / "workspace").is_dir()
    assert [e[0] for e in g.events] == ["prep", "setrlimit", "drop", "exec"]
    assert (tmp_path / "etc/resolv.conf").read_text() == "nameserver 10.0.2.3\n"  # no passt step in microvm


def test_microvm_identity_requires_host_ids_when_root_drops_to_dev(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    with pytest.raises(GuestError, match="^AGENTBOX_HOST_UID is required for microvm enter$"):
        enter("microvm", [], {c.ENV_MICROVM_WORKSPACE_TAG: "t"}, g.host)


def test_microvm_agent_as_root_needs_no_host_ids(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    with pytest.raises(Exec):
        enter("microvm", ["agentbox-guest-init", "agent"],
              {c.ENV_MICROVM_WORKSPACE_TAG: "t", c.ENV_ENTER_AS_ROOT: "1"}, g.host)
    assert [e[0] for e in g.events] == ["setrlimit", "exec"]
    assert g.exec_env["HOME"] == "/home/dev"  # the dev env describes dev; the process stays root


def test_microvm_env_requires_workspace_tag_and_absolute_target(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    with pytest.raises(GuestError, match="^AGENTBOX_MICROVM_WORKSPACE_TAG is required for microvm enter$"):
        mount_workspace(GuestEnv(), g.host)
    with pytest.raises(GuestError, match="^AGENTBOX_MICROVM_WORKSPACE_TARGET must be an absolute path$"):
        mount_workspace(GuestEnv(workspace_tag="t", workspace_target="ws"), g.host)
    (tmp_path / "file").write_text("")
    with pytest.raises(GuestError, match="^microvm workspace target /file exists and is not a directory$"):
        mount_workspace(GuestEnv(workspace_tag="t", workspace_target="/file"), g.host)


def test_microvm_env_accepts_libkrun_disk_compatibility_bridge() -> None:
    g = GuestEnv.parse({c.ENV_MICROVM_WORKSPACE_TAG: "t", c.ENV_NIX_OVERLAY: "1", c.ENV_NIX_DISK_LABEL: "L"})
    assert g.nix_overlay and g.nix_disk_label == "L" and g.workspace_tag == "t"


def test_workspace_mount_is_idempotent_for_same_virtiofs_tag(tmp_path: Path) -> None:
    g = Guest(tmp_path, mounts="t /workspace virtiofs rw 0 0\n")
    assert mount_workspace(GuestEnv(workspace_tag="t"), g.host) is False
    assert g.runner.calls == []


def test_workspace_mounted_from_something_else_is_refused(tmp_path: Path) -> None:
    g = Guest(tmp_path, mounts="t /workspace 9p rw 0 0\n")
    with pytest.raises(GuestError, match="^microvm workspace target /workspace is already mounted from t as 9p, "
                                         "not virtiofs tag t$"):
        mount_workspace(GuestEnv(workspace_tag="t"), g.host)


def test_workspace_over_9p_uses_virtio_transport_options(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    assert mount_workspace(GuestEnv(workspace_tag="ws", workspace_fstype="9p", workspace_target="/w"), g.host)
    assert g.runner.calls == [["mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,msize=262144,access=client",
                               "ws", "/w"]]
    g2 = Guest(tmp_path / "again", mounts="ws /w 9p rw 0 0\n")
    assert mount_workspace(GuestEnv(workspace_tag="ws", workspace_fstype="9p", workspace_target="/w"), g2.host) is False


def test_workspace_mount_failure(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    g.host.runner = Recorder({("mount",): (32, "", "mount: unknown filesystem type 'virtiofs'")})
    with pytest.raises(GuestError, match="^failed to mount microvm workspace virtiofs tag t: mount: unknown"):
        mount_workspace(GuestEnv(workspace_tag="t"), g.host)


def test_empty_command_resolves_to_fish_login_shell(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    with pytest.raises(Exec):
        enter("libkrun", [], BASE, g.host)
    assert g.events[-1] == ("exec", ["fish", "-l"])


@pytest.mark.parametrize("env,mode", [({c.ENV_NIX_OVERLAY: "1"}, "libkrun"), ({c.ENV_CONTAINERS_STORAGE: "1"}, "libkrun"),
                                      ({c.ENV_NIX_OVERLAY: "", c.ENV_CONTAINERS_STORAGE: "0"}, "container"), ({}, "container")])
def test_default_guest_init_dispatches_libkrun_before_container_fallback(env: dict[str, str], mode: str) -> None:
    calls: list[tuple[str, list[str]]] = []
    default_enter(["bash", "-x"], ["/bin/agentbox-guest-init"], env, lambda p, a: calls.append((p, a)))
    assert calls == [("/bin/agentbox-guest-init", ["/bin/agentbox-guest-init", mode, "enter", "--", "bash", "-x"])]


def test_container_enter_never_dispatches_to_libkrun(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    with pytest.raises(Exec):
        container_enter(["bash"], {c.ENV_NIX_OVERLAY: "1", c.ENV_CONTAINERS_STORAGE: "1"}, g.host)
    assert g.events == [("exec", ["bash"])]  # root, not the login shell, no KVM flag: no drop, no prep


def test_container_enter_drops_the_login_shell_to_dev(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = Guest(tmp_path)
    with pytest.raises(Exec):
        container_enter([], {**BASE}, g.host)
    assert [e[0] for e in g.events] == ["drop", "exec"]
    assert g.events[0][1].uid == 1234
    assert "materialize-dev-identity" in profile_rows(capsys)


def test_container_enter_kvm_drop_needs_host_ids(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    with pytest.raises(GuestError, match="^agentbox-guest-init container enter: AGENTBOX_HOST_UID and "
                                         "AGENTBOX_HOST_GID are required for KVM task mode$"):
        container_enter(["bash"], {c.ENV_KVM_DROP_TO_DEV: "1"}, g.host)


def test_container_enter_nss_wrapper_env(tmp_path: Path) -> None:
    g = Guest(tmp_path, euid=1234)
    (tmp_path / "tmp").mkdir()
    with pytest.raises(Exec):
        container_enter(["bash"], {c.ENV_NSS_WRAPPER_LIB: "/lib/libnss_wrapper.so", "LD_PRELOAD": "/old.so"}, g.host)
    e = g.exec_env
    assert e["LD_PRELOAD"] == "/lib/libnss_wrapper.so:/old.so"
    passwd = tmp_path / e["NSS_WRAPPER_PASSWD"].lstrip("/")
    assert "dev:x:1234:1234:dev user:/home/dev:" in passwd.read_text()
    assert oct(passwd.stat().st_mode & 0o777) == oct(0o600)
    assert os.path.basename(e["NSS_WRAPPER_GROUP"]) == "group"


def _ninep_device(root: Path, name: str, tag: str) -> None:
    dev = root / "sys/bus/virtio/drivers/9pnet_virtio" / name
    dev.mkdir(parents=True)
    (dev / "mount_tag").write_bytes(tag.encode() + b"\0")


def test_workspace_transport_is_9p_when_a_9p_device_offers_the_tag(tmp_path: Path) -> None:
    _ninep_device(tmp_path, "virtio3", "agentbox-root")
    _ninep_device(tmp_path, "virtio4", "ws")
    g = Guest(tmp_path)
    assert mount_workspace(GuestEnv(workspace_tag="ws", workspace_target="/w"), g.host)
    assert g.runner.calls[0][:3] == ["mount", "-t", "9p"]


def test_workspace_transport_is_virtiofs_when_no_9p_device_offers_the_tag(tmp_path: Path) -> None:
    _ninep_device(tmp_path, "virtio3", "agentbox-root")
    g = Guest(tmp_path)
    assert mount_workspace(GuestEnv(workspace_tag="ws", workspace_target="/w"), g.host)
    assert g.runner.calls == [["mount", "-t", "virtiofs", "ws", "/w"]]


def test_our_own_agent_is_served_in_process_instead_of_exec(tmp_path: Path) -> None:
    from agentbox_guest_init.enter import own_agent

    assert own_agent(["agentbox-guest-init", "agent"]) == (None, None)
    assert own_agent(["/usr/local/bin/agentbox-guest-init", "agent", "--port", "org.agentbox.agent"]) == \
        (None, "org.agentbox.agent")
    assert own_agent(["agentbox-guest-init", "agent", "--device", "/dev/vport0p1"]) == ("/dev/vport0p1", None)
    assert own_agent(["agentbox-guest-init", "agent", "--bogus"]) is None
    assert own_agent(["sh", "agent"]) is None and own_agent(["fish", "-l"]) is None
    g = Guest(tmp_path)
    served: list[object] = []
    g.host.serve_agent = lambda where, env: served.append((where, env["HOME"]))
    enter("microvm", ["agentbox-guest-init", "agent"], {c.ENV_MICROVM_WORKSPACE_TAG: "t", c.ENV_ENTER_AS_ROOT: "1"},
          g.host)
    assert served == [((None, None), "/home/dev")]
    assert "exec" not in [e[0] for e in g.events]


def test_the_hardened_profile_confines_the_dev_shell_around_the_drop(tmp_path: Path) -> None:
    g = Guest(tmp_path)
    (tmp_path / "home/dev").mkdir(parents=True)
    g.host.harden_before_drop = lambda: g.events.append(("harden",))
    g.host.confine = lambda: g.events.append(("confine",))
    with pytest.raises(Exec):
        enter("libkrun", ["sh"], {**BASE, c.ENV_HARDENED: "1"}, g.host)
    assert [e[0] for e in g.events] == ["setrlimit", "harden", "drop", "confine", "exec"]
    assert g.runner.tools()[-1] == f"mount -o remount,bind,ro {tmp_path}"


def test_without_the_flag_or_as_root_nothing_is_confined(tmp_path: Path) -> None:
    for env in (BASE, {**BASE, c.ENV_HARDENED: "1", c.ENV_ENTER_AS_ROOT: "1"}):
        g = Guest(tmp_path)
        g.host.harden_before_drop = functools.partial(g.events.append, ("harden",))
        g.host.confine = functools.partial(g.events.append, ("confine",))
        with pytest.raises(Exec):
            enter("libkrun", ["sh"], env, g.host)
        assert not any(e[0] in ("harden", "confine") for e in g.events)


def test_the_hardened_profile_starts_no_podman_prep(tmp_path: Path) -> None:
    """Nested Podman needs user namespaces, which the profile refuses: its prep is not started, and the
    readiness gate (which reads the same env) does not wait for it."""
    g = Guest(tmp_path)
    (tmp_path / "home/dev").mkdir(parents=True)
    g.host.harden_before_drop = lambda: None
    g.host.confine = lambda: None
    with pytest.raises(Exec):
        enter("libkrun", ["sh"], {**BASE, c.ENV_HARDENED: "1", c.ENV_NIX_OVERLAY: "1", c.ENV_CONTAINERS_STORAGE: "1"},
              g.host)
    assert ("prep", "podman") not in g.events and ("prep", "nix") in g.events
    assert g.exec_env[c.ENV_CONTAINERS_STORAGE] == "0"


def test_the_nss_wrapper_files_are_written_only_into_a_directory_of_ours(tmp_path: Path) -> None:
    from agentbox_guest_init.container import materialize_nss_wrapper
    from agentbox_guest_init.errors import GuestError

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    ident = Identity(1234, 1234, "/bin/sh")
    paths = materialize_nss_wrapper(ident, True, tmp_path, 77)
    assert paths == {"passwd": "/tmp/agentbox-nss.77/passwd", "group": "/tmp/agentbox-nss.77/group"}
    assert "dev:x:1234:1234:" in (tmp_path / "tmp/agentbox-nss.77/passwd").read_text()
    assert materialize_nss_wrapper(ident, True, tmp_path, 77) == paths  # our own directory is reused
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "tmp/agentbox-nss.78").symlink_to(elsewhere)
    with pytest.raises(GuestError, match="refusing .*agentbox-nss.78 for the nss wrapper files"):
        materialize_nss_wrapper(ident, True, tmp_path, 78)
    assert list(elsewhere.iterdir()) == []
