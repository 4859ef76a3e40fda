"""Selecting the OCI runtime of libkrun tasks: crun (the reference) or the QEMU-backed
``agentbox-krun-runtime``; flag > env > config > default; bad values are one line, exit 2,
nothing written. As root ``--userns keep-id`` is left out and the host ids are the workspace
owner's. Then the guest's init of that runtime: ``/.krun_config.json`` read as libkrun v1.18.0's
init reads it (:mod:`agentbox_runtime.vmm.krun_init`, run here under the host's busybox)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentbox_runtime import disks
from agentbox_runtime.cli import parse
from agentbox_runtime.config import Config, load_config
from agentbox_runtime.errors import AgentboxError, InputError
from agentbox_runtime.doctor import tools as doctor_tools
from agentbox_runtime.tasks import krun_podman_argv as krun_tasks
from agentbox_runtime.tasks.krun_podman_argv import ENV_KRUN_RUNTIME, KrunOptions, oci_runtime, select_krun_runtime
from agentbox_runtime.vmm import krun_init

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
    """``agentbox_runtime.commands.krun_podman_command`` with Podman, image resolution, disk preparation, crun's krun
    check and the runtime lookup faked; HOME, state and config under ``tmp_path``."""
    import agentbox_runtime.commands.krun_podman_command as lk

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
    monkeypatch.setattr(disks, "prepare_all", lambda *a, **k: None)
    patch_runtime_path(monkeypatch, lambda: QEMU_RUNTIME)
    calls["spawned"] = FakePodman.spawned
    return calls


def _run(argv: list[str]) -> int:
    from agentbox_runtime.commands.krun_podman_command import run

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
    from agentbox_runtime.backends import krun_podman
    from agentbox_runtime.backends.krun_podman import KrunPodmanMaintenance
    from agentbox_runtime.state import StateLayout

    monkeypatch.setattr(krun_podman, "require_krun", lambda: libkrun_cmd.__setitem__(
        "require_krun", libkrun_cmd["require_krun"] + 1))
    monkeypatch.setattr(krun_podman, "resolve_image", lambda podman, image, pull: "img")
    layout = StateLayout.resolve()
    for runtime, calls in (("crun", 1), (QEMU_RUNTIME, 1)):
        m = KrunPodmanMaintenance(FakePodman(), layout, KrunOptions(ram_mib=1024, runtime=runtime))  # type: ignore[arg-type]
        m.check()
        assert m.image == "img" and libkrun_cmd["require_krun"] == calls


# --- require_krun and doctor ---------------------------------------------------------------------


def test_require_krun_says_how_to_select_the_qemu_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentbox_runtime.backends import krun_podman
    from agentbox_runtime.backends.krun_podman import require_krun
    from agentbox_runtime.hostcheck.check import Check

    monkeypatch.setattr(krun_podman, "check_crun_krun",
                        lambda: Check("crun-krun", False, "unusable", "crun 1.8 was built without libkrun", "x"))
    with pytest.raises(AgentboxError) as info:
        require_krun()
    text = str(info.value)
    assert text.startswith("libkrun mode needs crun built with libkrun: crun 1.8 was built without libkrun; ")
    assert "\n" not in text and "agentbox doctor" in text and "QEMU-backed runtime" in text
    assert all(s in text for s in SPELLINGS)


def test_crun_krun_fix_mentions_the_qemu_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentbox_runtime.hostcheck import crun as tools

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
    from agentbox_runtime.commands.krun_podman_command import _options

    ns = argparse.Namespace(guest_init=None, mem=1, tsi=False, publish=[], root=False, profile=False,
                            debug=False)
    assert _options(ns, ()).runtime == "crun"


# --- the guest's init: /.krun_config.json read as libkrun v1.18.0's init reads it ------------------
# The PID 1 pieces of agentbox_runtime.vmm.krun_init run here under the host's busybox (the same
# 1.35 as the image's static one): the reader (awk), then the launch functions (ash), with the
# command replaced by a recorder of the exact argv it would get, or run for real.

BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="needs busybox (the guest's PID 1 is busybox)")
RECORDER = "#!/bin/sh\nfor a; do printf '%s\\0' \"$a\"; done > \"$KRUN_TEST_OUT\"\n"


@dataclass
class Plan:
    """What the guest's init would do with a config: the hostname, the directory, the command's
    ``argv[0]``, the environment given to ``env -i`` and the words after it."""

    host: str
    workdir: str | None
    argv0: str
    env: list[str]
    after_env: list[str]


def _reader_output(tmp_path: Path, config: bytes | None) -> Path:
    prog = tmp_path / "krun-init.awk"
    prog.write_text(krun_init.awk_program())
    path = tmp_path / ".krun_config.json"
    if config is not None:
        path.write_bytes(config)
    out = tmp_path / "krun-cmd"
    assert BUSYBOX is not None
    with open(out, "wb") as f:
        subprocess.run([BUSYBOX, "env", "-i", *krun_init.KERNEL_ENV, BUSYBOX, "awk", "-f", str(prog), str(path)],
                       stdout=f, check=True, timeout=60, env={"LC_ALL": "C"})
    return out


def _plan_from(tmp_path: Path, lines: Path) -> Plan:
    """Source ``lines`` (the reader's output, or exec-mode lines) and record krun_run's argv."""
    recorder = tmp_path / "recorder"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    record = tmp_path / "record"
    script = (f". {lines}\nprintf '%s\\n' \"$krun_host\" \"${{krun_wd-<none>}}\" \"$krun_n\"\n"
              f"krun_p=/resolved; krun_run\n")
    proc = subprocess.run([BUSYBOX or "busybox", "sh", "-c", script], capture_output=True, timeout=60,
                          env={"bb": "/bb", "krun_setsid": str(recorder), "KRUN_TEST_OUT": str(record),
                               "LC_ALL": "C"}, check=True)
    host, workdir, argv0 = proc.stdout.decode().split("\n")[:3]
    words = record.read_bytes().split(b"\0")[:-1]
    text = [w.decode() for w in words]
    assert text[:4] == ["/bb", "env", "-i", "--"], text
    after = next(i for i, w in enumerate(text[4:], 4) if "=" not in w or w == "/bb")
    return Plan(host=host, workdir=None if workdir == "<none>" else workdir, argv0=argv0, env=text[4:after],
                after_env=text[after:])


def plan(tmp_path: Path, config: bytes | str | None) -> Plan:
    data = config.encode() if isinstance(config, str) else config
    return _plan_from(tmp_path, _reader_output(tmp_path, data))


def argv_of(p: Plan) -> list[str]:
    """The command line the workload gets: argv[0] then the words after the wrapper's."""
    assert p.after_env[:3] == ["/bb", "sh", "-c"], p.after_env
    assert p.after_env[4:6] == ["$krun_n", "$krun_p"] or p.after_env[4] == p.argv0, p.after_env
    return [p.argv0, *p.after_env[6:]]


OCI = json.dumps({
    "ociVersion": "1.0.2-dev",
    "process": {"user": {"uid": 1000, "gid": 1000}, "args": ["sh", "-c", "echo ok", "x y"],
                "env": ["PATH=/usr/bin:/bin", "TERM=xterm", "HOME=/home/dev", "HOSTNAME=box", "A=first", "A=second",
                        "NOEQ", "=empty-name"],
                "cwd": "/srv"},
    "root": {"path": "rootfs"}, "hostname": "box", "annotations": {"run.oci.handler": "krun"},
})


@needs_busybox
def test_init_takes_args_env_and_cwd_from_an_oci_config(tmp_path: Path) -> None:
    p = plan(tmp_path, OCI)
    assert (p.host, p.workdir, p.argv0) == ("box", "/srv", "sh")
    # the kernel's HOME and TERM come first and the config replaces them; anything else is set only
    # once (the first A wins); items without a name or without "=" are skipped
    assert p.env == ["HOME=/home/dev", "TERM=xterm", "PATH=/usr/bin:/bin", "HOSTNAME=box", "A=first"]
    assert argv_of(p) == ["sh", "-c", "echo ok", "x y"]
    assert p.after_env[3] == ("unset IFS; unset OPTIND; unset PPID; unset PWD; unset OLDPWD; unset SHLVL; "
                              "export PATH='/usr/bin:/bin'; exec -a \"$0\" \"$@\"")


@needs_busybox
def test_init_matches_keys_case_insensitively_and_puts_the_entrypoint_first(tmp_path: Path) -> None:
    docker = {"Entrypoint": ["/bin/tini", "--"], "Cmd": ["serve"], "Env": ["X=1"], "WorkingDir": "/app"}
    p = plan(tmp_path, json.dumps(docker))
    assert (p.workdir, argv_of(p), p.env) == ("/app", ["/bin/tini", "--", "serve"], ["HOME=/", "TERM=linux", "X=1"])
    p = plan(tmp_path, json.dumps({"ENTRYPOINT": ["/bin/tini"], "cwd": "/w"}))  # an entrypoint alone is dropped
    assert (p.workdir, p.argv0, p.host) == ("/w", "/bin/sh", "localhost")


@needs_busybox
@pytest.mark.parametrize("config", [
    None, "", "not json", "[1, 2]", '{"args": ["a"', '{"args": ["x"]}]',
    '{"args": ["caf\\u00e9"]}',  # a \\u escape above 127 fails libkrun's jsmn: the whole file
    json.dumps({"env": [f"V{i}=1" for i in range(16400)], "args": ["x"]}),  # over MAX_TOKENS (16384)
])
def test_without_a_usable_config_init_runs_bin_sh_in_the_kernels_environment(tmp_path: Path,
                                                                             config: str | None) -> None:
    p = plan(tmp_path, config)
    assert (p.host, p.workdir, p.argv0, p.env) == ("localhost", None, "/bin/sh", ["HOME=/", "TERM=linux"])
    assert argv_of(p) == ["/bin/sh"]


@needs_busybox
def test_init_decodes_strings_as_v1_18_0_does(tmp_path: Path) -> None:
    """Go's encoder writes & < > as \\u0026 \\u003c \\u003e (decoded right); v1.18.0's
    unescape_string does not step over a simple escape (fixed in v1.19.0), so \\" gives two quotes,
    \\n a newline and an n, and \\\\ a backslash that escapes the next character."""
    p = plan(tmp_path, r'{"args": ["a \u0026\u0026 b\u003c", "say \"hi\"", "l1\nl2", "c:\\bin", "c:\\dir", "t\tx"],'
                       r' "env": ["Q=\"q\""]}')
    assert argv_of(p) == ["a && b<", 'say ""hi""', "l1\nnl2", "c:\\\bbin", "c:\\dir", "t\ttx"]
    assert p.env[-1] == 'Q=""q""'


@needs_busybox
def test_init_matches_every_string_token_not_only_keys(tmp_path: Path) -> None:
    """jsoneq is tried on every string token in document order: an argument spelled "cwd" makes the
    next token the directory, before process.cwd is reached."""
    p = plan(tmp_path, json.dumps({"process": {"args": ["ls", "cwd", "/etc"], "cwd": "/srv"}}))
    assert (p.workdir, argv_of(p)) == ("/etc", ["ls", "cwd", "/etc"])


@needs_busybox
def test_krun_variables_in_the_config_env_steer_init(tmp_path: Path) -> None:
    env = ["KRUN_HOME=/kh", "KRUN_TERM=vt100", "KRUN_WORKDIR=/kw", "KRUN_INIT=/bin/true", "HOSTNAME="]
    p = plan(tmp_path, json.dumps({"process": {"args": ["ignored"], "env": env, "cwd": "/ignored"}}))
    assert (p.workdir, p.argv0, p.host) == ("/kw", "/bin/true", "")
    assert p.env[:2] == ["HOME=/kh", "TERM=vt100"] and "KRUN_INIT=/bin/true" in p.env
    assert argv_of(p) == ["/bin/true"]


@needs_busybox
def test_a_variable_name_ash_would_drop_makes_env_run_the_resolved_path(tmp_path: Path) -> None:
    p = plan(tmp_path, json.dumps({"args": ["tool", "-v"], "env": ["odd-name=1", "PATH=/x"]}))
    assert p.env == ["HOME=/", "TERM=linux", "odd-name=1", "PATH=/x"] and p.after_env == ["/resolved", "-v"]


@needs_busybox
def test_exec_mode_keeps_the_given_command_and_environment(tmp_path: Path) -> None:
    lines = tmp_path / "exec-lines"
    lines.write_text(krun_init.exec_mode_lines("/usr/bin/agent", ["--port", "p 1"],
                                               ["PATH=/a", "HOME=/", "TERM=linux", "A=1", "A=2"]) + "krun_host=h\n")
    p = _plan_from(tmp_path, lines)
    assert (p.argv0, p.workdir, p.env) == ("/usr/bin/agent", None, ["PATH=/a", "HOME=/", "TERM=linux", "A=2"])
    assert argv_of(p) == ["/usr/bin/agent", "--port", "p 1"]


def _run_for_real(tmp_path: Path, config: dict[str, Any], cwd: Path) -> tuple[int, bytes, list[bytes], list[bytes]]:
    """Run the command the config names the way PID 1 runs it; (status, stdout, cmdline, environ)
    of the workload (a dash that writes its /proc/self entries)."""
    lines = _reader_output(tmp_path, json.dumps(config).encode())
    launch = tmp_path / "launch"
    launch.write_text(krun_init.LAUNCH_FUNCTIONS)
    script = f'. {launch}; . {lines}; cd "$krun_wd"; krun_start'
    proc = subprocess.run([BUSYBOX or "busybox", "sh", "-c", script], capture_output=True, timeout=60, cwd=cwd,
                          env={"bb": BUSYBOX or "busybox", "krun_setsid": "", "LC_ALL": "C"})
    parts = proc.stdout.split(b"\n--\n")
    if len(parts) < 3:
        return proc.returncode, proc.stdout, [], []
    return proc.returncode, parts[0], parts[1].split(b"\0")[:-1], parts[2].split(b"\0")[:-1]


DUMP = "echo; echo --; cat /proc/$$/cmdline; echo; echo --; cat /proc/$$/environ"


@needs_busybox
def test_the_workload_gets_exactly_inits_argv_and_environment(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sh").symlink_to(shutil.which("dash") or "/bin/sh")
    env = ["PATH=/nowhere::" + str(bindir) + ":/usr/bin:/bin", "SHLVL=7", "IFS=x", "Z=1"]
    status, _, cmdline, environ = _run_for_real(tmp_path, {"args": ["sh", "-c", DUMP, "a1"], "env": env,
                                                           "cwd": str(tmp_path)}, Path("/"))
    assert status == 0
    assert cmdline == [b"sh", b"-c", DUMP.encode(), b"a1"]  # argv[0] as given, not the path found
    assert sorted(environ) == sorted(e.encode() for e in ["HOME=/", "TERM=linux", *env])


@needs_busybox
@pytest.mark.parametrize(("argv0", "status", "why"), [
    ("no-such-tool", 127, "No such file or directory"),
    ("notexec", 126, "Permission denied"),
    ("./notexec", 126, "Permission denied"),
    ("/no/such/path", 127, "No such file or directory"),
    ("", 127, "No such file or directory"),
])
def test_a_command_init_cannot_run_is_126_or_127_with_inits_message(tmp_path: Path, argv0: str, status: int,
                                                                    why: str) -> None:
    (tmp_path / "notexec").write_text("#!/bin/sh\n")
    got, out, _, _ = _run_for_real(tmp_path, {"args": [argv0], "env": [f"PATH={tmp_path}"], "cwd": str(tmp_path)},
                                   tmp_path)
    assert got == status
    assert out.decode() == f"Couldn't execute '{argv0}' inside the vm: {why}\n"
