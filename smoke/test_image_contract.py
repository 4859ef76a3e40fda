"""Image contract: who the shell is, where it starts, what the image carries (checklist item 7),
through the reusable contract module, in the guest and in container mode.

The guest checks only look, so they share one guest (``shared_microvm``: one boot for the
module, reset between tests)."""

import pytest

from agentbox_harness.image_contract import DEFAULT_TOOLS, ImageContract
from enter_session import agent_cwd, enter_identity

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
    """``enter`` was started in the workdir, and a command that names no ``cwd`` runs where the
    agent (so: ``enter``) runs: the agent has no default of its own. A ``cwd`` a verb names wins."""
    microvm = shared_microvm
    assert agent_cwd(microvm) == microvm.image_user.workdir  # /workspace in the stock image
    assert microvm.succeed("pwd", timeout=30).strip() == microvm.image_user.workdir
    assert microvm.succeed("pwd", cwd="/tmp", timeout=30).strip() == "/tmp"


@pytest.mark.krun_podman_too
def test_enter_drops_to_the_image_user(guest):
    """The identity ``enter`` of this backend's mode drops to (not the agent's own demotion of the
    commands it runs): the image's user, its ids, no supplementary groups, no capabilities left."""
    dropped = enter_identity(guest)
    assert (dropped.user, dropped.gid) == (guest.image_user.user, guest.image_user.gid)  # dev, 1000
    assert dropped.uid == int(guest.succeed("id -u", timeout=30)) != 0
    assert dropped.groups == (dropped.gid,)
    assert (dropped.cap_eff, dropped.cap_prm) == (0, 0)
    kept = enter_identity(guest, enter_as_root=True)  # the probe sees enter's own choice: root stays root
    assert (kept.user, kept.uid) == ("root", 0) and kept.cap_eff != 0
