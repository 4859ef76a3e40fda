"""Image contract: who the shell is, where it starts, what the image carries (checklist item 7),
through the reusable contract module, in the guest and in container mode.

The guest checks only look, so they share one guest (``shared_microvm``: one boot for the
module, reset between tests)."""

import pytest

from agentbox_harness.image_contract import DEFAULT_TOOLS, ImageContract

pytestmark = pytest.mark.vm

BASE_TOOLS = ("python3", "podman", "nix-store", "nix-daemon", "btrfs", "fish", "bash", "busybox",
              "fuse-overlayfs", "newuidmap", "blkid", "docker-compose", "agentbox-guest-init")


def contract(machine) -> ImageContract:
    """The reusable contract (agentbox_harness.image_contract) for the user the image declares
    (dev, 1000:1000, /workspace in the stock image), with our image's extra tools."""
    return ImageContract.for_image_user(machine.image_user, tools=(*DEFAULT_TOOLS, *BASE_TOOLS))


def test_image_contract_in_the_guest(shared_microvm, shared_workspace):
    """dev (1000:1000, /home/dev), /workspace, XDG dirs, keep-id ownership, tools, catatonit, nix."""
    contract(shared_microvm).check(shared_microvm, shared_workspace)


def test_image_contract_in_container_mode(container_task, workspace):
    contract(container_task).check(container_task, workspace)


def test_working_directory_is_workspace(shared_microvm):
    microvm = shared_microvm
    cwd = microvm.succeed("readlink /proc/$(pgrep -f 'agentbox-guest-init agent' | head -n1)/cwd",
                          timeout=30, user="root").strip()
    assert cwd == microvm.image_user.workdir  # /workspace in the stock image
    assert microvm.succeed("pwd", timeout=30).strip() == microvm.image_user.workdir
