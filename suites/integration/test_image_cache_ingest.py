"""Buildah ingestion into the microvm image cache (reference 9.3, 9.4) with real images.

The cache sits on a loop-mounted btrfs, as on a btrfs host, so rootfs entries are
subvolumes that btrfs-snapshot storage can snapshot."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from microvm_helpers import buildah_containers, loop_btrfs, synthetic_image

from agentbox_runtime.errors import AgentboxError, error_chain
from agentbox_runtime.microvm.image_cache import MARKER, ImageCache

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    with synthetic_image() as tag:
        yield tag


@pytest.fixture()
def cache_root(tmp_path: Path) -> Iterator[Path]:
    with loop_btrfs(tmp_path) as mnt:
        yield mnt / "images"


def staging_dirs(root: Path) -> list[Path]:
    return list(root.glob("blobs/*/.*.partial-*"))


def test_ingest_once_then_hit(image: str, cache_root: Path) -> None:
    before = buildah_containers()
    cache = ImageCache(cache_root)
    entry, ingested = cache.ensure(image)
    assert ingested
    assert (entry.path / MARKER).read_text() == "agentbox\n"
    assert (entry.rootfs / "nix/store/0x-agentbox-guest-init/bin/agentbox-guest-init").is_file()
    assert cache.ref_file(image).read_text() == entry.digest
    assert entry.path.parent.parent == cache_root / "blobs"
    assert subprocess.run(["btrfs", "subvolume", "show", str(entry.rootfs)], capture_output=True,
                          timeout=60).returncode == 0
    again, ingested_again = cache.ensure(image)
    assert (again, ingested_again) == (entry, False)
    assert staging_dirs(cache_root) == [] and buildah_containers() == before


def test_entry_without_marker_is_reingested(image: str, cache_root: Path) -> None:
    cache = ImageCache(cache_root)
    entry, _ = cache.ensure(image)
    (entry.path / MARKER).unlink()
    (entry.rootfs / "stale-file").write_text("from an interrupted ingestion")
    again, ingested = cache.ensure(image)
    assert ingested and again == entry and (entry.path / MARKER).is_file()
    assert not (entry.rootfs / "stale-file").exists()


@pytest.mark.parametrize(("count", "message"), [(0, "no executable agentbox-guest-init"),
                                                (2, "microvm image is ambiguous: found 2")])
def test_incompatible_image_leaves_nothing(cache_root: Path, count: int, message: str) -> None:
    before = buildah_containers()
    with synthetic_image(guest_inits=count) as bad:
        cache = ImageCache(cache_root)
        with pytest.raises(AgentboxError) as err:
            cache.ensure(bad)
    chain = error_chain(err.value)
    assert "is not agentbox-compatible" in chain and message in chain
    assert not cache.ref_file(bad).exists()
    assert staging_dirs(cache_root) == [] and list(cache_root.glob("blobs/*/*")) == []
    assert buildah_containers() == before


def test_missing_image_is_an_error_without_ref(cache_root: Path) -> None:
    cache = ImageCache(cache_root)
    with pytest.raises(AgentboxError) as err:
        cache.ensure("localhost/agentbox-microvm-synth:does-not-exist")
    assert "buildah from" in error_chain(err.value)
    assert not cache.ref_file("localhost/agentbox-microvm-synth:does-not-exist").exists()


def test_concurrent_ensure_ingests_once(image: str, cache_root: Path) -> None:
    code = ("import sys; from pathlib import Path; from agentbox_runtime.microvm.image_cache import ImageCache; "
            "print(ImageCache(Path(sys.argv[1])).ensure(sys.argv[2])[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache_root), image], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        results.append(out.strip())
    assert sorted(results) == ["False", "False", "True"]


def test_internal_ingest_command(image: str, cache_root: Path) -> None:
    def internal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "internal", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=600)

    proc = internal("microvm-ingest-cache", image, str(cache_root), "")
    assert proc.returncode == 0, proc.stderr
    digest = proc.stdout.strip()
    assert ImageCache(cache_root).entry(digest).complete()
    wrong = internal("microvm-ingest-cache", image, str(cache_root), "sha256:" + "0" * 64)
    assert wrong.returncode == 1 and "but the image reference requested 'sha256:" in wrong.stderr
    assert "internal microvm-ingest-cache requires a cache root" in internal("microvm-ingest-cache", image).stderr
    assert "unsupported internal command 'x'" in internal("x").stderr
