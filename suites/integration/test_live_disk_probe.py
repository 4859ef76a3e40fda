"""The live-disk probe against real Podman: the API (podman-py) sees a running container's
``krun.disk.*.path`` annotation as ``podman inspect`` does, and the probe fails closed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agentbox_runtime.container import podman_api
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.live_disks import PodmanContainers, users_of
from agentbox_runtime.podman import Podman

REPO = Path(__file__).resolve().parents[2]


def test_the_api_sees_the_annotations_podman_inspect_shows(tmp_path: Path, annotated_container,  # type: ignore[no-untyped-def]
                                                            podman_env: dict[str, str]) -> None:
    image = tmp_path / "libkrun-nix.raw"
    user = annotated_container.start({"krun.disk.0.path": str(image), "krun.disk.0.id": "agentbox-nix"})
    other = annotated_container.start({"krun.disk.1.path": str(image) + ".not-this-one"})
    running = PodmanContainers().annotations("resize")
    for cid in (user, other):
        shown = subprocess.run(["podman", "inspect", "--format", "{{json .Config.Annotations}}", cid], env=podman_env,
                               capture_output=True, text=True, timeout=120, check=True).stdout
        assert running[cid] == json.loads(shown)
    assert running[user]["krun.disk.0.id"] == "agentbox-nix"
    assert users_of(image, running) == [user]


def test_the_probe_fails_closed_when_podman_cannot_be_asked(tmp_path: Path) -> None:
    """In its own process: this one's session connection is already made."""
    host = f"unix://{tmp_path}/no-such.sock"
    script = textwrap.dedent("""
        from agentbox_runtime.errors import AgentboxError
        from agentbox_runtime.live_disks import PodmanContainers
        try:
            PodmanContainers().annotations("reset")
        except AgentboxError as exc:
            print(exc)
        """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "CONTAINER_HOST": host,
                                                               "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == (f"failed to list running Podman containers before libkrun reset: podman API: "
                                   f"CONTAINER_HOST={host} does not answer (accepted: unix://<socket of ours> of a "
                                   "running 'podman system service', or CONTAINER_HOST unset)")


def test_podman_output_carries_context_and_stderr(podman_env: dict[str, str]) -> None:
    with pytest.raises(AgentboxError, match=r"^inspecting: .*no-such-container-agentbox"):
        Podman().output(["container", "inspect", "no-such-container-agentbox"], "inspecting")
    assert podman_api.image_exists("localhost/no-such-image-agentbox:none") is False
