"""The in-image command wrappers (7.15), run for real with stand-in tools that log their calls."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

WRAPPERS = Path(__file__).resolve().parents[3] / "agentbox_guest_init/wrappers"
FAKE = """#!/bin/sh
echo "{name} $* | LD_PRELOAD=${{LD_PRELOAD-unset}} NIX_REMOTE=${{NIX_REMOTE-unset}}" >> "$WRAPPER_LOG"
exit ${{FAKE_{var}_STATUS:-0}}
"""


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.wrap, self.real, self.log = tmp / "usr/local/bin", tmp / "usr/bin", tmp / "calls.log"
        shutil.copytree(WRAPPERS, self.wrap)
        self.real.mkdir(parents=True)
        for name in ("podman", "nix", "docker-compose", "agentbox-guest-init"):
            (self.real / name).write_text(FAKE.format(name=name, var=name.replace("-", "_").upper()))
            (self.real / name).chmod(0o755)
        self.ready_dir = tmp / "ready"
        self.ready_dir.mkdir()
        self.tmp = tmp

    def run(self, tool: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        base = {"PATH": f"{self.wrap}:{self.real}:/usr/bin:/bin", "WRAPPER_LOG": str(self.log),
                "LD_PRELOAD": "", "NSS_WRAPPER_PASSWD": "/x", "AGENTBOX_NIX_READY_DIR": str(self.ready_dir)}
        base.update(env)
        return subprocess.run([str(self.wrap / tool), *args], capture_output=True, text=True, timeout=30, env=base)

    def calls(self) -> list[str]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        self.log.unlink(missing_ok=True)
        return lines


@pytest.fixture()
def bench(tmp_path: Path) -> Bench:
    return Bench(tmp_path)


UNSET = "LD_PRELOAD=unset NIX_REMOTE=unset"


def test_podman_without_storage_runs_the_real_podman_directly(bench: Bench) -> None:
    p = bench.run("podman", "info", "--format", "{{.Host}}")
    assert p.returncode == 0, p.stderr
    assert bench.calls() == [f"podman info --format {{{{.Host}}}} | {UNSET}"]


def test_podman_with_storage_waits_for_prep_first(bench: Bench) -> None:
    assert bench.run("podman", "ps", AGENTBOX_LIBKRUN_CONTAINERS_STORAGE="1").returncode == 0
    assert bench.calls() == [f"agentbox-guest-init libkrun podman wait | {UNSET}", f"podman ps | {UNSET}"]


def test_podman_skips_the_wait_only_when_the_prep_status_reads_ready(bench: Bench) -> None:
    status = bench.tmp / "podman-prep.status"
    env = {"AGENTBOX_LIBKRUN_CONTAINERS_STORAGE": "1", "AGENTBOX_PODMAN_PREP_STATUS": str(status)}
    status.write_text("state=ready\npid=12\n")
    assert bench.run("podman", "ps", **env).returncode == 0
    assert bench.calls() == [f"podman ps | {UNSET}"]
    for text in ("state=running\npid=12\n", "state=failed\nerror=x\n", "state=readyish\n", ""):
        status.write_text(text)
        assert bench.run("podman", "ps", **env).returncode == 0
        assert bench.calls() == [f"agentbox-guest-init libkrun podman wait | {UNSET}", f"podman ps | {UNSET}"], text
    status.unlink()
    assert bench.run("podman", "ps", **env).returncode == 0
    assert bench.calls()[0] == f"agentbox-guest-init libkrun podman wait | {UNSET}"


def test_a_failed_wait_stops_the_wrapper_with_its_status(bench: Bench) -> None:
    p = bench.run("podman", "ps", AGENTBOX_LIBKRUN_CONTAINERS_STORAGE="1", FAKE_AGENTBOX_GUEST_INIT_STATUS="3")
    assert p.returncode == 3
    assert bench.calls() == [f"agentbox-guest-init libkrun podman wait | {UNSET}"]


def test_docker_starts_the_api_service_and_runs_podman(bench: Bench) -> None:
    assert bench.run("docker", "run", "--rm", "alpine", AGENTBOX_LIBKRUN_CONTAINERS_STORAGE="1").returncode == 0
    assert bench.calls() == [f"agentbox-guest-init libkrun podman service-wait | {UNSET}",
                             f"podman run --rm alpine | {UNSET}"]


def test_docker_honours_agentbox_real_podman(bench: Bench) -> None:
    other = bench.tmp / "opt/podman"
    other.parent.mkdir()
    other.write_text(FAKE.format(name="other-podman", var="OTHER"))
    other.chmod(0o755)
    assert bench.run("docker", "info", AGENTBOX_REAL_PODMAN=str(other)).returncode == 0
    assert bench.calls() == [f"other-podman info | {UNSET}"]


def test_docker_compose_starts_the_service_then_runs_compose(bench: Bench) -> None:
    assert bench.run("docker-compose", "version", AGENTBOX_LIBKRUN_CONTAINERS_STORAGE="1").returncode == 0
    assert bench.calls() == [f"agentbox-guest-init libkrun podman service-wait | {UNSET}",
                             f"docker-compose version | {UNSET}"]


def test_nix_waits_once_per_user_then_runs_the_real_nix(bench: Bench) -> None:
    remote = "NIX_REMOTE=unix:///nix/var/nix/daemon-socket/socket"
    assert bench.run("nix", "build", ".#x", AGENTBOX_LIBKRUN_NIX_OVERLAY="1").returncode == 0
    calls = bench.calls()
    assert calls[0] == "agentbox-guest-init libkrun nix wait | LD_PRELOAD=unset NIX_REMOTE=unix:///nix/var/nix/daemon-socket/socket"
    assert calls[1].startswith("nix --extra-experimental-features nix-command store info --store unix:///")
    assert calls[2] == f"nix build .#x | LD_PRELOAD=unset {remote}"
    assert (bench.ready_dir / f"agentbox-nix-daemon-ready-{os.getuid()}").exists()
    assert bench.run("nix", "--version", AGENTBOX_LIBKRUN_NIX_OVERLAY="1").returncode == 0
    assert bench.calls() == [f"nix --version | LD_PRELOAD=unset {remote}"]


def test_nix_keeps_an_explicit_nix_remote_and_fails_closed(bench: Bench) -> None:
    p = bench.run("nix", "build", AGENTBOX_LIBKRUN_NIX_OVERLAY="1", NIX_REMOTE="daemon",
                  FAKE_AGENTBOX_GUEST_INIT_STATUS="1")
    assert p.returncode == 1
    assert bench.calls() == ["agentbox-guest-init libkrun nix wait | LD_PRELOAD=unset NIX_REMOTE=daemon"]
    assert not any(bench.ready_dir.iterdir())


def test_nix_without_the_overlay_does_not_wait(bench: Bench) -> None:
    assert bench.run("nix", "--version", AGENTBOX_LIBKRUN_NIX_OVERLAY="true").returncode == 0
    assert bench.calls() == [f"nix --version | {UNSET}"]


def test_a_missing_real_binary_is_reported(bench: Bench) -> None:
    (bench.real / "docker-compose").unlink()
    p = bench.run("docker-compose", "version", PATH=f"{bench.wrap}:{bench.real}")
    assert p.returncode == 127 and "agentbox wrapper: no real docker-compose on PATH" in p.stderr


def test_the_podman_fast_path_reads_the_contract_status_file() -> None:
    from agentbox_guest_init import contract

    lib = (WRAPPERS / "agentbox-wrapper-lib").read_text()
    assert f"${{AGENTBOX_PODMAN_PREP_STATUS:-{contract.PODMAN_PREP_STATUS}}}" in lib
