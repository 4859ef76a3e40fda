"""launch.conf round trip and every parse error (reference 9.7)."""

import pytest

from agentbox_guest_init.launch_config import LaunchConfig, LaunchConfigError, LaunchDisk, decode, encode

CFG = LaunchConfig(
    task_rootfs="/s/microvm-tasks/t/rootfs-fuse-overlay", workspace_source="/w/proj",
    workspace_tag="agentbox-workspace", workspace_target="/workspace", ram_mib=4096, vcpus=2,
    workdir="/workspace", exec_path="/nix/store/x-agentbox/bin/agentbox-guest-init",
    disks=(LaunchDisk("agentbox-nix", "/s/microvm-nix.raw"),
           LaunchDisk("agentbox-containers", "/s/microvm-containers.raw", True)),
    argv=("agentbox-guest-init", "microvm", "enter", "--", "fish", "-l"),
    env=("AGENTBOX_HOST_UID=1000", "X=a=b", "EMPTY="))


def test_round_trip_is_exact() -> None:
    text = encode(CFG)
    assert decode(text) == CFG
    assert encode(decode(text)) == text
    assert text.splitlines()[0] == "task_rootfs=" + CFG.task_rootfs.encode().hex()
    assert "disk.1.read_only=" + b"true".hex() in text


def _valid_lines() -> list[str]:
    return encode(CFG).splitlines()


@pytest.mark.parametrize("text,message", [
    ("unknown=61\n", "contains unknown key unknown"),
    ("task_rootfs=6\n", "line 1 has invalid hex"),
    ("task_rootfs=zz\n", "line 1 has invalid hex"),
    ("task_rootfs=ff\n", "line 1 has invalid hex"),
    ("task_rootfs=2f\n", "missing required key workspace_source"),
    ("task_rootfs\n", "line 1 is missing '='"),
])
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(LaunchConfigError, match=message):
        decode(text)


def _with(line: str, drop: str | None = None) -> str:
    lines = [line_ for line_ in _valid_lines() if not (drop and line_.startswith(drop))]
    return "\n".join(lines + [line]) + "\n"


@pytest.mark.parametrize("text,message", [
    (_with("disk.0.size=31"), "contains unknown key disk.0.size"),
    (_with("disk.0=31"), "disk entry disk.0 is missing field"),
    (_with("disk.x.id=31"), "index in disk.x.id is invalid"),
    (_with("disk.2.read_only=" + b"yes".hex()), "disk entry disk.2.read_only has invalid read_only"),
    (_with("disk.2.id=31"), "disk.2 missing path"),
    (_with("env.9=" + b"NOEQUALS".hex()), "env entry env.9 is missing '='"),
    (_with("argv.-1=31"), "index in argv.-1 is invalid"),
    (_with("vcpus=" + b"2".hex()), "repeats key vcpus"),
    (_with("vcpus=" + b"300".hex(), drop="vcpus="), "vcpus is invalid"),
    (_with("ram_mib=" + b"-1".hex(), drop="ram_mib="), "ram_mib is invalid"),
])
def test_semantic_errors(text: str, message: str) -> None:
    with pytest.raises(LaunchConfigError, match=message):
        decode(text)


def test_blank_lines_are_skipped() -> None:
    assert decode("\n" + encode(CFG) + "\n\n") == CFG
