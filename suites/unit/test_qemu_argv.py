"""Golden qemu command lines and the exit-status file mapping of the qemu backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentbox_guest_init.launch_config import LaunchConfig, LaunchDisk
from agentbox_runtime.vmm.base import VmSpec
from agentbox_runtime.vmm.qemu import build_argv, parse_status, socket_dir, tail

LAUNCH = LaunchConfig(
    task_rootfs="/r", workspace_source="/w/proj", workspace_tag="agentbox-workspace",
    workspace_target="/workspace", ram_mib=2048, vcpus=2, workdir="/workspace",
    exec_path="/bin/agentbox-guest-init",
    disks=(LaunchDisk("agentbox-nix", "/s/nix.raw"),
           LaunchDisk("agentbox-containers", "/s/containers.raw", read_only=True)),
    argv=("agentbox-guest-init", "microvm", "enter"))


def golden(task: Path, sock: Path, *, accel: str, interactive: bool) -> list[str]:
    con = ("stdio,id=con,signal=off" if interactive
           else f"socket,id=con,path={sock}/console.sock,server=on,wait=off")
    return [
        f"qemu-system-{os.uname().machine}", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-machine", "pc", "-accel", "kvm" if accel == "kvm" else "tcg,thread=multi",
        "-cpu", "host" if accel == "kvm" else "max", "-m", "2048", "-smp", "2",
        "-kernel", "/k/vmlinuz", "-initrd", f"{task}/initrd.img",
        "-append", "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init acpi=noirq cryptomgr.notests=1",
        "-chardev", f"socket,id=ser0,path={sock}/serial.sock,server=off", "-serial", "chardev:ser0",
        "-chardev", f"socket,id=qmp,path={sock}/qmp.sock,server=on,wait=off", "-mon", "chardev=qmp,mode=control",
        "-device", "virtio-serial-pci,id=vser",
        "-chardev", f"socket,id=agent,path={sock}/agent.sock,server=on,wait=off",
        "-device", "virtserialport,bus=vser.0,chardev=agent,name=org.agentbox.agent",
        "-chardev", f"socket,id=attach,path={sock}/attach.sock,server=on,wait=off",
        "-device", "virtserialport,bus=vser.0,chardev=attach,name=org.agentbox.attach",
        "-chardev", f"socket,id=status,path={sock}/status.sock,server=off",
        "-device", "virtserialport,bus=vser.0,chardev=status,name=org.agentbox.status",
        "-chardev", con,
        "-device", "virtconsole,bus=vser.0,chardev=con",
        "-fsdev", "local,id=root,path=/r,security_model=passthrough",
        "-device", "virtio-9p-pci,fsdev=root,mount_tag=agentbox-root",
        "-fsdev", "local,id=ws,path=/w/proj,security_model=none",
        "-device", "virtio-9p-pci,fsdev=ws,mount_tag=agentbox-workspace",
        "-drive", "file=/s/nix.raw,if=none,id=d0,format=raw,cache=writeback,discard=unmap",
        "-device", "virtio-blk-pci,drive=d0,serial=agentbox-nix",
        "-drive", "file=/s/containers.raw,if=none,id=d1,format=raw,cache=writeback,discard=unmap,readonly=on",
        "-device", "virtio-blk-pci,drive=d1,serial=agentbox-containers",
        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-device", "virtio-rng-pci",
    ]


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
@pytest.mark.parametrize("interactive", [False, True])
def test_golden_argv(tmp_path: Path, accel: str, interactive: bool) -> None:
    task = tmp_path / "task"
    spec = VmSpec(rootfs=Path("/r"), launch=LAUNCH, task_dir=task, interactive=interactive)
    argv = build_argv(spec, kernel=Path("/k/vmlinuz"), initrd=task / "initrd.img", accel=accel)
    assert argv == golden(task, socket_dir(task), accel=accel, interactive=interactive)


def test_socket_dir_is_short_private_and_per_task(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 150) / "task"
    sock = socket_dir(deep)
    assert len(str(sock / "console.sock")) < 108
    assert sock.stat().st_mode & 0o777 == 0o700
    assert socket_dir(deep) == sock and socket_dir(tmp_path / "other") != sock


def test_zero_vcpus_still_boots_one_cpu(tmp_path: Path) -> None:
    launch = LaunchConfig(**{**LAUNCH.__dict__, "vcpus": 0, "disks": ()})
    argv = build_argv(VmSpec(rootfs=Path("/r"), launch=launch, task_dir=tmp_path),
                      kernel=Path("/k"), initrd=Path("/i"), accel="tcg")
    assert argv[argv.index("-smp") + 1] == "1"
    assert "-drive" not in argv


@pytest.mark.parametrize("text,status", [
    ("exit=3\n", 3), ("exit=0\n", 0), ("signal=9\n", 137), ("noise\nexit=5\n", 5),
    ("exit=1\nexit=2\n", 2), ("", None), ("exit=x\n", None),
])
def test_status_file_maps_to_exit_code(text: str, status: int | None) -> None:
    assert parse_status(text) == status


def test_tail_shows_the_last_lines_or_says_why_not(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert tail(log) == "(no console output)"
    log.write_text("")
    assert tail(log) == "(empty console log)"
    log.write_text("".join(f"line {i}\n" for i in range(40)))
    assert tail(log, 3) == "line 37\nline 38\nline 39"
