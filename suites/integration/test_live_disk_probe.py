"""The live-disk probe against real Podman: the CLI and the API (podman-py) implementations
see the same running container's ``krun.disk.*.path`` annotation, and both fail closed."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.live_disks import ApiContainers, CliContainers, api_socket, default_containers, users_of
from agentbox_runtime.podman import Podman

SOCKET_WAIT_S = 30.0


@pytest.fixture()
def api_service(tmp_path: Path, podman_env: dict[str, str]) -> Iterator[Path]:
    """A private ``podman system service`` on a socket in ``tmp_path``; stopped afterwards."""
    sock = tmp_path / "podman.sock"
    log = tmp_path / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                                env=podman_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SOCKET_WAIT_S
        while not sock.is_socket():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"podman system service did not create {sock} within {SOCKET_WAIT_S:.0f}s "
                            f"(exit {proc.poll()}): {log.read_text()[-800:]}")
            time.sleep(0.1)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def test_cli_and_api_see_the_same_users(tmp_path: Path, annotated_container, api_service: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "libkrun-nix.raw"
    user = annotated_container.start({"krun.disk.0.path": str(image), "krun.disk.0.id": "agentbox-nix"})
    other = annotated_container.start({"krun.disk.1.path": str(image) + ".not-this-one"})
    for source in (CliContainers(), ApiContainers(api_service)):
        running = source.annotations("resize")
        assert running[user]["krun.disk.0.id"] == "agentbox-nix", type(source).__name__
        assert other in running
        assert users_of(image, running) == [user], type(source).__name__


def test_default_picks_the_api_when_its_socket_answers(api_service: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTAINER_HOST", f"unix://{api_service}")
    assert api_socket() == api_service
    assert isinstance(default_containers(), ApiContainers)


def test_api_fails_closed_when_the_socket_is_gone(tmp_path: Path) -> None:
    with pytest.raises(AgentboxError, match="failed to list running Podman containers before libkrun reset"):
        ApiContainers(tmp_path / "no.sock").annotations("reset")


def test_cli_fails_closed_on_a_podman_error(podman_env: dict[str, str]) -> None:
    broken = Podman()
    broken.prefix = ["podman", "--url", "unix:///nonexistent/podman.sock", "--remote"]
    with pytest.raises(AgentboxError, match=r"^failed to list running Podman containers before libkrun resize: "):
        CliContainers(broken).annotations("resize")


def test_podman_output_carries_context_and_stderr(podman_env: dict[str, str]) -> None:
    with pytest.raises(AgentboxError, match=r"^inspecting: .*no-such-container-agentbox"):
        Podman().output(["container", "inspect", "no-such-container-agentbox"], "inspecting")
    assert Podman().image_exists("localhost/no-such-image-agentbox:none") is False
