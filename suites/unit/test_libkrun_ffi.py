"""The libkrun helper's ctypes binding against a recording C double of libkrun.so.

The helper runs as the real hidden command (``__agentbox_microvm_enter``) in a
child process, loading the double through AGENTBOX_LIBKRUN_LIBRARY."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentbox_guest_init.contract import ATTACH_VSOCK_PORT
from agentbox_guest_init.launch_config import LaunchConfig, LaunchDisk, encode

HERE = Path(__file__).parent
REPO = HERE.parent.parent

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the libkrun double")


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fakekrun") / "libkrun-fake.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(out), str(HERE / "fake_libkrun.c")],
                   check=True, capture_output=True, timeout=60)
    return out


CFG = LaunchConfig(task_rootfs="/t/rootfs", workspace_source="/home/u/proj", workspace_tag="agentbox-workspace",
                   workspace_target="/workspace", ram_mib=4096, vcpus=2, workdir="/workspace",
                   exec_path="/nix/store/x-agentbox/bin/agentbox-guest-init",
                   disks=(LaunchDisk("agentbox-nix", "/s/microvm-nix.raw"),
                          LaunchDisk("agentbox-containers", "/s/microvm-containers.raw")),
                   argv=("agentbox-guest-init", "microvm", "enter", "--", "fish", "-l"),
                   env=("AGENTBOX_HOST_UID=1000", "AGENTBOX_HOST_GID=1000"))

EXPECTED = [
    "krun_create_ctx",
    "krun_set_log_level 0",
    "krun_set_vm_config 7 2 4096",
    "krun_set_root 7 /t/rootfs",
    "krun_add_disk 7 agentbox-nix /s/microvm-nix.raw 0",
    "krun_add_disk 7 agentbox-containers /s/microvm-containers.raw 0",
    "krun_set_port_map 7 (empty)",
    "krun_disable_implicit_console 7",
    "krun_add_virtio_console_default 7 0 1 2",
    "krun_add_virtiofs3 7 agentbox-workspace /home/u/proj 0 0",
    "krun_set_workdir 7 /workspace",
    "krun_set_exec 7 /nix/store/x-agentbox/bin/agentbox-guest-init agentbox-guest-init microvm enter -- fish -l"
    " | AGENTBOX_HOST_UID=1000 AGENTBOX_HOST_GID=1000",
    "krun_start_enter 7",
]


def run_helper(tmp_path: Path, lib: Path, workspace: Path | None = None,
               **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the helper; the workspace path it hands libkrun (always the source path itself: as root
    the id-mapped export is attached there in the helper's private mount namespace) is written
    ``/home/u/proj`` in the calls returned."""
    if workspace is None:
        workspace = tmp_path / "proj"
        workspace.mkdir(exist_ok=True)
    conf = tmp_path / "launch.conf"
    conf.write_text(encode(dataclasses.replace(CFG, workspace_source=str(workspace))))
    log = tmp_path / "calls.log"
    full = {**os.environ, "AGENTBOX_LIBKRUN_LIBRARY": str(lib), "FAKE_KRUN_LOG": str(log), **env}
    proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "__agentbox_microvm_enter", str(conf)],
                          cwd=REPO, env=full, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    exported = re.escape(str(workspace))
    return proc, [re.sub(f"(krun_add_virtiofs3 7 agentbox-workspace ){exported} ", r"\1/home/u/proj ", c)
                  for c in calls]


def test_exact_call_order_and_guest_status(tmp_path: Path, fake_lib: Path) -> None:
    proc, calls = run_helper(tmp_path, fake_lib, FAKE_KRUN_EXIT="3")
    assert calls == EXPECTED, proc.stderr
    # 12 distinct libkrun entry points (add_disk twice for two disks), an empty port map (no inbound
    # publishing), no krun_set_env, no passt APIs
    assert len(calls) == 13 and not any("set_env" in c or "passt" in c for c in calls)
    assert proc.returncode == 3


@pytest.mark.parametrize("failing", ["krun_set_vm_config", "krun_add_disk", "krun_set_exec"])
def test_setup_failure_frees_context(tmp_path: Path, fake_lib: Path, failing: str) -> None:
    proc, calls = run_helper(tmp_path, fake_lib, FAKE_KRUN_FAIL=failing)
    assert proc.returncode == 1
    assert f"libkrun setup failed: {failing} returned -22" in proc.stderr
    assert calls[-1] == "krun_free_ctx 7"
    assert calls[-2].startswith(failing) and "krun_start_enter 7" not in calls


