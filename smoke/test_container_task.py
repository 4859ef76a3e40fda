"""Container mode (reference 8): a native Podman task next to the workspace's nix-daemon sidecar."""

import subprocess

import pytest


@pytest.mark.slow
def test_task_runs_beside_a_healthy_sidecar(nix_sidecar, container_task):
    assert nix_sidecar.name.startswith("agentbox-nix-sidecar-")
    state = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", nix_sidecar.name],
                           capture_output=True, text=True, timeout=60).stdout.strip()
    assert state == "true"
    container_task.fail("touch /nix/store/not-writable", timeout=60)
    assert container_task.succeed("echo $NIX_REMOTE", timeout=60).strip() == \
        "unix:///nix/var/nix/daemon-socket/socket"
    path = container_task.succeed("echo smoke-$RANDOM > /tmp/f && nix-store --add /tmp/f", timeout=120).strip()
    assert path.startswith("/nix/store/")
    container_task.succeed(f"nix-store --check-validity {path}", timeout=60)
