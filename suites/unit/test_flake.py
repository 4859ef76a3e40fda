"""flake.nix cannot be built here; keep it parseable and holding the image contract."""

import shutil
import subprocess
from pathlib import Path

import pytest

from agentbox_runtime.images import recipe

FLAKE = Path(__file__).resolve().parents[2] / "flake.nix"


@pytest.mark.skipif(shutil.which("nix-instantiate") is None,
                    reason="needs nix-instantiate to parse flake.nix: apt-get install nix-bin")
def test_flake_parses() -> None:
    proc = subprocess.run(["nix-instantiate", "--parse", str(FLAKE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_flake_keeps_the_guest_contract() -> None:
    text = FLAKE.read_text()
    entrypoint = " ".join(f'"{part}"' for part in recipe.ENTRYPOINT)
    cmd = " ".join(f'"{part}"' for part in recipe.CMD)
    for needle in (f"Entrypoint = [ {entrypoint} ];", f"Cmd = [ {cmd} ];", 'WorkingDir = "/workspace";',
                   "$out/bin/agentbox-guest-init", "bin/agentbox-guest-init", "python3 -I",
                   "from agentbox_guest_init.cli import main", "AGENTBOX_REAL_PODMAN=", "SHELL=",
                   recipe.LABEL_GUEST_INIT, "usr/local/bin", "agentbox_runtime/images/files", "agentbox_guest_init/wrappers",
                   "dev:x:1000:1000::/home/dev:", "nixbld:x:30000:", "boot/vmlinuz-", "lib/modules",
                   "devShells", "harness = py.buildPythonApplication", "image = pkgs.dockerTools"):
        assert needle in text, needle
