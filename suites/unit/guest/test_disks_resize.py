"""Guest disk discovery (7.7) with a fake blkid, and the resize operation order (7.12)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentbox_guest_init.disks import find_contract_disk, find_disk
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.resize import resize

from .conftest import Recorder


def blkid(labels: dict[str, str], by_label: dict[str, str] | None = None) -> Recorder:
    """A fake blkid: LABEL per device, ``-L`` lookups."""
    def answer(argv: list[str]) -> tuple[int, str, str]:
        if argv[:2] == ["blkid", "-L"]:
            dev = (by_label or {}).get(argv[2])
            return (0, dev + "\n", "") if dev else (2, "", "")
        if argv[0] == "blkid":
            label = labels.get(argv[-1])
            return (0, label + "\n", "") if label is not None else (2, "", "")
        return 0, "", ""
    return Recorder(fallback=answer)


def no_globs(pattern: str) -> list[str]:
    return []


def test_preferred_device_wins_when_its_label_matches() -> None:
    r = blkid({"/dev/vda": "AGENTBOX_NIX"})
    assert find_disk("AGENTBOX_NIX", "agentbox-nix", "/dev/vda", runner=r, expand=no_globs) == "/dev/vda"
    assert r.calls == [["blkid", "-o", "value", "-s", "LABEL", "/dev/vda"]]


def test_blkid_label_lookup_is_second() -> None:
    r = blkid({"/dev/vda": "OTHER"}, {"AGENTBOX_NIX": "/dev/vdc"})
    assert find_disk("AGENTBOX_NIX", "agentbox-nix", "/dev/vda", runner=r, expand=no_globs) == "/dev/vdc"
    assert r.calls[1] == ["blkid", "-L", "AGENTBOX_NIX"]


def test_globs_are_scanned_in_order_by_label() -> None:
    r = blkid({"/dev/disk/by-id/virtio-agentbox-containers": "WRONG", "/dev/sdb": "AGENTBOX_CONTAINERS",
               "/dev/vdb": "NOPE"})
    seen: list[str] = []

    def expand(pattern: str) -> list[str]:
        seen.append(pattern)
        return {"/dev/disk/by-id/*agentbox-containers*": ["/dev/disk/by-id/virtio-agentbox-containers"],
                "/dev/vd?": ["/dev/vdb"], "/dev/sd?": ["/dev/sdb", "/dev/sda"]}.get(pattern, [])

    dev = find_disk("AGENTBOX_CONTAINERS", "agentbox-containers", "/dev/vdb", runner=r, expand=expand)
    assert dev == "/dev/sdb"
    assert seen == ["/dev/disk/by-id/*agentbox-containers*", "/dev/vd?", "/dev/sd?"]
    # sorted within a glob: sda is checked before sdb
    assert r.tools()[-2:] == ["blkid -o value -s LABEL /dev/sda", "blkid -o value -s LABEL /dev/sdb"]


def test_not_found_names_label_and_id() -> None:
    r = blkid({})
    with pytest.raises(GuestError, match="^no btrfs disk with label L and id I$"):
        find_disk("L", "I", "/dev/vda", runner=r, expand=lambda p: ["/dev/vdz"])
    with pytest.raises(GuestError, match=r"^libkrun /nix btrfs disk not found \(label=AGENTBOX_NIX id=agentbox-nix\)$"):
        find_contract_disk(GuestEnv(), "nix", "libkrun /nix btrfs disk not found", runner=r, expand=no_globs)


def test_contract_labels_are_used() -> None:
    r = blkid({"/dev/vdb": "MY_LABEL"})
    env = GuestEnv(containers_disk_label="MY_LABEL")
    assert find_contract_disk(env, "containers", "x", runner=r, expand=no_globs) == "/dev/vdb"


def resize_runner(mounted: bool = False, fail: str | None = None) -> Recorder:
    def answer(argv: list[str]) -> tuple[int, str, str]:
        if argv[0] == "blkid":
            return 0, "AGENTBOX_NIX\n" if argv[-1] == "/dev/vda" else "AGENTBOX_CONTAINERS\n", ""
        if argv[0] == "findmnt":
            return (0, "x", "") if mounted else (1, "", "")
        if fail and argv[0] == fail:
            return 1, "", f"{fail}: boom"
        return 0, "", ""
    return Recorder(fallback=answer)


def test_resize_mounts_resizes_and_unmounts_selected_nix_disk(tmp_path: Path) -> None:
    r = resize_runner()
    resize("nix", GuestEnv(), runner=r, root=tmp_path, expand=no_globs)
    assert r.tools() == ["blkid -o value -s LABEL /dev/vda", "findmnt -rn /run/agentbox/resize-nix",
                         "mount -t btrfs /dev/vda /run/agentbox/resize-nix",
                         "btrfs filesystem resize max /run/agentbox/resize-nix", "umount /run/agentbox/resize-nix"]
    assert (tmp_path / "run/agentbox/resize-nix").is_dir()


def test_resize_reuses_pre_mounted_private_path_without_unmounting(tmp_path: Path) -> None:
    r = resize_runner(mounted=True)
    resize("containers", GuestEnv(), runner=r, root=tmp_path, expand=no_globs)
    assert r.tools() == ["blkid -o value -s LABEL /dev/vdb", "findmnt -rn /run/agentbox/resize-containers",
                         "btrfs filesystem resize max /run/agentbox/resize-containers"]


@pytest.mark.parametrize("tool,message", [
    ("mount", "failed to mount libkrun container storage btrfs disk: mount: boom"),
    ("btrfs", "failed to resize libkrun container storage btrfs filesystem: btrfs: boom"),
    ("umount", "failed to unmount libkrun container storage resize mount: umount: boom")])
def test_resize_failures_are_errors(tmp_path: Path, tool: str, message: str) -> None:
    r = resize_runner(fail=tool)
    with pytest.raises(GuestError, match=f"^{message}$"):
        resize("containers", GuestEnv(), runner=r, root=tmp_path, expand=no_globs)
    if tool == "btrfs":  # what it mounted is still unmounted
        assert r.tools()[-1] == "umount /run/agentbox/resize-containers"


def test_resize_missing_disk(tmp_path: Path) -> None:
    r = Recorder(fallback=lambda argv: (2, "", ""))
    with pytest.raises(GuestError, match=r"^libkrun /nix btrfs disk not found \(label=AGENTBOX_NIX id=agentbox-nix\)$"):
        resize("nix", GuestEnv(), runner=r, root=tmp_path, expand=no_globs)
