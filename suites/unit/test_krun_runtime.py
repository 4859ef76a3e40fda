"""Selecting the OCI runtime of libkrun tasks: crun (the reference) or the QEMU-backed
``agentbox-krun-runtime``; flag > env > config > default; bad values are one line, exit 2,
nothing written. As root ``--userns keep-id`` is left out and the host ids are the workspace
owner's."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentbox_runtime.cli import parse
from agentbox_runtime.config import Config, load_config
from agentbox_runtime.errors import AgentboxError, InputError
from agentbox_runtime.doctor import tools as doctor_tools
from agentbox_runtime.tasks import krun as krun_tasks
from agentbox_runtime.tasks.krun import ENV_KRUN_RUNTIME, KrunOptions, oci_runtime, select_krun_runtime

REPO = Path(__file__).resolve().parents[2]
QEMU_RUNTIME = "/venv/bin/agentbox-krun-runtime"
SPELLINGS = ("--krun-runtime qemu", "AGENTBOX_KRUN_RUNTIME=qemu", '[libkrun] runtime = "qemu"')


# --- the setting: flag > env > config > default -------------------------------------------------


@pytest.mark.parametrize("flag,env,config,expected", [
    (None, None, None, "crun"),
    (None, None, "qemu", "qemu"),
    (None, None, "crun", "crun"),
    (None, "qemu", "crun", "qemu"),
    (None, "crun", "qemu", "crun"),
    (None, "", "qemu", "qemu"),  # an empty variable counts as unset
    ("crun", "qemu", "qemu", "crun"),
    ("qemu", "crun", "crun", "qemu"),
    ("qemu", None, None, "qemu"),
])
def test_precedence_flag_env_config_default(flag: str | None, env: str | None, config: str | None,
                                            expected: str) -> None:
    environ = {} if env is None else {ENV_KRUN_RUNTIME: env}
    assert select_krun_runtime(flag, environ, Config(None, krun_runtime=config)) == expected


def patch_runtime_path(monkeypatch: pytest.MonkeyPatch, fn: Any) -> None:
    """Where ``runtime_path`` is looked up: the argv builder and the doctor."""
    monkeypatch.setattr(krun_tasks, "runtime_path", fn)
    monkeypatch.setattr(doctor_tools, "runtime_path", fn)


def _write_config(tmp_path: Path, text: str) -> dict[str, str]:
    cfg = tmp_path / "cfg" / "agentbox" / "agentbox.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(text)
    return {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "HOME": str(tmp_path)}


def test_config_file_is_read_when_flag_and_env_are_absent(tmp_path: Path) -> None:
    env = _write_config(tmp_path, '[libkrun]\nruntime = "qemu"\n')
    assert load_config(env).krun_runtime == "qemu"
    assert select_krun_runtime(None, env) == "qemu"
    assert select_krun_runtime(None, {**env, ENV_KRUN_RUNTIME: "crun"}) == "crun"
    assert select_krun_runtime("crun", env) == "crun"
    both = _write_config(tmp_path, f'[state]\nlocation = "{tmp_path}"\n[libkrun]\nruntime = "crun"\n')
    config = load_config(both)
    assert config.krun_runtime == "crun" and config.state_location == tmp_path
    assert load_config(_write_config(tmp_path, "[libkrun]\n")).krun_runtime is None


@pytest.mark.parametrize("value", ["runc", "QEMU", "krun", " qemu", "qemu\nx"])
def test_bad_env_value_is_one_input_error_line(value: str) -> None:
    with pytest.raises(InputError) as info:
        select_krun_runtime(None, {ENV_KRUN_RUNTIME: value}, Config(None))
    text = str(info.value)
    assert "\n" not in text and ENV_KRUN_RUNTIME in text and text.endswith("accepted: crun, qemu")
    assert value.replace("\n", "\\n") in text


@pytest.mark.parametrize("text,message", [
    ('[libkrun]\nruntime = "runc"\n', r"\[libkrun\].runtime 'runc' is not accepted; accepted: crun, qemu"),
    ('[libkrun]\nruntime = 1\n', r"\[libkrun\].runtime must be a string, got int; accepted: crun, qemu"),
    ('[libkrun]\nruntime = "qemu\\n"\n', r"\[libkrun\].runtime 'qemu\\n' is not accepted"),
    ('[libkrun]\nhandler = "qemu"\n', r"unknown key \[libkrun\].handler; accepted: \[libkrun\].runtime"),
    ('[state]\nruntime = "qemu"\n', r"unknown key \[state\].runtime; accepted: \[state\].location"),
    ('[krun]\nruntime = "qemu"\n',
     r"unknown table \[krun\]; accepted: \[state\] with key location, \[libkrun\] with key runtime"),
    ('libkrun = "qemu"\n', r"'libkrun' must be a table \[libkrun\]"),
])
def test_bad_config_values_name_file_key_and_accepted(tmp_path: Path, text: str, message: str) -> None:
    env = _write_config(tmp_path, text)
    with pytest.raises(InputError, match=message) as info:
        load_config(env)
    assert "\n" not in str(info.value) and "agentbox.toml" in str(info.value)


def test_oci_runtime_value(monkeypatch: pytest.MonkeyPatch) -> None:

    patch_runtime_path(monkeypatch, lambda: QEMU_RUNTIME)
    assert oci_runtime("crun") == "crun" and oci_runtime("qemu") == QEMU_RUNTIME

    def missing() -> str:
        raise AgentboxError("agentbox-krun-runtime is not installed")

    patch_runtime_path(monkeypatch, missing)
    assert oci_runtime("crun") == "crun"
    with pytest.raises(AgentboxError, match="not installed"):
        oci_runtime("qemu")


# --- the flag ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,action,command", [
    (["--krun-runtime", "qemu", "--", "sh", "-c", "true"], None, ["sh", "-c", "true"]),
    (["--krun-runtime", "qemu", "libkrun", "--mem", "2"], None, []),
    (["libkrun", "--krun-runtime", "qemu", "--tsi"], None, []),
    (["libkrun", "--krun-runtime", "qemu", "resize", "--target", "nix", "--size", "1G"], "resize", []),
    (["libkrun", "resize", "--target", "nix", "--size", "1G", "--krun-runtime", "qemu"], "resize", []),
    (["libkrun", "--krun-runtime", "qemu", "reset-nix", "--force"], "reset-nix", []),
    (["libkrun", "reset-nix", "--krun-runtime", "qemu"], "reset-nix", []),
])
def test_flag_accepted_where_libkrun_options_are(argv: list[str], action: str | None, command: list[str]) -> None:
    ns = parse(argv)
    assert ns.subcommand == "libkrun" and ns.libkrun_action == action and ns.krun_runtime == "qemu"
    assert ns.command == command


def test_flag_absent_is_none() -> None:
    assert parse([]).krun_runtime is None and parse(["container"]).krun_runtime is None


@pytest.mark.parametrize("argv", [
    ["--krun-runtime", "runc"], ["libkrun", "--krun-runtime", "QEMU"], ["--krun-runtime"],
    ["--krun-runtime", "qemu", "container"], ["container", "--krun-runtime", "qemu"],
    ["microvm", "--krun-runtime", "qemu"], ["doctor", "--krun-runtime", "qemu"],
    ["--krun-runtime", "qemu", "doctor"],
])
def test_flag_rejected_forms_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err


# --- the command: bad input through the real CLI (exit 2, one line, nothing written) ------------


def _agentbox(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    work = tmp_path / "project"
    work.mkdir(exist_ok=True)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(tmp_path / "state"),
                "HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), **(env or {})}
    for name in ("AGENTBOX_CONFIG", "AGENTBOX_IMAGE", ENV_KRUN_RUNTIME):
        if name not in (env or {}):
            full_env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", *args], cwd=work, env=full_env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _nothing_written(tmp_path: Path) -> bool:
    return not (tmp_path / "state").exists() and not (tmp_path / "home").exists()


@pytest.mark.parametrize("args", [[], ["libkrun", "--mem", "2"], ["--", "true"],
                                  ["libkrun", "resize", "--target", "nix", "--size", "1G"]])
def test_bad_env_exits_2_one_line_nothing_written(tmp_path: Path, args: list[str]) -> None:
    proc = _agentbox(tmp_path, *args, env={ENV_KRUN_RUNTIME: "runc"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "agentbox: invalid AGENTBOX_KRUN_RUNTIME value 'runc'; accepted: crun, qemu\n"
    assert _nothing_written(tmp_path)


def test_reset_nix_ignores_the_selection(tmp_path: Path) -> None:
    proc = _agentbox(tmp_path, "libkrun", "reset-nix", env={ENV_KRUN_RUNTIME: "runc"})
    assert proc.returncode == 2 and "without --force" in proc.stderr, proc.stderr


@pytest.mark.parametrize("text,needle", [
    ('[libkrun]\nruntime = "runc"\n', "[libkrun].runtime 'runc' is not accepted; accepted: crun, qemu"),
    ('[libkrun]\nruntime = ["qemu"]\n', "[libkrun].runtime must be a string, got list"),
    ('[libkrun]\nmode = "qemu"\n', "unknown key [libkrun].mode"),
])
def test_bad_config_exits_2_one_line_nothing_written(tmp_path: Path, text: str, needle: str) -> None:
    _write_config(tmp_path, text)
    for args in ([], ["libkrun", "resize", "--target", "nix", "--size", "1G"]):
        proc = _agentbox(tmp_path, *args)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and _nothing_written(tmp_path)


# --- the command in process: argv, require_krun, host ids --------------------------------------


class FakeProc:
    def wait(self) -> int:
        return 0


class FakePodman:
    spawned: list[list[str]] = []

    def __init__(self, debug: bool = False) -> None:
        self.debug = debug

    def spawn(self, argv: list[str], **_: Any) -> FakeProc:
        FakePodman.spawned.append(list(argv))
        return FakeProc()


@pytest.fixture()
def libkrun_cmd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``agentbox_runtime.commands.libkrun`` with Podman, image resolution, disk preparation, crun's krun
    check and the runtime lookup faked; HOME, state and config under ``tmp_path``."""
    import agentbox_runtime.commands.libkrun as lk

    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in ("AGENTBOX_CONFIG", "AGENTBOX_IMAGE", ENV_KRUN_RUNTIME):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    calls: dict[str, Any] = {"require_krun": 0, "work": work}

    def require_krun() -> None:
        calls["require_krun"] += 1

    FakePodman.spawned = []
    monkeypatch.setattr(lk, "Podman", FakePodman)
    monkeypatch.setattr(lk, "require_krun", require_krun)
    monkeypatch.setattr(lk, "resolve_image", lambda podman, image, pull: "img")
    monkeypatch.setattr(lk.disks, "prepare_all", lambda *a, **k: None)
    patch_runtime_path(monkeypatch, lambda: QEMU_RUNTIME)
    calls["spawned"] = FakePodman.spawned
    return calls


