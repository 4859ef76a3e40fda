"""Pure parts of the container-mode task flow and the harness containers.conf."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentbox_runtime.container import host_conf
from agentbox_runtime.container.lifecycle import (
    adapt_task_argv, clamp_status, rootful_dev_ids, sidecar_only_message,
)
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.container.sidecar import Sidecar
from agentbox_runtime.container.state_file import MountMode

REFERENCE = ["run", "--rm", "-it", "--name", "p-0123456789abcdef", "--userns", "keep-id",
             "--workdir", "/workspace", "localhost/agentbox:latest", "fish", "-l"]


IMAGE = "localhost/agentbox:latest"
ROOTFUL_ENV = ["--env", "AGENTBOX_HOST_UID=1000", "--env", "AGENTBOX_HOST_GID=1000"]


def test_interactive_rootless_keeps_the_reference_argv() -> None:
    assert adapt_task_argv(REFERENCE, IMAGE, interactive=True, rootless=True) == REFERENCE


def test_non_tty_drops_only_the_t() -> None:
    out = adapt_task_argv(REFERENCE, IMAGE, interactive=False, rootless=True)
    assert out == [a if a != "-it" else "-i" for a in REFERENCE]


def test_rootful_replaces_keep_id_with_host_ids_before_the_image() -> None:
    out = adapt_task_argv(REFERENCE, IMAGE, interactive=True, rootless=False,
                          dev_ids=("1000", "1000"))
    assert out == REFERENCE[:5] + REFERENCE[7:9] + ROOTFUL_ENV + [IMAGE, "fish", "-l"]


def test_command_replaces_fish_and_is_never_rewritten() -> None:
    out = adapt_task_argv(REFERENCE, IMAGE, interactive=False, rootless=False,
                          command=["podman", "run", "-it", "--userns", "keep-id", "x"])
    assert out[-7:] == [IMAGE, "podman", "run", "-it", "--userns", "keep-id", "x"]
    assert "-it" not in out[:-7] and "keep-id" not in out[:-7]


def test_argv_without_the_image_is_an_error() -> None:
    with pytest.raises(AgentboxError):
        adapt_task_argv(REFERENCE, "other:tag", interactive=True, rootless=True)


@pytest.mark.parametrize(("environ", "ids"), [
    ({"SUDO_UID": "1234", "SUDO_GID": "99"}, ("1234", "99")),
    ({"SUDO_UID": "1234"}, ("1000", "1000")),
    ({}, ("1000", "1000")),
])
def test_rootful_dev_ids(environ: dict[str, str], ids: tuple[str, str]) -> None:
    assert rootful_dev_ids(environ) == ids


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
        "# written by agentbox-harness (agentbox_runtime.container.host_conf)\n[containers]\n"
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
