"""Image contract: who the shell is, where it starts, what the image carries (checklist item 7),
through the reusable contract module, in the guest and in container mode.

The guest checks only look, so they share one guest (``shared_microvm``: one boot for the
module, reset between tests)."""

import pytest

from agentbox_harness.image_contract import DEFAULT_TOOLS, ImageContract

pytestmark = pytest.mark.vm

BASE_TOOLS = ("python3", "podman", "nix-store", "nix-daemon", "btrfs", "fish", "bash", "busybox",
              "fuse-overlayfs", "newuidmap", "blkid", "docker-compose", "agentbox-guest-init")
CONTRACT = ImageContract(tools=(*DEFAULT_TOOLS, *BASE_TOOLS))
"""The reusable contract (agentbox_harness.image_contract) with our image's extra tools."""


def test_image_contract_in_the_guest(shared_microvm, shared_workspace):
    """dev (1000:1000, /home/dev), /workspace, XDG dirs, keep-id ownership, tools, catatonit, nix."""
    CONTRACT.check(shared_microvm, shared_workspace)


def test_image_contract_in_container_mode(container_task, workspace):
    CONTRACT.check(container_task, workspace)


def test_working_directory_is_workspace(shared_microvm):
    microvm = shared_microvm
    cwd = microvm.succeed("readlink /proc/$(pgrep -f 'agentbox-guest-init agent' | head -n1)/cwd",
                          timeout=30, user="root").strip()
    assert cwd == "/workspace"
    assert microvm.succeed("pwd", timeout=30).strip() == "/workspace"