def _run(argv: list[str]) -> int:
    from agentbox_runtime.commands.libkrun import run

    return run(parse(argv))


def _runtime_of(argv: list[str]) -> str:
    return argv[argv.index("--runtime") + 1]


@pytest.mark.parametrize("flag,env,config,expected", [
    (None, None, None, "crun"),
    (None, None, "qemu", QEMU_RUNTIME),
    (None, "qemu", "crun", QEMU_RUNTIME),
    ("crun", "qemu", "qemu", "crun"),
    ("qemu", "crun", "crun", QEMU_RUNTIME),
])
def test_task_runtime_follows_precedence_and_skips_require_krun_for_qemu(
        libkrun_cmd: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        flag: str | None, env: str | None, config: str | None, expected: str) -> None:
    if env is not None:
        monkeypatch.setenv(ENV_KRUN_RUNTIME, env)
    if config is not None:
        _write_config(tmp_path, f'[libkrun]\nruntime = "{config}"\n')
    assert _run((["--krun-runtime", flag] if flag else []) + ["--", "true"]) == 0
    (argv,) = libkrun_cmd["spawned"]
    assert _runtime_of(argv) == expected and argv[-2:] == ["img", "true"]
    assert libkrun_cmd["require_krun"] == (1 if expected == "crun" else 0)


