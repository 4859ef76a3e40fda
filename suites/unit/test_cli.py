"""The agentbox command line: accepted forms, rejected forms, bad input (exit 2, one line, nothing written)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentbox_runtime.cli import parse


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    """An isolated HOME/XDG environment with a workspace directory as cwd."""
    e = dict(os.environ)
    e.update(HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(tmp_path / "state"),
             XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    e.pop("AGENTBOX_CONFIG", None)
    e.pop("AGENTBOX_IMAGE", None)
    e.pop("AGENTBOX_KRUN_RUNTIME", None)  # never let the caller's selection start a real task
    for d in ("home", "state", "cfg", "ws"):
        (tmp_path / d).mkdir()
    return e


def agentbox(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_defaults_and_global_flags_anywhere() -> None:
    ns = parse([])
    assert ns.subcommand == "libkrun" and ns.libkrun_action is None and ns.command == []
    for argv in (["--debug", "container", "sidecar"], ["container", "--debug", "sidecar"],
                 ["container", "sidecar", "--debug"]):
        ns = parse(argv)
        assert ns.debug and ns.subcommand == "container" and ns.container_action == "sidecar"
    ns = parse(["--profile", "libkrun", "--root", "--mem", "8", "-p", "8080:80", "-p", "1:2"])
    assert ns.profile and ns.root and ns.mem == 8 and ns.publish == ["8080:80", "1:2"]
    ns = parse(["libkrun", "--mem", "2", "resize", "--target", "nix", "--size", "2TiB"])
    assert ns.libkrun_action == "resize" and ns.size == 2 << 40 and ns.mem == 2
    ns = parse(["libkrun", "reset-nix"])
    assert ns.libkrun_action == "reset-nix" and not ns.force
    ns = parse(["microvm", "--storage", "fuse-overlay", "--vmm", "qemu", "--", "sh", "-c", "exit 3"])
    assert ns.storage == "fuse-overlay" and ns.command == ["sh", "-c", "exit 3"]


REMOVED = ["--native", "--libkrun", "--sidecar-only", "--disable-nix-sidecar",
           "--libkrun-debug-entrypoint", "--libkrun-debug-guest-init", "--task-native", "--use-passt",
           "--host-nix-overlay", "--sync-nix-root", "--nix-sidecar", "--task-kvm"]


@pytest.mark.parametrize("flag", REMOVED)
@pytest.mark.parametrize("where", ["top", "libkrun", "container"])
def test_removed_flags_are_unknown_everywhere(flag: str, where: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = [flag] if where == "top" else [where, flag]
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2 and flag in capsys.readouterr().err


def test_more_accepted_forms() -> None:
    ns = parse(["--image", "ex/img:1", "container"])
    assert ns.image == "ex/img:1" and ns.subcommand == "container" and ns.container_action is None
    ns = parse(["container", "--image", "ex/img:2", "--root"])
    assert ns.image == "ex/img:2" and ns.root
    ns = parse(["libkrun", "--debug", "--tsi", "--guest-init", "./gi", "resize", "--target",
                "containers", "--size-bytes", "128G"])
    assert ns.debug and ns.tsi and ns.guest_init == "./gi" and ns.target == "containers"
    assert ns.size == 128 << 30
    ns = parse(["libkrun", "reset-nix", "--force", "--debug"])
    assert ns.force and ns.debug
    ns = parse(["--root", "--profile", "--debug", "--pull-latest"])
    assert ns.subcommand == "libkrun" and ns.root and ns.profile and ns.pull_latest


@pytest.mark.parametrize("argv", [
    ["--mem", "8"], ["--tsi"], ["--guest-init", "/x"], ["--publish", "8080:80"],
    ["container", "--mem", "8"], ["container", "--tsi"], ["microvm", "--storage", "btrfs"],
    ["libkrun", "resize", "--target", "nix"], ["libkrun", "resize", "--size", "1"],
    ["libkrun", "resize", "--target", "workspace", "--size", "1"], ["libkrun", "--mem", "0"],
    ["libkrun", "--mem", "8g"],
])
def test_rejected_forms_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2


def test_help_and_version(env: dict[str, str], tmp_path: Path) -> None:
    out = agentbox(env, tmp_path / "ws", "--help")
    assert out.returncode == 0 and "Launch a Podman shell" in out.stdout
    assert "experimental" in agentbox(env, tmp_path / "ws", "microvm", "--help").stdout
    assert agentbox(env, tmp_path / "ws", "--version").stdout.startswith("agentbox ")


BAD_SIZES = ["0", "-1", "1.5G", "10M", "99999999999T", "", "abc"]


@pytest.mark.parametrize("size", BAD_SIZES)
def test_bad_sizes(env: dict[str, str], tmp_path: Path, size: str) -> None:
    out = agentbox(env, tmp_path / "ws", "libkrun", "resize", "--target", "nix", "--size", size)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and f"'{size}'" in out.stderr
    assert "128, 128G, 128GiB, or 2TiB" in out.stderr or "size" in out.stderr
    assert tree(tmp_path / "state") == []


def _config(tmp_path: Path, text: str) -> None:
    (tmp_path / "cfg" / "agentbox").mkdir(exist_ok=True)
    (tmp_path / "cfg" / "agentbox" / "agentbox.toml").write_text(text)


@pytest.mark.parametrize("text,needle", [
    ('[state]\nlocation = "relative"\n', "must be an absolute path"),
    ('[state]\nlocation = "/no/such/dir"\n', "does not exist"),
    ('[state\n', "is not valid TOML"),
])
def test_bad_config(env: dict[str, str], tmp_path: Path, text: str, needle: str) -> None:
    _config(tmp_path, text)
    out = agentbox(env, tmp_path / "ws", "libkrun", "reset-nix", "--force")
    assert out.returncode == 2 and needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert tree(tmp_path / "state") == []


@pytest.mark.parametrize("args,needle", [
    (["libkrun", "--tsi", "-p", "8080:80"], "not supported with --tsi"),
    (["libkrun", "-p", " "], "publish spec must not be empty"),
    (["libkrun", "--guest-init", "DIR"], "is not a regular file"),
    (["libkrun", "--guest-init", "MISSING"], "failed to resolve libkrun guest-init override"),
    (["libkrun", "reset-nix"], "refusing to reset libkrun /nix raw image without --force"),
    (["libkrun", "resize", "--target", "nix", "--size", "128G"], "does not exist; run agentbox libkrun once"),
])
def test_bad_input_one_line_nothing_written(env: dict[str, str], tmp_path: Path, args: list[str],
                                            needle: str) -> None:
    args = [str(tmp_path) if a == "DIR" else str(tmp_path / "missing") if a == "MISSING" else a
            for a in args]
    out = agentbox(env, tmp_path / "ws", *args)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert tree(tmp_path / "state") == [] and tree(tmp_path / "home") == []


def test_libkrun_task_without_krun_handler_stops_before_anything(env: dict[str, str], tmp_path: Path) -> None:
    from agentbox_runtime.hostcheck.crun import check_crun_krun

    if check_crun_krun().ok:
        pytest.skip("this host's crun has the krun handler; the refusal cannot be observed")
    for args in ([], ["libkrun", "--mem", "2", "--tsi"], ["--pull-latest"]):
        out = agentbox(env, tmp_path / "ws", *args)
        assert out.returncode == 1, out.stderr
        assert out.stderr.startswith("agentbox: libkrun mode needs crun built with libkrun: ")
        assert "agentbox doctor" in out.stderr and len(out.stderr.strip().splitlines()) == 1
        assert tree(tmp_path / "state") == [] and tree(tmp_path / "home") == []


@pytest.mark.parametrize("code,expected", [(0, 0), (3, 3), (255, 255), (256, 1), (-9, 1), (None, 1)])
def test_child_status_is_clamped(code: int | None, expected: int) -> None:
    from agentbox_runtime.commands.krun_podman_command import exit_status

    assert exit_status(code) == expected


def test_cli_logging_follows_sys_stderr_even_after_a_captured_stream_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import logging

    from agentbox_runtime.cli import cli_logging

    first, later = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    cli_logging()
    logging.getLogger("agentbox").info("while captured")
    first.close()  # what pytest does to a test's capture stream
    monkeypatch.setattr(sys, "stderr", later)
    logging.getLogger("agentbox").info("after")
    assert later.getvalue() == "after\n"


@pytest.mark.parametrize("mode", ["microvm", "container"])
def test_hardened_with_root_is_one_line_and_nothing_is_written(env: dict[str, str], tmp_path: Path, mode: str) -> None:
    before = tree(tmp_path)
    out = agentbox(env, tmp_path / "ws", mode, "--hardened", "--root", "--", "true")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"agentbox: --hardened runs the {'shell' if mode == 'microvm' else 'task'} as dev with the hardened "
        "profile; it cannot be combined with --root"]
    assert tree(tmp_path) == before
