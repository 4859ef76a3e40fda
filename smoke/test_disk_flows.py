"""Resize and reset-nix flows on the persistent disks (reference 5.4, 5.5)."""

from __future__ import annotations

import subprocess

import pytest

from agentbox_guest_init import contract as c
from agentbox_harness import AgentboxError, GuestStepFailed, InputError

pytestmark = pytest.mark.vm
GIB = 1 << 30


def _fs_uuid(image) -> str:
    return subprocess.run(["blkid", "-o", "value", "-s", "UUID", str(image)], capture_output=True, text=True,
                          timeout=60, check=True).stdout.strip()


def _fs_size(m, mount: str) -> int:
    return int(m.succeed(f"df -B1 --output=size {mount} | tail -n1", timeout=30, user="root"))


@pytest.mark.krun_podman_too
def test_grow_nix_and_containers_keeping_data(guest, nix_disk, containers_disk):
    m = guest
    m.wait_for_prep("nix", timeout=120)
    m.wait_for_prep("podman", timeout=120)
    path = m.succeed("echo keep > /tmp/k && nix-store --add /tmp/k", timeout=120).strip()
    m.succeed("echo kept > ~/.local/share/containers/marker", timeout=30)
    before = (_fs_size(m, "/run/agentbox/nix-disk"), _fs_size(m, m.image_user.containers_storage))
    m.shutdown()
    runner = m.resize_runner()
    assert nix_disk.grow(80 * GIB, runner).new_size == 80 * GIB
    assert containers_disk.grow(72 * GIB, runner).new_size == 72 * GIB
    m.start()
    m.wait_for_prep("nix", timeout=120)
    m.wait_for_prep("podman", timeout=120)
    after = (_fs_size(m, "/run/agentbox/nix-disk"), _fs_size(m, m.image_user.containers_storage))
    assert after[0] > before[0] + 15 * GIB and after[1] > before[1] + 7 * GIB
    m.succeed(f"nix-store --check-validity {path}", timeout=60)
    assert m.succeed("cat ~/.local/share/containers/marker", timeout=30).strip() == "kept"


@pytest.mark.krun_podman_too
def test_resize_refused_while_running_and_for_equal_or_smaller(guest, nix_disk):
    runner = guest.resize_runner()
    with pytest.raises(AgentboxError, match="while running"):
        nix_disk.grow(80 * GIB, runner)
    guest.shutdown()
    for size in (64 * GIB, 32 * GIB):
        with pytest.raises(InputError, match="shrinking and equal-size resize are refused"):
            nix_disk.grow(size, runner)
    assert nix_disk.path.stat().st_size == 64 * GIB


def test_guest_failure_after_host_growth_is_retryable(microvm_factory, nix_disk):
    # only the nix disk matters here: the guest runs no Podman prep, whose readiness each start would wait for
    microvm = microvm_factory(extra_env=(f"{c.ENV_CONTAINERS_STORAGE}=0",))
    microvm.shutdown()
    broken = microvm.resize_runner(extra_env=("AGENTBOX_LIBKRUN_NIX_DISK_LABEL=NO_SUCH_LABEL",))
    with pytest.raises(GuestStepFailed, match="rerun the same resize command"):
        nix_disk.grow(70 * GIB, broken)
    assert nix_disk.path.stat().st_size == 70 * GIB, "the host grew the file and nothing was rolled back"
    nix_disk.grow(75 * GIB, microvm.resize_runner())
    microvm.start()
    microvm.wait_for_prep("nix", timeout=120)
    assert int(microvm.succeed("df -B1 --output=size /run/agentbox/nix-disk | tail -n1", timeout=120,
                               user="root")) > 70 * GIB


@pytest.mark.krun_podman_too
def test_reset_nix_flow(guest, nix_disk):
    m = guest
    m.wait_for_prep("nix", timeout=120)
    path = m.succeed("echo old > /tmp/o && nix-store --add /tmp/o", timeout=120).strip()
    with pytest.raises(InputError, match="without --force"):
        nix_disk.reset(force=False)
    with pytest.raises(AgentboxError, match="refusing to reset"):
        nix_disk.reset()
    uuid = _fs_uuid(nix_disk.path)
    m.shutdown()
    nix_disk.reset()
    assert nix_disk.validate() == 64 * GIB
    assert _fs_uuid(nix_disk.path) != uuid  # a new filesystem (inode numbers may be reused)
    m.start()
    m.wait_for_prep("nix", timeout=120)
    m.fail(f"test -e {path}", timeout=30)
    m.succeed("nix-store --add /etc/hostname", timeout=120)
