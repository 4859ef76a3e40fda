"""One typed options record per task (``agentbox_runtime.backends``): one unit per quantity, unknown
and wrong-typed options refused in one line naming what is accepted, and the CLI and the harness
assembling the same task from the same options."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from agentbox_harness.context import BackendContext
from agentbox_harness.registry import BUILTIN_BACKENDS, build
from agentbox_harness.workspace import Workspace
from agentbox_runtime import disks
from agentbox_runtime.backend_caps import BACKEND_NAMES, caps
from agentbox_runtime.backends import BACKENDS, BackendOptions, backend_for, is_microvm
from agentbox_runtime.backends.krun_podman import KRUN_PODMAN
from agentbox_runtime.backends.microvm_backend import AUTO, KRUN_DIRECT, QEMU, microvm_backend
from agentbox_runtime.cli import parse
from agentbox_runtime.errors import InputError
from agentbox_runtime.guest_resources import default_cpus
from agentbox_runtime.state import StateLayout

MICROVM_ONLY = ("storage", "image_cache", "preserve_debug", "workspace", "extra_env")


# --- the record ----------------------------------------------------------------------------------


def test_every_backend_is_one_entry_with_its_capabilities_and_disks() -> None:
    assert tuple(BACKENDS) == BACKEND_NAMES == BUILTIN_BACKENDS  # MACHINE_BACKENDS may gain more at run time
    for name, backend in BACKENDS.items():
        assert backend.name == name and backend.capabilities == caps(name)
        assert bool(backend.disks) == backend.capabilities.raw_disks
        assert ("hardened" in backend.accepts) == backend.capabilities.hardened
        assert ("publish" in backend.accepts) == backend.capabilities.publish
    assert [n for n in BACKENDS if is_microvm(n)] == ["qemu", "krun-direct"]
    assert backend_for("krun-podman").disks == disks.LIBKRUN_DISKS
    with pytest.raises(ValueError, match="unknown agentbox backend 'krun'; known: qemu, krun-direct, krun-podman"):
        backend_for("krun")


def test_memory_is_mib_for_every_backend(tmp_path: Path) -> None:
    o = BackendOptions(workspace=tmp_path, memory_mib=1536, cpus=3, image="img")
    assert QEMU.task(o).memory_mib == KRUN_DIRECT.task(o).memory_mib == 1536
    assert KRUN_PODMAN.krun_options(replace(o, krun_runtime="crun")).ram_mib == 1536
    assert "memory_mib" in QEMU.accepts and "memory_mib" in KRUN_PODMAN.accepts
    for old in ("mem_gib", "memory"):
        for backend in (QEMU, KRUN_PODMAN):
            with pytest.raises(TypeError, match=f"unknown {backend.name} option.s.: {old}; accepted: .*memory_mib"):
                BackendOptions.parse(backend.name, {old: 2}, backend.accepts, o)


def test_unknown_options_name_every_accepted_one(tmp_path: Path) -> None:
    base = BackendOptions(workspace=tmp_path)
    with pytest.raises(TypeError) as info:
        BackendOptions.parse("container", {"bogus": 1, "storage": "auto"}, BACKENDS["container"].accepts, base)
    assert str(info.value) == "unknown container option(s): bogus, storage; accepted: hardened, image, publish"
    for name in MICROVM_ONLY:  # microvm options are refused where they mean nothing
        with pytest.raises(TypeError, match=f"unknown krun-podman option.s.: {name};"):
            BackendOptions.parse("krun-podman", {name: None}, KRUN_PODMAN.accepts, base)


@pytest.mark.parametrize("name,value,message", [
    ("memory_mib", "2G", "option memory_mib must be int or None, not str '2G'"),
    ("memory_mib", 2.5, "option memory_mib must be int or None, not float 2.5"),
    ("cpus", True, "option cpus must be int or None, not bool True"),
    ("publish", "8080:80", "option publish must be a tuple of strings, not str '8080:80'"),
    ("publish", [8080], "option publish must be a tuple of strings, not tuple (8080,)"),
    ("hardened", "yes", "option hardened must be bool, not str 'yes'"),
    ("image", 3, "option image must be str or None, not int 3"),
])
def test_wrong_types_are_one_line_naming_the_type(tmp_path: Path, name: str, value: object, message: str) -> None:
    backend = next(b for b in BACKENDS.values() if name in b.accepts)
    with pytest.raises(TypeError) as info:
        BackendOptions.parse(backend.name, {name: value}, backend.accepts, BackendOptions(workspace=tmp_path))
    assert str(info.value) == f"{backend.name} {message}" and "\n" not in str(info.value)


def test_plain_conversions_and_bounds(tmp_path: Path) -> None:
    o = BackendOptions.parse("qemu", {"extra_env": ["A=1"], "image_cache": str(tmp_path), "memory_mib": 512},
                             QEMU.accepts, BackendOptions(workspace=tmp_path))
    assert o.extra_env == ("A=1",) and o.image_cache == tmp_path and o.memory_mib == 512
    with pytest.raises(TypeError, match="option workspace must be Path, not str"):
        BackendOptions(workspace=str(tmp_path))  # type: ignore[arg-type]
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"option memory_mib must be a positive whole number, not {bad}"):
            BackendOptions(workspace=tmp_path, memory_mib=bad)


def test_microvm_task_carries_the_options_and_the_hardened_env(tmp_path: Path) -> None:
    o = BackendOptions(workspace=tmp_path, image="img", cpus=2, extra_env=("A=1",), hardened=True, storage="reflink")
    task = KRUN_DIRECT.task(o)
    assert (task.vmm, task.image, task.cpus, task.storage) == ("libkrun", "img", 2, "reflink")
    assert task.extra_env == ("A=1", "AGENTBOX_HARDENED=1")
    assert QEMU.task(o).vmm == "qemu" and microvm_backend("auto") is AUTO
    with pytest.raises(InputError, match="invalid --vmm 'kvm'; accepted: qemu, libkrun, auto"):
        microvm_backend("kvm")


# --- the CLI and the harness assemble the same task ----------------------------------------------


@dataclass
class FakeSession:
    """What the built-in builders read from the harness session."""

    run_label: str | None = None
    preserve_debug: bool = False
    kernel: Path | None = None
    image_cache: Path = Path("/nonexistent-cache")
    timeout_scale: float = 1.0
    checks: list[Any] = field(default_factory=list)


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """The current directory as a workspace whose state is where the CLI would put it, HOME inside
    the state root (where the harness points ``~/.codex``), disks not created."""
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in ("AGENTBOX_CONFIG", "AGENTBOX_IMAGE", "AGENTBOX_KRUN_RUNTIME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    layout = StateLayout.resolve()
    monkeypatch.setenv("HOME", str(layout.state_root / "home"))
    monkeypatch.setattr(disks, "prepare_all", lambda *a, **k: None)
    return Workspace(work, layout.workspace, layout)


def _ctx(ws: Workspace, memory_mib: int, cpus: int) -> BackendContext:
    return BackendContext(FakeSession(), ws, lambda: "img", memory_mib, cpus, "auto")  # type: ignore[arg-type]


def test_microvm_cli_and_harness_build_the_same_task(project: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentbox_runtime.commands import microvm as cmd

    seen: list[Any] = []
    monkeypatch.setattr(cmd, "run_microvm", lambda opts: seen.append(opts) or 0)
    monkeypatch.setattr(cmd, "reap_stale", lambda layout: [])
    assert cmd.run(parse(["microvm", "--vmm", "libkrun", "--mem", "2", "--cpus", "3", "--hardened",
                          "--image", "img", "--storage", "reflink"])) == 0
    machine = build("krun-direct", _ctx(project, 2048, 3), "vm", {"hardened": True, "storage": "reflink"})
    harness = machine.options  # type: ignore[attr-defined]
    cli = seen[0]
    # what only the harness chooses: the agent as root without a terminal, its state and cache, and a
    # restore from a snapshot template (the CLI always boots)
    own = ("command", "root", "interactive", "state", "image_cache", "boot")
    assert replace(harness, **{k: getattr(cli, k) for k in own}) == cli
    assert (cli.memory_mib, cli.vmm, cli.extra_env) == (2048, "libkrun", ("AGENTBOX_HARDENED=1",))
    assert (cli.boot, harness.boot) == ("cold", "restore")


def test_krun_podman_cli_and_harness_build_the_same_argv(project: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentbox_runtime.commands import krun_podman_command as cmd

    spawned: list[list[str]] = []

    class FakePodman:
        def __init__(self, debug: bool = False) -> None:
            pass

        def spawn(self, argv: list[str], **_: Any) -> Any:
            spawned.append(list(argv))
            return argparse.Namespace(wait=lambda: 0)

    monkeypatch.setattr(cmd, "Podman", FakePodman)
    monkeypatch.setattr(cmd, "require_krun", lambda: None)
    monkeypatch.setattr(cmd, "resolve_image", lambda podman, image, pull: "img")
    assert cmd.run(parse(["libkrun", "--mem", "2", "--tsi", "--root", "--", "agentbox-guest-init", "agent"])) == 0
    machine = build("krun-podman", _ctx(project, 2048, default_cpus()), "task", {"tsi": True})
    (cli,) = spawned
    name = cli[cli.index("--name") + 1]  # the task name ends in a random suffix
    cli = [machine.container if a == name else a for a in cli]  # type: ignore[attr-defined]
    assert machine.argv == ["-i" if a == "-it" else a for a in cli]  # type: ignore[attr-defined]
    assert "krun.ram_mib=2048" in cli and cli.count("-it") == 1
    if os.geteuid() != 0:
        assert cli[cli.index("--userns") + 1] == "keep-id"
