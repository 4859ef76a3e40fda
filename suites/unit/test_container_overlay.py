"""Pure parts of the merged /nix overlay: mountinfo parsing and the mount argv."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentbox_runtime.container.overlay import (
    escape_mountinfo, fuse_overlayfs_argv, mountinfo_has, unescape_mountinfo,
)

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
97 22 0:50 / /home/u/.local/state/agentbox/my\\040repo/nix-merged rw,nodev,noatime - fuse.fuse-overlayfs fuse-overlayfs rw,user_id=0,group_id=0,default_permissions,allow_other
98 22 0:51 / /tmp/st/nix-merged rw - fuse.fuse-overlayfs fuse-overlayfs rw
"""


@pytest.mark.parametrize("path", ["/plain", "/with space", "/tab\there", "/back\\slash",
                                  "/new\nline"])
def test_escape_round_trips(path: str) -> None:
    escaped = escape_mountinfo(path)
    assert not any(c in escaped for c in " \t\n")
    assert unescape_mountinfo(escaped) == path


def test_unescape_keeps_a_trailing_backslash_sequence_that_is_not_octal() -> None:
    assert unescape_mountinfo("/a\\04") == "/a\\04"
    assert unescape_mountinfo("/a\\040") == "/a "


def test_mountinfo_has_finds_escaped_and_plain_mount_points() -> None:
    assert mountinfo_has(MOUNTINFO, "/home/u/.local/state/agentbox/my repo/nix-merged")
    assert mountinfo_has(MOUNTINFO, "/tmp/st/nix-merged/")
    assert not mountinfo_has(MOUNTINFO, "/tmp/st")
    assert not mountinfo_has(MOUNTINFO, "/tmp/st/nix-merged/x")


def test_fuse_overlayfs_argv_is_the_reference_form() -> None:
    assert fuse_overlayfs_argv("/img/nix", Path("/s/nix-upper"), Path("/s/nix-work"),
                               Path("/s/nix-merged")) == [
        "fuse-overlayfs", "-o",
        "lowerdir=/img/nix,upperdir=/s/nix-upper,workdir=/s/nix-work", "/s/nix-merged"]
