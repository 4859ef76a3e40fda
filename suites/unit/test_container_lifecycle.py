"""Pure parts of the container-mode task flow and the harness containers.conf."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.container import host_conf
from runtime.container.lifecycle import adapt_task_argv, clamp_status, sidecar_only_message
from runtime.container.sidecar import Sidecar
from runtime.container.state_file import MountMode

REFERENCE = ["run", "--rm", "-it", "--name", "p-0123456789abcdef", "--userns", "keep-id",
             "--workdir", "/workspace", "localhost/agentbox:latest", "fish", "-l"]


def test_interactive_rootless_keeps_the_reference_argv() -> None:
    assert adapt_task_argv(REFERENCE, interactive=True, rootless=True) == REFERENCE


def test_non_tty_drops_only_the_t() -> None:
    out = adapt_task_argv(REFERENCE, interactive=False, rootless=True)
    assert out == [a if a != "-it" else "-i" for a in REFERENCE]


def test_rootful_drops_keep_id_and_nothing_else() -> None:
    out = adapt_task_argv(REFERENCE, interactive=True, rootless=False)
    assert out == REFERENCE[:5] + REFERENCE[7:]


def test_keep_id_in_the_guest_command_is_not_touched() -> None:
    argv = [*REFERENCE[:-2], "echo", "--userns"]
    assert adapt_task_argv(argv, interactive=True, rootless=False)[-2:] == ["echo", "--userns"]


@pytest.mark.parametrize(("code", "out"), [(0, 0), (3, 3), (255, 255), (256, 1), (-9, 1)])
def test_clamp_status(code: int, out: int) -> None:
    assert clamp_status(code) == out


def test_sidecar_only_message_is_the_reference_line() -> None:
    sc = Sidecar("agentbox-nix-sidecar-p-0123456789abcdef", Path("/s/nix-merged"), 40001,
                 MountMode.DIRECT, "id", reused=True)
    assert sidecar_only_message(sc) == (
        "agentbox: sidecar 'agentbox-nix-sidecar-p-0123456789abcdef' is started or reused on "
        "host port 40001; leaving it running for inspection")


def test_host_containers_conf_text() -> None:
    assert host_conf.render("runc", 1024, 512) == (
        "# written by agentbox-harness (runtime.container.host_conf)\n[containers]\n"
        'default_ulimits = ["nofile=1024:1024", "nproc=512:512"]\n\n[engine]\nruntime = "runc"\n')


def test_host_ulimits_stay_within_hard_limits() -> None:
    import resource
    nofile, nproc = host_ulimits = host_conf.host_ulimits()
    for kind, value in ((resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_NPROC, nproc)):
        hard = resource.getrlimit(kind)[1]
        assert hard == resource.RLIM_INFINITY or value <= hard
    assert host_ulimits[0] <= host_conf.NOFILE_CAP and host_ulimits[1] <= host_conf.NPROC_CAP


def test_ensure_writes_once_and_returns_the_path(tmp_path: Path) -> None:
    path = host_conf.ensure(tmp_path / "c" / "containers.conf")
    first = path.stat().st_mtime_ns
    assert host_conf.ensure(path) == path and path.stat().st_mtime_ns == first
    assert 'runtime = "runc"' in path.read_text()
