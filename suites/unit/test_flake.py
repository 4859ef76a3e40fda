"""flake.nix cannot be built here; keep it parseable and holding the image contract."""

import shutil
import subprocess
from pathlib import Path

import pytest

from agentbox_runtime.images import recipe

REPO = Path(__file__).resolve().parents[2]
FLAKE = REPO / "flake.nix"


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


def _guest_tools(text: str) -> set[str]:
    block = text.split("guestTools = with pkgs; [", 1)[1].split("];", 1)[0]
    return set(block.split())


def test_the_flake_image_boots_on_the_qemu_backend_as_the_host_reads_it() -> None:
    """The host reads the kernel, its modules and busybox out of the unpacked image: real files (an
    absolute /nix/store symlink would resolve against the host's store), and a static busybox (the
    initramfs runs it before any library is there)."""
    text = FLAKE.read_text()
    assert "staticBusybox = pkgs.pkgsStatic.busybox;" in text
    assert "cp ${staticBusybox}/bin/busybox bin/busybox" in text
    assert "cp ${kernel}/bzImage boot/vmlinuz-${kernel.modDirVersion}" in text
    assert "cp -rL ${kernel}/lib/modules lib/modules" in text
    assert "ln -s ${kernel}" not in text and "busybox" not in _guest_tools(text)
    assert "includeNixDB = true;" in text
    assert '"PATH=/usr/local/bin:/bin:${pkgs.lib.makeBinPath guestTools}"' in text


def test_the_flake_image_carries_what_the_image_contract_checks() -> None:
    from agentbox_harness.image_contract import DEFAULT_TOOLS

    package_of = {"rg": "ripgrep", "diff": "diffutils"}
    tools = _guest_tools(FLAKE.read_text())
    assert {package_of.get(t, t) for t in DEFAULT_TOOLS} <= tools
    assert {"catatonit", "netavark", "aardvark-dns", "iptables", "nix"} <= tools
    text = FLAKE.read_text()
    assert "mkdir -p home/dev/.config home/dev/.local/share home/dev/.local/state home/dev/.cache" in text
    assert "chown -R 1000:1000 home/dev" in text


def test_every_flake_output_the_doctor_points_at_exists() -> None:
    import re

    text = FLAKE.read_text()
    outputs = text.split("packages = forAll", 1)[1].split("devShells", 1)[0]
    named = set(re.findall(r"^\s+(\w+) = ", outputs, re.M)) | {
        n for line in re.findall(r"inherit ([\w ]+);", outputs) for n in line.split()}
    doctor = REPO / "agentbox_runtime" / "doctor"
    pointed = {m for f in doctor.glob("*.py") for m in re.findall(r"\.#(\w+)", f.read_text())}
    assert pointed and pointed <= named, pointed - named
