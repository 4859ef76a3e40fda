"""Golden argv of libkrun tasks (6.2), resize maintenance VMs (6.4) and container tasks (8.2).

The golden argv are the rootless (reference) ones: euid is pinned to 1000 unless a test says root."""

import os
import shlex
from pathlib import Path

import pytest

from agentbox_runtime.disks import LIBKRUN_CONTAINERS, LIBKRUN_NIX
from agentbox_runtime.container.lifecycle import adapt_task_argv
from agentbox_runtime.errors import InputError
from agentbox_runtime.tasks.container_argv import container_argv
from agentbox_runtime.tasks.krun_podman_argv import (KrunOptions, guest_init_override, krun_task_argv, resize_task_argv,
                                validate_guest_init_target)
from agentbox_runtime.tasks.volumes import Volumes

ST = Path("/s/agentbox/proj")
QEMU_RUNTIME = "/venv/bin/agentbox-krun-runtime"


@pytest.fixture(autouse=True)
def rootless(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin euid to a non-root user so the golden argv do not depend on who runs the tests."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
VOL = Volumes(("/w/proj:/workspace", "/h/.codex:/home/dev/.codex", "/h/.pi:/home/dev/.pi",
               "/s/agentbox/proj/cargo:/home/dev/.cargo",
               "/s/agentbox/sccache:/home/dev/.cache/sccache"),
              ("SCCACHE_DIR=/home/dev/.cache/sccache",))


def task(**kw: object) -> list[str]:
    opts = KrunOptions(**{"ram_mib": 8192, "cpus": 2, **kw})  # type: ignore[arg-type]
    return krun_task_argv(name="proj-0123456789abcdef", hostname="proj-agentbox", state_root=ST,
                          volumes=VOL, uid=1000, gid=1000, image="localhost/agentbox:latest", opts=opts)


BASELINE = shlex.split(
    "run --rm -it --name proj-0123456789abcdef --userns keep-id --user 0:0 --runtime crun "
    "--annotation run.oci.handler=krun --annotation krun.ram_mib=8192 --annotation krun.nested_virt=1 "
    "--annotation krun.disk.0.path=/s/agentbox/proj/libkrun-nix.raw --annotation krun.disk.0.id=agentbox-nix "
    "--annotation krun.disk.0.readonly=false "
    "--annotation krun.disk.1.path=/s/agentbox/proj/libkrun-containers.raw "
    "--annotation krun.disk.1.id=agentbox-containers --annotation krun.disk.1.readonly=false "
    "--device /dev/net/tun:/dev/net/tun --workdir /workspace --hostname proj-agentbox "
    "--volume /w/proj:/workspace --volume /h/.codex:/home/dev/.codex --volume /h/.pi:/home/dev/.pi "
    "--volume /s/agentbox/proj/cargo:/home/dev/.cargo "
    "--volume /s/agentbox/sccache:/home/dev/.cache/sccache --env SCCACHE_DIR=/home/dev/.cache/sccache "
    "--env AGENTBOX_LIBKRUN_NIX_OVERLAY=1 --env AGENTBOX_LIBKRUN_NIX_DISK_ID=agentbox-nix "
    "--env AGENTBOX_LIBKRUN_NIX_DISK_LABEL=AGENTBOX_NIX --env AGENTBOX_LIBKRUN_CONTAINERS_STORAGE=1 "
    "--env AGENTBOX_LIBKRUN_CONTAINERS_DISK_ID=agentbox-containers "
    "--env AGENTBOX_LIBKRUN_CONTAINERS_DISK_LABEL=AGENTBOX_CONTAINERS "
    "--env AGENTBOX_HOST_UID=1000 --env AGENTBOX_HOST_GID=1000 --env AGENTBOX_KVM_DROP_TO_DEV=1 "
    "--tmpfs /tmp:rw,exec,mode=1777 --annotation krun.cpus=2 "
    "--env AGENTBOX_LIBKRUN_USE_PASST=1 --annotation krun.use_passt=1 "
    "localhost/agentbox:latest fish -l"
)


def test_default_passt_baseline() -> None:
    assert task() == BASELINE


def test_tsi_baseline_replaces_passt_with_no_proxy() -> None:
    argv = task(tsi=True)
    assert "krun.use_passt=1" not in argv and "AGENTBOX_LIBKRUN_USE_PASST=1" not in argv
    i = argv.index("krun.cpus=2")
    assert argv[i + 1:i + 3] == ["--env", "no_proxy=1"]


def test_cpu_absent_when_unresolved() -> None:
    assert not any(a.startswith("krun.cpus") for a in task(cpus=None))


def test_root_profile_debug_publish_override_label_order() -> None:
    argv = task(root=True, profile=True, debug=True, publish=("127.0.0.1:8080:80", "8000-8010:80-90"),
                guest_init_mount="/x/agentbox-guest-init:/bin/agentbox-guest-init:ro", run_label="r1")
    tail = argv[argv.index("--tmpfs") - 2:]
    assert tail == ["--env", "AGENTBOX_ENTER_AS_ROOT=1", "--tmpfs", "/tmp:rw,exec,mode=1777",
                    "--annotation", "krun.cpus=2", "--env", "AGENTBOX_LIBKRUN_USE_PASST=1",
                    "--annotation", "krun.use_passt=1", "--publish", "127.0.0.1:8080:80",
                    "--publish", "8000-8010:80-90", "--env", "AGENTBOX_GUEST_PROFILE=1",
                    "--env", "AGENTBOX_GUEST_DEBUG=1",
                    "--volume", "/x/agentbox-guest-init:/bin/agentbox-guest-init:ro",
                    "--label", "io.agentbox.harness.run=r1", "localhost/agentbox:latest", "fish", "-l"]


def test_asserted_absences() -> None:
    text = " ".join(task(root=True, profile=True, debug=True))
    for absent in ("--memory", "--entrypoint", "io.agentbox.sidecar", "AGENTBOX_NIX_PROXY",
                   "NIX_REMOTE=", "/nix-merged:/nix", "/nix/store"):
        assert absent not in text


def test_publish_rejected_with_tsi_and_when_empty() -> None:
    with pytest.raises(InputError, match="not supported with --tsi"):
        task(tsi=True, publish=("8080:80",))
    with pytest.raises(InputError, match="publish spec must not be empty"):
        task(publish=("  ",))


def test_resize_builder_is_non_interactive_and_direct_to_guest_init() -> None:
    opts = KrunOptions(ram_mib=2048, cpus=2)
    argv = resize_task_argv(name="proj-1-resize", hostname="proj-agentbox", state_root=ST,
                            disk=LIBKRUN_CONTAINERS, image="img", opts=opts)
    assert argv == shlex.split(
        "run --rm --name proj-1-resize --hostname proj-agentbox --userns keep-id --user 0:0 "
        "--runtime crun --annotation run.oci.handler=krun --annotation krun.ram_mib=2048 "
        "--annotation krun.disk.0.path=/s/agentbox/proj/libkrun-containers.raw "
        "--annotation krun.disk.0.id=agentbox-containers --annotation krun.disk.0.readonly=false "
        "--env AGENTBOX_LIBKRUN_CONTAINERS_STORAGE=1 "
        "--env AGENTBOX_LIBKRUN_CONTAINERS_DISK_ID=agentbox-containers "
        "--env AGENTBOX_LIBKRUN_CONTAINERS_DISK_LABEL=AGENTBOX_CONTAINERS "
        "--annotation krun.cpus=2 --env AGENTBOX_LIBKRUN_USE_PASST=1 --annotation krun.use_passt=1 "
        "--tmpfs /tmp:rw,exec,mode=1777 --entrypoint /bin/agentbox-guest-init img "
        "libkrun resize --target containers")
    # the fork's krun-disk.c wants indexes contiguous from 0: the one disk is index 0 (reference 6.4
    # put the containers disk alone at 1, which that crun refuses)
    for absent in ("-it", "fish", "-l", "default", "krun.disk.1.path", "/dev/net/tun"):
        assert absent not in argv


def test_resize_builder_keeps_guest_init_override() -> None:
    opts = KrunOptions(ram_mib=2048, guest_init_mount="/g:/bin/agentbox-guest-init:ro")
    argv = resize_task_argv(name="n", hostname="h", state_root=ST, disk=LIBKRUN_NIX, image="i", opts=opts)
    assert argv[argv.index("/g:/bin/agentbox-guest-init:ro") - 1] == "--volume"
    assert argv[-4:] == ["libkrun", "resize", "--target", "nix"]


def resize(**kw: object) -> list[str]:
    opts = KrunOptions(**{"ram_mib": 2048, "cpus": 2, **kw})  # type: ignore[arg-type]
    return resize_task_argv(name="proj-1-resize", hostname="proj-agentbox", state_root=ST,
                            disk=LIBKRUN_CONTAINERS, image="img", opts=opts)


def _swap_runtime(argv: list[str]) -> list[str]:
    i = argv.index("--runtime")
    return [*argv[:i + 1], QEMU_RUNTIME, *argv[i + 2:]]


@pytest.mark.parametrize("kw", [{}, {"tsi": True}, {"root": True, "profile": True, "debug": True,
                                                    "guest_init_mount": "/g:/bin/agentbox-guest-init:ro",
                                                    "run_label": "r1", "publish": ("8080:80",)}])
def test_qemu_runtime_changes_only_the_runtime_value(kw: dict[str, object]) -> None:
    assert task(**kw, runtime=QEMU_RUNTIME) == _swap_runtime(task(**kw))
    assert task(**kw, runtime=QEMU_RUNTIME).count(QEMU_RUNTIME) == 1
    assert resize(**kw, runtime=QEMU_RUNTIME) == _swap_runtime(resize(**kw))
    assert resize(**kw, runtime=QEMU_RUNTIME).count(QEMU_RUNTIME) == 1


def test_default_runtime_is_crun() -> None:
    assert KrunOptions(ram_mib=1).runtime == "crun"
    assert task()[task().index("--runtime") + 1] == "crun"


@pytest.mark.parametrize("runtime", ["crun", QEMU_RUNTIME])
def test_root_leaves_out_only_userns_keep_id(monkeypatch: pytest.MonkeyPatch, runtime: str) -> None:
    rootless_task, rootless_resize = task(runtime=runtime), resize(runtime=runtime)
    as_root(monkeypatch)
    rooted_task, rooted_resize = task(runtime=runtime), resize(runtime=runtime)
    for rootless_argv, rooted in ((rootless_task, rooted_task), (rootless_resize, rooted_resize)):
        i = rootless_argv.index("--userns")
        assert rootless_argv[i:i + 2] == ["--userns", "keep-id"]
        assert rooted == rootless_argv[:i] + rootless_argv[i + 2:]
        assert "--userns" not in rooted and "keep-id" not in rooted
        assert rooted[rooted.index("--runtime") + 1] == runtime


def test_guest_init_override_must_be_a_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "agentbox-guest-init"
    f.write_text("#!/bin/sh\n")
    assert guest_init_override(str(f)) == f"{f}:/bin/agentbox-guest-init:ro"
    with pytest.raises(InputError, match="is not a regular file"):
        guest_init_override(str(tmp_path))
    with pytest.raises(InputError, match="failed to resolve libkrun guest-init override"):
        guest_init_override(str(tmp_path / "missing"))


@pytest.mark.parametrize("target,message", [
    ("", "does not define a first entrypoint element"), ("<no value>", "does not define"),
    ("bin/agentbox-guest-init", "is not absolute"), ("/bin/sh", "does not point to agentbox-guest-init"),
    ("/usr/bin/env", "does not point to agentbox-guest-init"),
])
def test_guest_init_target_validation(target: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        validate_guest_init_target("img", target)
    assert validate_guest_init_target("img", "/nix/store/x/bin/agentbox-guest-init")


def test_container_task_baseline_and_root() -> None:
    argv = container_argv(name="proj-1", hostname="proj-agentbox", volumes=VOL,
                          merged=ST / "nix-merged", sidecar_name="agentbox-nix-sidecar-proj-ab",
                          image="img")
    assert argv[:7] == ["run", "--rm", "-it", "--name", "proj-1", "--userns", "keep-id"]
    assert argv[-3:] == ["img", "fish", "-l"]
    text = " ".join(argv)
    assert "--volume /s/agentbox/proj/nix-merged:/nix:ro" in text
    assert "--env NIX_REMOTE=unix:///nix/var/nix/daemon-socket/socket" in text
    assert "--label io.agentbox.role=task --label io.agentbox.sidecar=agentbox-nix-sidecar-proj-ab" in text
    for absent in ("--runtime", "krun.", "no_proxy", "AGENTBOX_KVM_DROP_TO_DEV", "AGENTBOX_HOST_UID",
                   "AGENTBOX_ENTER_AS_ROOT"):
        assert absent not in text
    rooted = container_argv(name="proj-1", hostname="h", volumes=VOL, merged=ST / "m",
                            sidecar_name="s", image="img", root=True, profile=True, debug=True)
    assert rooted[7:11] == ["--user", "0:0", "--env", "AGENTBOX_ENTER_AS_ROOT=1"]
    assert "AGENTBOX_GUEST_PROFILE=1" in rooted and "AGENTBOX_GUEST_DEBUG=1" in rooted


def test_the_hardened_container_task_and_its_refusal_of_root() -> None:
    argv = container_argv(name="proj-1", hostname="h", volumes=VOL, merged=ST / "m", sidecar_name="s", image="img",
                          hardened=True, exceptions=())
    at = argv.index("--read-only")
    scratch = ["--tmpfs", "/run:rw,size=67108864,mode=0755,nosuid,nodev,noexec",
               "--tmpfs", "/var/log:rw,size=67108864,mode=0755,nosuid,nodev,noexec",
               "--tmpfs", "/var/log/supervisor:rw,size=16777216,mode=0755,nosuid,nodev,noexec"]
    assert argv[at:at + 14] == ["--read-only", "--read-only-tmpfs=true", "--tmpfs",
                                "/home/dev:rw,nosuid,nodev,exec,mode=0755,U", *scratch, "--cap-drop=all",
                                "--security-opt=no-new-privileges", "--env", "AGENTBOX_HARDENED=1"]
    granted = container_argv(name="proj-1", hostname="h", volumes=VOL, merged=ST / "m", sidecar_name="s",
                             image="img", hardened=True, exceptions=("writable-root",))
    assert "--read-only" not in granted and "--read-only-tmpfs=true" not in granted
    assert granted == [a for a in argv if a not in ("--read-only", "--read-only-tmpfs=true")]
    rootful = adapt_task_argv(argv, "img", interactive=False, rootless=True)
    assert "--user" not in rootful and "keep-id" in rootful  # rootless: keep-id's user is the host user
    rootful = adapt_task_argv(argv, "img", interactive=False, rootless=False, dev_ids=("4242", "4343"))
    assert rootful[rootful.index("img") - 2:rootful.index("img")] == ["--user", "4242:4343"]
    assert argv[-3:] == ["img", "fish", "-l"] and "seccomp=unconfined" not in " ".join(argv)
    with pytest.raises(InputError, match="cannot be combined with --root"):
        container_argv(name="p", hostname="h", volumes=VOL, merged=ST / "m", sidecar_name="s", image="img",
                       hardened=True, root=True)
