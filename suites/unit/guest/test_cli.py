"""The ``agentbox-guest-init`` command line (7.1 plus status, agent, vm-init)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentbox_guest_init import cli

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("argv,words,command", [
    (["libkrun", "enter", "--", "bash", "-lc", "echo hi"], ["libkrun", "enter"], ["bash", "-lc", "echo hi"]),
    (["libkrun", "enter"], ["libkrun", "enter"], []),
    (["microvm", "enter", "--", "--weird", "-x"], ["microvm", "enter"], ["--weird", "-x"]),
    (["container", "enter", "fish", "-l"], ["container", "enter"], ["fish", "-l"]),
    (["default", "enter", "--", "--"], ["default", "enter"], ["--"]),
    (["libkrun", "podman", "wait"], ["libkrun", "podman", "wait"], []),
])
def test_parses_enter_command_after_separator(argv: list[str], words: list[str], command: list[str]) -> None:
    assert cli.split_enter(argv) == (words, command)


def test_parses_libkrun_podman_prep_and_wait() -> None:
    for verb in ("prep", "wait", "service-wait"):
        ns = cli._parser().parse_args(["libkrun", "podman", verb])
        assert (ns.mode, ns.action, ns.verb) == ("libkrun", "podman", verb)
    ns = cli._parser().parse_args(["libkrun", "resize", "--target", "containers"])
    assert ns.target == "containers"


@pytest.mark.parametrize("argv", [["libkrun", "nix", "service-wait"], ["libkrun", "resize", "--target", "root"],
                                  ["status", "--wait", "docker"], ["agent", "--device", "x", "--port", "y"],
                                  ["libkrun"], []])
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentbox_guest_init.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd or REPO, env={**os.environ, **(env or {})})


def test_runs_as_a_module_from_any_dir_holding_the_package(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "agentbox_guest_init.cli", "status", "--json"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert set(report) == {"nix", "podman", "gate"} and report["gate"]["ready"] is True  # nothing enabled here
    assert report["nix"]["status_path"] == "/run/agentbox/nix-prep.status"


def test_guest_errors_print_one_line_and_exit_1() -> None:
    p = run_cli("libkrun", "enter", "--", "true", env={"AGENTBOX_HOST_UID": "x1"})
    assert p.returncode == 1
    assert p.stderr == "agentbox-guest-init: invalid numeric value in AGENTBOX_HOST_UID\n"


def test_status_rejects_a_non_positive_timeout() -> None:
    p = run_cli("status", "--timeout", "0")
    assert p.returncode == 1 and "--timeout must be a positive number of seconds, got 0" in p.stderr


def test_prep_workers_are_no_ops_without_their_flags() -> None:
    for kind in ("nix", "podman"):
        p = run_cli("libkrun", kind, "prep", env={"AGENTBOX_LIBKRUN_NIX_OVERLAY": "",
                                                  "AGENTBOX_LIBKRUN_CONTAINERS_STORAGE": "true"})
        assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def test_vm_init_lazily_imports_guest_init_vminit(tmp_path: Path) -> None:
    """vm-init hands its argv to agentbox_guest_init.vminit.main (a stand-in package shadows the real module)."""
    pkg = tmp_path / "agentbox_guest_init"
    pkg.mkdir()
    for f in (REPO / "agentbox_guest_init").glob("*.py"):
        if f.name != "vminit.py":
            (pkg / f.name).write_bytes(f.read_bytes())
    (pkg / "vminit.py").write_text("def main(argv):\n    print('vminit', argv)\n    return 7\n")
    p = subprocess.run([sys.executable, "-m", "agentbox_guest_init.cli", "vm-init", "/run/x.conf"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert (p.returncode, p.stdout) == (7, "vminit ['/run/x.conf']\n"), p.stderr
    assert "vm-init" not in run_cli("--help").stdout


def test_a_leading_own_name_is_skipped_as_libkrun_passes_argv_after_the_exec_path() -> None:
    with_name = run_cli("agentbox-guest-init", "status", "--timeout", "0")
    without = run_cli("status", "--timeout", "0")
    assert (with_name.returncode, with_name.stderr) == (without.returncode, without.stderr)
    assert "--timeout must be a positive number of seconds" in with_name.stderr


@pytest.mark.parametrize("words", [["microvm", "enter"], ["libkrun", "enter"], ["container", "enter"],
                                   ["default", "enter"], ["vm-init"], ["vm-init", "/run/agentbox/launch.conf"]])
def test_the_boot_path_fast_parse_matches_argparse(words: list[str]) -> None:
    fast = cli.fast_args(words)
    assert fast is not None
    full = vars(cli._parser().parse_args(words))
    assert {k: v for k, v in full.items() if k in vars(fast)} == vars(fast)


@pytest.mark.parametrize("words", [["vm-init", "--help"], ["status"], ["agent", "--port", "x"], ["microvm"]])
def test_other_command_lines_take_the_full_parser(words: list[str]) -> None:
    assert cli.fast_args(words) is None


def _report(nix: str = "ready", podman: str = "ready", error: str | None = None) -> dict[str, dict[str, object]]:
    return {"nix": {"state": nix, "error": error}, "podman": {"state": podman, "error": None}}


def test_the_readiness_gate_lists_what_the_contract_enables_and_is_missing() -> None:
    from agentbox_guest_init.env import GuestEnv

    genv = GuestEnv(nix_overlay=True, containers_storage=True, workspace_tag="ws", workspace_target="/workspace")
    mounted = "ws /workspace 9p rw 0 0\n"
    assert cli.readiness(_report(), genv, mounted) == {"ready": True, "reason": "ready", "missing": []}
    gate = cli.readiness(_report(nix="failed", podman="running", error="no disk AGENTBOX_NIX"), genv, "")
    assert gate["ready"] is False
    assert gate["missing"] == ["nix: failed (no disk AGENTBOX_NIX)", "podman: running",
                               "workspace: /workspace is not mounted"]
    plain = GuestEnv()  # nothing enabled: nothing to wait for
    assert cli.readiness(_report(nix="not-started", podman="not-started"), plain, "")["ready"] is True
    # a ready prep whose daemon does not accept connections yet (a socket file left by the last boot)
    stale = cli.readiness(_report(), genv, mounted, nix_daemon=False)
    assert stale["ready"] is False and stale["missing"] == [
        "nix: daemon not accepting connections at /nix/var/nix/daemon-socket/socket yet"]
