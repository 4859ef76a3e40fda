"""Sidecar names (reference 3.2): deterministic, distinct per workspace and image."""

from __future__ import annotations

import re

from agentbox_runtime.container.names import sidecar_hash, sidecar_name


def test_name_shape() -> None:
    name = sidecar_name("my-repo", "/tmp/my repo", "sha256:abc")
    assert re.fullmatch(r"agentbox-nix-sidecar-my-repo-[0-9a-f]{16}", name)


def test_hash_is_a_golden_value() -> None:
    # golden value: the name must never change between harness versions,
    # or a running sidecar would be orphaned by an upgrade
    assert sidecar_hash("/tmp/project", "0123abcd") == GOLDEN


def test_hash_depends_on_cwd_and_image_id() -> None:
    base = sidecar_hash("/tmp/project", "id1")
    assert sidecar_hash("/tmp/project2", "id1") != base
    assert sidecar_hash("/tmp/project", "id2") != base
    # length prefixes: moving bytes between the two fields changes the hash
    assert sidecar_hash("/tmp/projecti", "d1") != base


GOLDEN = "af707f8cbcfdb84c"