def test_create_ctx_failure(tmp_path: Path, fake_lib: Path) -> None:
    proc, calls = run_helper(tmp_path, fake_lib, FAKE_KRUN_FAIL="krun_create_ctx")
    assert proc.returncode == 1 and "libkrun setup failed: create ctx" in proc.stderr
    assert calls == ["krun_create_ctx"]


def test_start_failure(tmp_path: Path, fake_lib: Path) -> None:
    proc, calls = run_helper(tmp_path, fake_lib, FAKE_KRUN_FAIL="krun_start_enter")
    assert proc.returncode == 1
    assert "libkrun start failed: krun_start_enter returned -22" in proc.stderr
    assert calls == EXPECTED


def test_the_attach_channel_is_a_listening_vsock_port_on_the_socket_asked_for(tmp_path: Path, fake_lib: Path) -> None:
    sock = str(tmp_path / "attach.sock")
    proc, calls = run_helper(tmp_path, fake_lib, AGENTBOX_MICROVM_ATTACH_SOCKET=sock)
    assert calls == [*EXPECTED[:-1], f"krun_add_vsock_port2 7 {ATTACH_VSOCK_PORT} {sock} 1", "krun_start_enter 7"], \
        proc.stderr


def test_a_libkrun_that_refuses_the_attach_channel_still_starts_the_guest(tmp_path: Path, fake_lib: Path) -> None:
    proc, calls = run_helper(tmp_path, fake_lib, AGENTBOX_MICROVM_ATTACH_SOCKET=str(tmp_path / "a.sock"),
                             FAKE_KRUN_FAIL="krun_add_vsock_port2", FAKE_KRUN_EXIT="0")
    assert calls[-1] == "krun_start_enter 7" and "krun_free_ctx 7" not in calls
    assert proc.returncode == 0
    assert "krun_add_vsock_port2 returned -22; the guest starts without an `agentbox attach` channel" in proc.stderr


def test_missing_library_names_it(tmp_path: Path) -> None:
    proc, calls = run_helper(tmp_path, tmp_path / "nope.so")
    assert proc.returncode == 1 and f"failed to load {tmp_path / 'nope.so'}" in proc.stderr
    assert calls == []


def test_unreadable_launch_config(tmp_path: Path, fake_lib: Path) -> None:
    env = {**os.environ, "AGENTBOX_LIBKRUN_LIBRARY": str(fake_lib)}
    proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "__agentbox_microvm_enter", str(tmp_path / "x")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"failed to read microvm launch config '{tmp_path / 'x'}'" in proc.stderr


def test_the_workspace_reaches_libkrun_id_mapped_and_under_the_share_filter(tmp_path: Path, fake_lib: Path) -> None:
    """The file server runs in the helper: a setuid file, a setgid chmod and a device node are refused
    there; as root the workspace is the id-mapped export (owner seen as dev, dev's files land as the owner)."""
    workspace = tmp_path / "owned-by-someone"
    workspace.mkdir()
    root = os.geteuid() == 0
    if root:
        os.chown(workspace, 4242, 4343)
    proc, calls = run_helper(tmp_path, fake_lib, workspace, FAKE_KRUN_SHARE_PROBE="1")
    assert proc.returncode == 0, proc.stderr
    probe = dict(c.split(" ", 1) for c in calls if c.startswith("share-"))
    assert probe["share-root"] == "directory", "opened O_PATH|O_NOFOLLOW as libkrun does, the share is the tree"
    assert str(workspace) not in Path("/proc/self/mountinfo").read_text(), "the attach stays in the helper"
    assert probe["share-create-setuid"] == "Operation not permitted"
    assert probe["share-chmod-setgid"] == "Operation not permitted"
    assert probe["share-mknod-char"] == "Operation not permitted"
    assert probe["share-create-plain"] == "created"
    assert not (workspace / "suid").exists() and not (workspace / "null").exists()
    assert (workspace / "plain").stat().st_mode & 0o6000 == 0
    if root:
        assert probe["share-owner"] == "1000 1000"
        assert probe["share-chown-dev"] == "done"
        st = (workspace / "plain").stat()
        assert (st.st_uid, st.st_gid) == (4242, 4343)
