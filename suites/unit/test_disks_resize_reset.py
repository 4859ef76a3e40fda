"""Raw disk prepare/validate/grow, live-disk probe, resize and reset-nix with recorded tools."""

import subprocess
from collections.abc import Sequence
import os
from pathlib import Path

import pytest

from agentbox_runtime import disks
from agentbox_runtime.errors import AgentboxError, InputError
from agentbox_runtime.live_disks import refuse_if_live, users_of
from agentbox_runtime.reset import reset_nix
from agentbox_runtime.resize import GuestStepFailed, ResizePlan, resize


class Tools:
    """Records tool calls; mkfs succeeds (or fails), blkid answers ``fstype``."""

    def __init__(self, fstype: str = "btrfs", mkfs_rc: int = 0, label: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fstype, self.mkfs_rc, self.label = fstype, mkfs_rc, label

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        if argv[0] == "mkfs.btrfs":
            return subprocess.CompletedProcess(argv, self.mkfs_rc, "", "boom" if self.mkfs_rc else "")
        if "LABEL" in argv:  # the label mkfs gave the image (by its file name) unless told otherwise
            label = self.label or ("AGENTBOX_CONTAINERS" if "containers" in argv[-1] else "AGENTBOX_NIX")
            return subprocess.CompletedProcess(argv, 0, label + "\n", "")
        return subprocess.CompletedProcess(argv, 0, self.fstype + "\n", "")


class Containers:
    def __init__(self, data: dict[str, dict[str, str]] | None = None, fail: bool = False) -> None:
        self.data, self.fail, self.asked = data or {}, fail, 0

    def annotations(self, operation: str) -> dict[str, dict[str, str]]:
        self.asked += 1
        if self.fail:
            raise AgentboxError(f"failed to list running Podman containers before libkrun {operation}")
        return self.data


class Runner:
    def __init__(self, status: int = 0) -> None:
        self.status, self.plans = status, []  # type: ignore[var-annotated]

    def run(self, plan: ResizePlan) -> int:
        self.plans.append(plan)
        return self.status


def test_missing_image_creates_sparse_file_and_formats_with_label(tmp_path: Path) -> None:
    tools = Tools()
    assert disks.prepare(disks.LIBKRUN_NIX, tmp_path, tools) is disks.Outcome.CREATED
    path = tmp_path / "libkrun-nix.raw"
    assert path.stat().st_size == 64 << 30
    assert path.stat().st_blocks * 512 < 1 << 20
    assert tools.calls == [["mkfs.btrfs", "-f", "-L", "AGENTBOX_NIX", str(path)]]


def test_existing_valid_image_is_reused_without_formatting(tmp_path: Path) -> None:
    path = tmp_path / "libkrun-containers.raw"
    path.write_bytes(b"")
    import os
    os.truncate(path, 64 << 30)
    tools = Tools()
    assert disks.prepare(disks.LIBKRUN_CONTAINERS, tmp_path, tools) is disks.Outcome.REUSED
    assert [c[0] for c in tools.calls] == ["blkid"]


def test_invalid_images_are_refused_never_reformatted(tmp_path: Path) -> None:
    path = tmp_path / "libkrun-nix.raw"
    path.mkdir()
    tools = Tools()
    with pytest.raises(InputError, match="is not a regular file; refusing to overwrite it"):
        disks.prepare(disks.LIBKRUN_NIX, tmp_path, tools)
    path.rmdir()
    path.write_bytes(b"x")
    with pytest.raises(InputError, match="is 1 bytes, below the required 68719476736 bytes"):
        disks.prepare(disks.LIBKRUN_NIX, tmp_path, tools)
    assert tools.calls == []  # size checked before any probe
    import os
    os.truncate(path, 64 << 30)
    with pytest.raises(InputError, match="has filesystem type 'ext4', expected btrfs"):
        disks.prepare(disks.LIBKRUN_NIX, tmp_path, Tools("ext4"))
    with pytest.raises(InputError, match="'unknown'"):
        disks.prepare(disks.LIBKRUN_NIX, tmp_path, Tools(""))
    assert all(c[0] != "mkfs.btrfs" for c in tools.calls)


def test_mkfs_failure_deletes_the_new_file(tmp_path: Path) -> None:
    with pytest.raises(AgentboxError, match="failed to format new libkrun /nix raw image"):
        disks.prepare(disks.LIBKRUN_NIX, tmp_path, Tools(mkfs_rc=1))
    assert not (tmp_path / "libkrun-nix.raw").exists()


def test_container_diag_does_not_say_nix() -> None:
    assert "/nix" not in disks.LIBKRUN_CONTAINERS.diag


def test_live_probe_matches_exact_krun_disk_paths() -> None:
    annos = {"krun.disk.0.path": "/a.raw", "krun.disk.1.id": "x", "other": "/b.raw"}
    running = {"c1": annos, "c2": {"krun.disk.3.path": "/b.raw"}, "c3": {"x.path": "/a.raw"}}
    assert users_of(Path("/a.raw"), running) == ["c1"]
    assert users_of(Path("/b.raw"), running) == ["c2"]
    with pytest.raises(AgentboxError, match=r"refusing to resize libkrun raw image '/a.raw' while "
                                            r"running Podman container\(s\) use it: c1"):
        refuse_if_live(Path("/a.raw"), "resize", Containers(running))


def test_live_probe_fails_closed() -> None:
    with pytest.raises(AgentboxError, match="before libkrun reset"):
        refuse_if_live(Path("/a.raw"), "reset", Containers(fail=True))


def _image(tmp_path: Path, name: str = "libkrun-nix.raw") -> Path:
    p = tmp_path / name
    p.write_bytes(b"")
    import os
    os.truncate(p, 64 << 30)
    return p


def test_resize_grows_sparse_then_runs_guest_step(tmp_path: Path) -> None:
    path = _image(tmp_path)
    runner = Runner()
    plan = resize("nix", 128 << 30, tmp_path, runner, containers=Containers(), tools=Tools())
    assert path.stat().st_size == 128 << 30 and plan.old_size == 64 << 30
    assert runner.plans == [plan]


def test_resize_refuses_shrink_equal_missing_live(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist; run agentbox libkrun once"):
        resize("containers", 128 << 30, tmp_path, Runner(), containers=Containers(), tools=Tools())
    path = _image(tmp_path)
    for size in (64 << 30, 32 << 30):
        with pytest.raises(InputError, match="shrinking and equal-size resize are refused"):
            resize("nix", size, tmp_path, Runner(), containers=Containers(), tools=Tools())
    live = Containers({"c9": {"krun.disk.0.path": str(path)}})
    runner = Runner()
    with pytest.raises(AgentboxError, match="while running Podman container"):
        resize("nix", 128 << 30, tmp_path, runner, containers=live, tools=Tools())
    assert path.stat().st_size == 64 << 30 and runner.plans == []


def test_guest_failure_is_retryable_and_nothing_is_shrunk(tmp_path: Path) -> None:
    path = _image(tmp_path)
    with pytest.raises(GuestStepFailed, match="exited with status 3 after host raw image") as info:
        resize("nix", 100 << 30, tmp_path, Runner(3), containers=Containers(), tools=Tools())
    assert "rerun the same resize command" in str(info.value)
    assert "will not be shrunk or reset automatically" in str(info.value)
    assert info.value.exit_code == 3
    assert path.stat().st_size == 100 << 30
    resize("nix", 120 << 30, tmp_path, Runner(0), containers=Containers(), tools=Tools())
    assert path.stat().st_size == 120 << 30


def test_reset_requires_force_before_probing(tmp_path: Path) -> None:
    probe = Containers()
    with pytest.raises(InputError, match="without --force"):
        reset_nix(tmp_path, False, containers=probe, tools=Tools())
    assert probe.asked == 0 and list(tmp_path.iterdir()) == []


def test_reset_replaces_existing_and_refuses_live_and_non_files(tmp_path: Path) -> None:
    path = _image(tmp_path)
    path.write_bytes(b"old")
    tools = Tools()
    reset_nix(tmp_path, True, containers=Containers(), tools=tools)
    assert path.stat().st_size == 64 << 30 and tools.calls[0][:4] == ["mkfs.btrfs", "-f", "-L", "AGENTBOX_NIX"]
    with pytest.raises(AgentboxError, match="refusing to reset"):
        reset_nix(tmp_path, True, containers=Containers({"c": {"krun.disk.0.path": str(path)}}),
                  tools=Tools())
    path.unlink()
    path.mkdir()
    with pytest.raises(InputError, match="is not a regular file; refusing to reset it"):
        reset_nix(tmp_path, True, containers=Containers(), tools=Tools())


def test_reset_texts_are_exact_and_follow_the_disk(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        reset_nix(tmp_path, False)
    assert str(info.value) == ("refusing to reset libkrun /nix raw image without --force; this deletes "
                               "and recreates libkrun-nix.raw with no backup")
    with pytest.raises(InputError, match="^refusing to reset microvm persistent /nix dev cache disk "
                                         "without --force; this deletes and recreates microvm-nix.raw"):
        reset_nix(tmp_path, False, disk=disks.MICROVM_NIX)
    tools = Tools()
    path = reset_nix(tmp_path, True, containers=Containers(), tools=tools, disk=disks.MICROVM_NIX)
    assert path == tmp_path / "microvm-nix.raw" and path.stat().st_size == 64 << 30
    assert (tmp_path / "libkrun-nix.raw").exists() is False


def test_reset_never_touches_the_containers_image(tmp_path: Path) -> None:
    other = tmp_path / "libkrun-containers.raw"
    other.write_bytes(b"keep")
    reset_nix(tmp_path, True, containers=Containers(), tools=Tools())
    assert other.read_bytes() == b"keep"


def test_extra_users_from_other_backends_block(tmp_path: Path) -> None:
    with pytest.raises(AgentboxError, match=r"use it: qemu vm 7$"):
        reset_nix(tmp_path, True, containers=Containers(), tools=Tools(), extra_users=("qemu vm 7",))
    assert list(tmp_path.iterdir()) == []


def test_start_failure_is_the_retryable_failed_to_start_variant(tmp_path: Path) -> None:
    path = _image(tmp_path)

    class CannotStart:
        def run(self, plan: ResizePlan) -> int:
            raise AgentboxError("podman is not installed or not available on PATH")

    with pytest.raises(GuestStepFailed) as info:
        resize("nix", 100 << 30, tmp_path, CannotStart(), containers=Containers(), tools=Tools())
    assert str(info.value).startswith(f"libkrun resize guest step for nix failed to start after host raw "
                                      f"image '{path}' was enlarged; fix the reported guest error")
    assert info.value.exit_code == 1 and path.stat().st_size == 100 << 30


def test_reset_through_a_symlinked_state_dir_deletes_nothing(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "libkrun-nix.raw").write_bytes(b"someone else's image")
    state = tmp_path / "app" / "ws"
    state.parent.mkdir()
    state.symlink_to(victim)
    probe = Containers()
    with pytest.raises(InputError, match="is a symlink"):
        reset_nix(state, True, containers=probe, tools=Tools())
    assert (victim / "libkrun-nix.raw").read_bytes() == b"someone else's image"
    assert probe.asked == 0, "refused before probing anything"


def test_reset_refuses_a_state_dir_others_can_write(tmp_path: Path) -> None:
    state = tmp_path / "ws"
    state.mkdir()
    os.chmod(state, 0o777)
    (state / "libkrun-nix.raw").write_bytes(b"old")
    with pytest.raises(InputError, match="mode 777 .accepted: ours, not writable by group or others."):
        reset_nix(state, True, containers=Containers(), tools=Tools())
    assert (state / "libkrun-nix.raw").read_bytes() == b"old"


def test_reset_refuses_a_state_dir_owned_by_another_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a dir owned by another user")
    state = tmp_path / "ws"
    state.mkdir(mode=0o700)
    (state / "libkrun-nix.raw").write_bytes(b"theirs")
    os.chown(state, 4242, 4242)
    with pytest.raises(InputError, match="owned by uid 4242"):
        reset_nix(state, True, containers=Containers(), tools=Tools())
    assert (state / "libkrun-nix.raw").read_bytes() == b"theirs"


def test_resize_refuses_an_image_with_another_label(tmp_path: Path) -> None:
    path = _image(tmp_path)
    with pytest.raises(InputError, match="has btrfs label 'AGENTBOX_CONTAINERS', expected 'AGENTBOX_NIX'"):
        resize("nix", 128 << 30, tmp_path, Runner(0), containers=Containers(),
               tools=Tools(label="AGENTBOX_CONTAINERS"))
    assert path.stat().st_size == 64 << 30


def test_resize_through_a_symlinked_state_root_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    path = _image(real)
    link = tmp_path / "app" / "ws"
    link.parent.mkdir()
    link.symlink_to(real)
    with pytest.raises(InputError, match="is a symlink"):
        resize("nix", 128 << 30, link, Runner(0), containers=Containers(), tools=Tools())
    assert path.stat().st_size == 64 << 30


def test_a_concurrent_reset_or_resize_on_one_workspace_is_refused(tmp_path: Path) -> None:
    import threading

    path = _image(tmp_path)
    entered, release = threading.Event(), threading.Event()

    class SlowRunner(Runner):
        def run(self, plan: ResizePlan) -> int:
            entered.set()
            release.wait(10)
            return 0

    first = threading.Thread(target=resize, args=("nix", 128 << 30, tmp_path, SlowRunner()),
                             kwargs={"containers": Containers(), "tools": Tools()})
    first.start()
    try:
        assert entered.wait(10)
        with pytest.raises(AgentboxError, match="another resize or reset is running on the workspace state"):
            reset_nix(tmp_path, True, containers=Containers(), tools=Tools())
        with pytest.raises(AgentboxError, match="another resize or reset is running"):
            resize("nix", 256 << 30, tmp_path, Runner(0), containers=Containers(), tools=Tools())
    finally:
        release.set()
        first.join(10)
    assert path.stat().st_size == 128 << 30, "the running resize finished; nothing deleted its image"


def test_a_live_user_naming_the_image_through_an_alias_still_blocks(tmp_path: Path) -> None:
    path = _image(tmp_path)
    alias = tmp_path / "alias"
    alias.symlink_to(tmp_path)
    live = Containers({"c1": {"krun.disk.0.path": str(alias / "libkrun-nix.raw")}})
    with pytest.raises(AgentboxError, match="refusing to reset"):
        reset_nix(tmp_path, True, containers=live, tools=Tools())
    with pytest.raises(AgentboxError, match="refusing to resize"):
        resize("nix", 128 << 30, tmp_path, Runner(0), containers=live, tools=Tools())
    assert path.stat().st_size == 64 << 30
