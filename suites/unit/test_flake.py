"""flake.nix cannot be built here; keep it parseable and holding the image contract."""

import shutil
import subprocess
from pathlib import Path

import pytest

FLAKE = Path(__file__).resolve().parents[2] / "flake.nix"


@pytest.mark.skipif(shutil.which("nix-instantiate") is None,
                    reason="needs nix-instantiate: apt-get install nix-bin")
def test_flake_parses() -> None:
    proc = subprocess.run(["nix-instantiate", "--parse", str(FLAKE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_flake_keeps_the_guest_contract() -> None:
    text = FLAKE.read_text()
    for needle in ('"/bin/agentbox-guest-init" "default" "enter" "--"', "bin/agentbox-guest-init",
                   "AGENTBOX_REAL_PODMAN", "devShells", "harness", "image"):
        assert needle in text, needle
