"""Image cache keys, ref files, entry completeness and guest-init validation (reference 9.3, 9.4)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.microvm.image_cache import (MARKER, ImageCache, encode_ref, parse_digest, pinned_digest,
                                         validate_rootfs)

DIGEST = "sha256:" + "ab" * 32


def test_ref_encoding_is_percent_uppercase_outside_safe_set() -> None:
    assert encode_ref("localhost/agentbox:latest") == "localhost%2Fagentbox%3Alatest"
    assert encode_ref("a_b.c-D9") == "a_b.c-D9"
    assert encode_ref("ghcr.io/x@sha256:ff") == "ghcr.io%2Fx%40sha256%3Aff"
    assert encode_ref("é") == "%C3%A9"


@pytest.mark.parametrize(("text", "message"), [
    ("sha256", "image digest 'sha256' must use algorithm:value form"),
    (":abc", "image digest ':abc' must include non-empty algorithm and value"),
    ("sha256:", "image digest 'sha256:' must include non-empty algorithm and value"),
    ("sha256:../x", "image digest 'sha256:../x' is not safe for cache paths"),
    ("sha/256:x", "image digest 'sha/256:x' is not safe for cache paths"),
])
def test_unsafe_or_malformed_digests(text: str, message: str) -> None:
    with pytest.raises(AgentboxError) as err:
        parse_digest(text)
    assert str(err.value) == message


def test_pinned_digest_only_when_it_parses() -> None:
    assert pinned_digest(f"ghcr.io/x@{DIGEST}") == DIGEST
    assert pinned_digest("ghcr.io/x:latest") is None
    assert pinned_digest("ghcr.io/x@nodigest") is None


def guest_init(root: Path, name: str, mode: int = 0o755) -> Path:
    p = root / "nix/store" / name / "bin/agentbox-guest-init"
    p.parent.mkdir(parents=True)
    p.write_text("#!/bin/sh\n")
    p.chmod(mode)
    return p


def test_exactly_one_executable_guest_init(tmp_path: Path) -> None:
    with pytest.raises(AgentboxError, match="not agentbox-compatible: no executable agentbox-guest-init"):
        validate_rootfs(tmp_path)
    guest_init(tmp_path, "aaa-not-exec", 0o644)
    with pytest.raises(AgentboxError, match="no executable agentbox-guest-init"):
        validate_rootfs(tmp_path)
    one = guest_init(tmp_path, "bbb-agentbox-guest-init")
    assert validate_rootfs(tmp_path) == one
    link = tmp_path / "nix/store/ccc-link/bin"
    link.mkdir(parents=True)
    os.symlink(one, link / "agentbox-guest-init")  # symlinks are not regular files
    assert validate_rootfs(tmp_path) == one
    guest_init(tmp_path, "ddd-second")
    with pytest.raises(AgentboxError) as err:
        validate_rootfs(tmp_path)
    assert str(err.value) == ("microvm image is ambiguous: found 2 executable agentbox-guest-init binaries under "
                              f"{tmp_path}/nix/store/*/bin")


def complete_entry(cache: ImageCache, digest: str, marker: bool = True) -> Path:
    entry = cache.entry(digest)
    (entry.rootfs / "bin").mkdir(parents=True)
    if marker:
        (entry.path / MARKER).write_text("agentbox\n")
    return entry.path


REF = "example.invalid/agentbox-test:1"  # not in any local store, never pulled by lookup


def test_lookup_through_ref_file(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    assert cache.lookup(REF) is None
    path = complete_entry(cache, DIGEST)
    cache.ref_file(REF).parent.mkdir(parents=True)
    cache.ref_file(REF).write_text(DIGEST + "\n")
    assert cache.ref_file(REF) == tmp_path / "refs" / "example.invalid%2Fagentbox-test%3A1"
    hit = cache.lookup(REF)
    assert hit is not None and hit.path == path == tmp_path / "blobs" / "sha256" / ("ab" * 32)


def test_entry_without_marker_is_not_a_hit(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    complete_entry(cache, DIGEST, marker=False)
    cache.ref_file(REF).parent.mkdir(parents=True)
    cache.ref_file(REF).write_text(DIGEST)
    assert cache.lookup(REF) is None
    assert cache.lookup(f"{REF}@{DIGEST}") is None


def test_pinned_reference_needs_no_ref_file(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path)
    complete_entry(cache, DIGEST)
    hit = cache.lookup(f"example.invalid/other@{DIGEST}")
    assert hit is not None and hit.digest == DIGEST