def test_qemu_runtime_not_installed_stops_before_anything_is_written(
        libkrun_cmd: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:

    def missing() -> str:
        raise AgentboxError("agentbox-krun-runtime is not installed next to x or on PATH")

    patch_runtime_path(monkeypatch, missing)
    with pytest.raises(AgentboxError, match="agentbox-krun-runtime is not installed"):
        _run(["--krun-runtime", "qemu"])
    assert libkrun_cmd["spawned"] == [] and _nothing_written(tmp_path)


def test_bad_env_in_process_writes_nothing(libkrun_cmd: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_KRUN_RUNTIME, "qemu2")
    with pytest.raises(InputError, match="invalid AGENTBOX_KRUN_RUNTIME value 'qemu2'; accepted: crun, qemu"):
        _run([])
    assert libkrun_cmd["spawned"] == [] and libkrun_cmd["require_krun"] == 0 and _nothing_written(tmp_path)


def test_as_root_keep_id_is_left_out_and_host_ids_are_the_workspace_owner(
        libkrun_cmd: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "getuid", lambda: 0)
    monkeypatch.setattr(os, "getgid", lambda: 0)
    st = libkrun_cmd["work"].stat()
    uid, gid = (st.st_uid, st.st_gid or st.st_uid) if st.st_uid != 0 else (1000, 1000)
    assert _run(["--krun-runtime", "qemu"]) == 0
    (argv,) = libkrun_cmd["spawned"]
    assert "--userns" not in argv and "keep-id" not in argv
    assert f"AGENTBOX_HOST_UID={uid}" in argv and f"AGENTBOX_HOST_GID={gid}" in argv
    assert "AGENTBOX_HOST_UID=0" not in argv
    assert _runtime_of(argv) == QEMU_RUNTIME


def test_rootless_keeps_keep_id_and_the_users_ids(libkrun_cmd: dict[str, Any],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    monkeypatch.setattr(os, "getuid", lambda: 4321)
    monkeypatch.setattr(os, "getgid", lambda: 4322)
    assert _run([]) == 0
    (argv,) = libkrun_cmd["spawned"]
    i = argv.index("--userns")
    assert argv[i:i + 4] == ["--userns", "keep-id", "--user", "0:0"]
    assert "AGENTBOX_HOST_UID=4321" in argv and "AGENTBOX_HOST_GID=4322" in argv


def test_resize_maintenance_skips_require_krun_for_qemu(libkrun_cmd: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from agentbox_runtime.commands.libkrun import PodmanKrunMaintenance
    from agentbox_runtime.state import StateLayout

    layout = StateLayout.resolve()
    for runtime, calls in (("crun", 1), (QEMU_RUNTIME, 1)):
        m = PodmanKrunMaintenance(FakePodman(), layout, KrunOptions(ram_mib=1024, runtime=runtime))  # type: ignore[arg-type]
        m.check()
        assert m.image == "img" and libkrun_cmd["require_krun"] == calls


# --- require_krun and doctor ---------------------------------------------------------------------


def test_require_krun_says_how_to_select_the_qemu_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentbox_runtime.commands import libkrun
    from agentbox_runtime.commands.libkrun import require_krun
    from agentbox_runtime.doctor.model import Check

    monkeypatch.setattr(libkrun, "check_crun_krun",
                        lambda: Check("crun-krun", False, "unusable", "crun 1.8 was built without libkrun", "x"))
    with pytest.raises(AgentboxError) as info:
        require_krun()
    text = str(info.value)
    assert text.startswith("libkrun mode needs crun built with libkrun: crun 1.8 was built without libkrun; ")
    assert "\n" not in text and "agentbox doctor" in text and "QEMU-backed runtime" in text
    assert all(s in text for s in SPELLINGS)


def test_crun_krun_fix_mentions_the_qemu_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentbox_runtime.doctor import tools

    monkeypatch.setattr(tools.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(tools, "run_tool", lambda argv, **_: (0, "crun version 1.8.1\n+SYSTEMD +SELINUX"))
    check = tools.check_crun_krun()
    assert not check.ok and all(s in check.fix for s in SPELLINGS)
    monkeypatch.setattr(tools.shutil, "which", lambda name: None)
    check = tools.check_crun_krun()
    assert check.status == "missing" and "--krun-runtime qemu" in check.fix


def test_doctor_krun_runtime_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from agentbox_runtime.doctor import BACKENDS, CHECKS, check_by_name

    assert "krun-runtime" in CHECKS and all("krun-runtime" not in needs for needs in BACKENDS.values())
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("AGENTBOX_CONFIG", raising=False)
    monkeypatch.delenv(ENV_KRUN_RUNTIME, raising=False)
    patch_runtime_path(monkeypatch, lambda: QEMU_RUNTIME)
    check = check_by_name("krun-runtime")
    assert check.ok and QEMU_RUNTIME in check.detail and "libkrun tasks use crun" in check.detail
    assert all(s in check.detail for s in SPELLINGS)
    monkeypatch.setenv(ENV_KRUN_RUNTIME, "qemu")
    assert "libkrun tasks use qemu" in check_by_name("krun-runtime").detail
    monkeypatch.setenv(ENV_KRUN_RUNTIME, "bogus")
    assert "invalid AGENTBOX_KRUN_RUNTIME value 'bogus'" in check_by_name("krun-runtime").detail

    def missing() -> str:
        raise AgentboxError("agentbox-krun-runtime is not installed next to /x/python or on PATH")

    patch_runtime_path(monkeypatch, missing)
    check = check_by_name("krun-runtime")
    assert not check.ok and check.status == "missing" and "is not installed" in check.detail
    assert "pip install -e ." in check.fix


def test_namespace_without_the_flag_still_selects(libkrun_cmd: dict[str, Any]) -> None:
    """A namespace built elsewhere (no ``krun_runtime`` attribute) selects from env/config/default."""
    from agentbox_runtime.commands.libkrun import _options

    ns = argparse.Namespace(guest_init=None, mem=1, tsi=False, publish=[], root=False, profile=False,
                            debug=False)
    assert _options(ns, ()).runtime == "crun"
