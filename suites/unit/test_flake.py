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
    for needle in (f"Entrypoint = [ {entrypoint} ];", f"Cmd = [ {cmd} ];", 'WorkingDir = workdir;',
                   "$out/bin/agentbox-guest-init", "bin/agentbox-guest-init", "python3 -I",
                   "from agentbox_guest_init.cli import main", "AGENTBOX_REAL_PODMAN=", "SHELL=",
                   recipe.LABEL_GUEST_INIT, "usr/local/bin", "agentbox_runtime/images/files", "agentbox_guest_init/wrappers",
                   "${user}:x:${toString uid}:${toString gid}::${home}:", "nixbld:x:30000:", "boot/vmlinuz-", "lib/modules",
                   "devShells", "harness = py.buildPythonApplication", "pkgs.dockerTools.buildLayeredImage"):
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
    assert "mkdir -p .${home}/.config .${home}/.local/share .${home}/.local/state .${home}/.cache" in text
    assert "chown -R ${toString uid}:${toString gid} .${home}" in text


def test_every_flake_output_the_doctor_points_at_exists() -> None:
    import re

    text = FLAKE.read_text()
    outputs = text.split("packages = forAll", 1)[1].split("devShells", 1)[0]
    named = set(re.findall(r"^\s+(\w+) = ", outputs, re.M)) | {
        n for line in re.findall(r"inherit ([\w ]+);", outputs) for n in line.split()}
    doctor = REPO / "agentbox_runtime" / "doctor"
    pointed = {m for f in doctor.glob("*.py") for m in re.findall(r"\.#(\w+)", f.read_text())}
    assert pointed and pointed <= named, pointed - named


def test_the_flake_image_user_matches_agentbox_image_build() -> None:
    """``image.override { user; uid; gid; workdir; }`` is ``agentbox image build --user ...``: the same
    defaults, the same labels, and an /etc/agentbox/image-user that the guest parses to the same user."""
    from agentbox_guest_init.image_user import LABELS, ImageUser

    text = FLAKE.read_text()
    d = ImageUser()
    assert (f'mkImage = {{ user ? "{d.user}", uid ? {d.uid}, gid ? {d.gid}, workdir ? "{d.workdir}" }}:' in text)
    assert "image = pkgs.lib.makeOverridable mkImage { };" in text
    for field, label in LABELS.items():
        value = field if field in ("user", "workdir") else f"toString {field}"
        assert f'"{label}" = {value};' in text, label
    line = next(ln.strip() for ln in text.splitlines() if ln.strip().startswith("printf 'user="))
    assert line == "printf 'user=%s\\nuid=%s\\ngid=%s\\nworkdir=%s\\n' ${user} ${toString uid} ${toString gid} ${workdir} \\"
    agent = ImageUser(user="agent", uid=2000, gid=2001, workdir="/work")
    script = (line.rstrip(" \\").replace("${user}", agent.user).replace("${toString uid}", str(agent.uid))
              .replace("${toString gid}", str(agent.gid)).replace("${workdir}", agent.workdir))
    made = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30, check=True)
    assert ImageUser.from_text(made.stdout) == agent
