"""The microvm OCI image cache (reference 9.2-9.4), digest-keyed and global per user.

::

    <app>/microvm/images/
      refs/<percent-encoded reference>        "algo:value"
      blobs/<algo>/<value>/rootfs/            the image rootfs
      blobs/<algo>/<value>/agentbox-compatible  "agentbox\\n"
      blobs/<algo>/.<value>.partial-<pid>-<ns>/ staging

Improvement over the reference: an entry without the compatibility marker
is re-ingested, never treated as a hit. Ingestion is one Buildah transaction
(``buildah from`` → digest → mount → copy → validate → marker → rename); any
failure removes the staging dir and writes no ref. For local images without
a repository digest, the image ID (``sha256:<id>``) is the digest.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from agentbox_runtime.errors import AgentboxError

MARKER = "agentbox-compatible"
SAFE = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
TIMEOUT_S = 1800.0
DEFAULT_REF = "localhost/agentbox:latest"


def encode_ref(ref: str) -> str:
    """Percent-encode every byte outside ``[A-Za-z0-9._-]`` (uppercase hex)."""
    return "".join(chr(b) if b in SAFE else f"%{b:02X}" for b in ref.encode())


def parse_digest(text: str) -> tuple[str, str]:
    """``algorithm:value`` → (algorithm, value), safe for cache paths."""
    algo, sep, value = text.strip().partition(":")
    if not sep:
        raise AgentboxError(f"image digest '{text}' must use algorithm:value form")
    if not algo or not value:
        raise AgentboxError(f"image digest '{text}' must include non-empty algorithm and value")
    if "/" in text or ".." in text:
        raise AgentboxError(f"image digest '{text}' is not safe for cache paths")
    return algo, value


def pinned_digest(ref: str) -> str | None:
    """The digest after the first ``@`` of a reference, when it parses."""
    if "@" not in ref:
        return None
    candidate = ref.split("@", 1)[1]
    try:
        parse_digest(candidate)
    except AgentboxError:
        return None
    return candidate


def find_guest_inits(rootfs: Path) -> list[Path]:
    """Executable regular files at ``nix/store/*/bin/agentbox-guest-init``."""
    out = []
    for p in sorted((rootfs / "nix/store").glob("*/bin/agentbox-guest-init")):
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            out.append(p)
    return out


def validate_rootfs(rootfs: Path) -> Path:
    """Exactly one executable guest-init; return it."""
    found = find_guest_inits(rootfs)
    if not found:
        raise AgentboxError("microvm image is not agentbox-compatible: no executable agentbox-guest-init "
                            f"found under {rootfs}/nix/store/*/bin")
    if len(found) > 1:
        raise AgentboxError(f"microvm image is ambiguous: found {len(found)} executable agentbox-guest-init "
                            f"binaries under {rootfs}/nix/store/*/bin")
    return found[0]


@dataclass(frozen=True)
class CacheEntry:
    digest: str
    path: Path

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    def complete(self) -> bool:
        return self.rootfs.is_dir() and (self.path / MARKER).is_file()


def _buildah(args: list[str]) -> str:
    try:
        proc = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise AgentboxError("buildah is required to ingest images into the experimental microvm image cache") from None
    if proc.returncode != 0:
        detail = proc.stderr.strip()
        raise AgentboxError(f"buildah {' '.join(args)} failed" + (f": {detail}" if detail else ""))
    return proc.stdout.strip()


def remove_tree(path: Path) -> None:
    """Delete a tree, making read-only dirs owner-writable first; btrfs subvolumes via btrfs."""
    if not os.path.lexists(path):
        return
    if (path / "rootfs").is_dir():
        subprocess.run(["btrfs", "subvolume", "delete", str(path / "rootfs")], capture_output=True, timeout=300)
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            mode = os.lstat(p).st_mode
            if stat.S_ISDIR(mode) and not mode & 0o200:
                os.chmod(p, mode | 0o700)
    shutil.rmtree(path, ignore_errors=False)


class ImageCache:
    """The cache rooted at ``root`` (``StateLayout.microvm_image_dir``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def entry(self, digest: str) -> CacheEntry:
        algo, value = parse_digest(digest)
        return CacheEntry(digest, self.root / "blobs" / algo / value)

    def ref_file(self, ref: str) -> Path:
        return self.root / "refs" / encode_ref(ref)

    def lookup(self, ref: str) -> CacheEntry | None:
        """A complete entry for ``ref`` (pinned digest, the local image's current
        digest, or ref metadata), else None.

        Improvement over the reference: a tag that names an image in the local
        Buildah/Podman store is checked against that image's current digest, so a
        rebuilt ``localhost/agentbox:latest`` is re-ingested instead of served stale."""
        pinned = pinned_digest(ref) or local_digest(ref)
        if pinned:
            entry = self.entry(pinned)
            return entry if entry.complete() else None
        try:
            recorded = self.ref_file(ref).read_text().strip()
        except FileNotFoundError:
            return None
        entry = self.entry(recorded)
        return entry if entry.complete() else None

    def ensure(self, ref: str) -> tuple[CacheEntry, bool]:
        """(entry, ingested): a hit, or one Buildah ingestion under a file lock."""
        hit = self.lookup(ref)
        if hit:
            return hit, False
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with FileLock(str(self.root / ".ingest.lock"), timeout=TIMEOUT_S):
            hit = self.lookup(ref)
            if hit:
                return hit, False
            try:
                _buildah(["--version"])
            except AgentboxError as exc:
                raise AgentboxError(f"failed to verify buildah for microvm image '{ref}'; install buildah or "
                                    f"pre-populate '{self.root}'") from exc
            digest = self._ingest_transaction(ref, pinned_digest(ref) or local_digest(ref) or "")
            entry = self.entry(digest)
            if not entry.complete():
                raise AgentboxError("buildah ingested image but no microvm cache rootfs was found afterward")
            ref_file = self.ref_file(ref)
            ref_file.parent.mkdir(parents=True, exist_ok=True)
            ref_file.write_text(digest)
            return entry, True

    def _ingest_transaction(self, ref: str, expected: str) -> str:
        """Root ingests in-process; a rootless user through ``buildah unshare agentbox internal
        microvm-ingest-cache`` so that every file keeps its image owner inside the user namespace."""
        if os.geteuid() == 0:
            return self.ingest(ref, expected)
        argv = ["unshare", sys.executable, "-m", "agentbox_runtime.cli", "internal", "microvm-ingest-cache", ref,
                str(self.root), expected]
        try:
            out = _buildah(argv)
        except AgentboxError as exc:
            raise AgentboxError(f"failed to ingest microvm image '{ref}' with rootless buildah unshare") from exc
        if not out.strip():
            raise AgentboxError("buildah unshare ingestion did not return an image digest")
        digest = out.strip().splitlines()[-1]
        parse_digest(digest)
        return digest

    def ingest(self, ref: str, expected: str) -> str:
        """The Buildah transaction; returns the digest. Cleans up on every failure."""
        ctr = _buildah(["from", "--pull-never" if ref.startswith("localhost/") else "--pull=missing", ref])
        if not ctr:
            raise AgentboxError("buildah from did not return a container id")
        staging: Path | None = None
        mounted = False
        try:
            digest = _container_digest(ctr, ref, expected)
            entry = self.entry(digest)
            if entry.complete():
                return digest
            staging = self._new_staging(digest)
            src = _buildah(["mount", ctr])
            mounted = True
            if not src:
                raise AgentboxError("buildah mount did not return a mount path")
            _copy_rootfs(src, staging / "rootfs")
            try:
                validate_rootfs(staging / "rootfs")
            except AgentboxError as exc:
                raise AgentboxError(f"buildah-ingested image digest '{digest}' is not agentbox-compatible") from exc
            _publish(staging, entry)
            staging = None
            return digest
        finally:
            if staging is not None:
                remove_tree(staging)
            if mounted:
                subprocess.run(["buildah", "umount", ctr], capture_output=True, timeout=300)
            subprocess.run(["buildah", "rm", ctr], capture_output=True, timeout=300)

    def _new_staging(self, digest: str) -> Path:
        """A fresh staging dir for ``digest`` beside its blob (stale ones of earlier runs removed),
        with ``rootfs`` a btrfs subvolume where the cache is on btrfs, else a plain dir."""
        algo, value = parse_digest(digest)
        blobs = self.root / "blobs" / algo
        blobs.mkdir(parents=True, exist_ok=True)
        for stale in blobs.glob(f".{value}.partial-*"):
            remove_tree(stale)
        staging = blobs / f".{value}.partial-{os.getpid()}-{time.time_ns()}"
        staging.mkdir()
        if subprocess.run(["btrfs", "subvolume", "create", str(staging / "rootfs")],
                          capture_output=True, timeout=60).returncode != 0:
            (staging / "rootfs").mkdir(exist_ok=True)
        return staging


def _container_digest(ctr: str, ref: str, expected: str) -> str:
    """The digest of the image Buildah's working container ``ctr`` came from (its image ID when
    there is no digest); it must be ``expected`` when that is given."""
    digest = _buildah(["inspect", "--format", "{{.FromImageDigest}}", ctr])
    if not digest:
        image_id = _buildah(["inspect", "--format", "{{.FromImageID}}", ctr])
        digest = f"sha256:{image_id}" if image_id else ""
    if not digest:
        raise AgentboxError("buildah inspect did not return an image digest")
    if expected and digest != expected:
        raise AgentboxError(f"buildah resolved '{ref}' to digest '{digest}', but the image reference "
                            f"requested '{expected}'")
    return digest


def _copy_rootfs(src: str, dest: Path) -> None:
    proc = subprocess.run(["cp", "-a", "--reflink=auto", f"{src}/.", str(dest)],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise AgentboxError(f"cp -a --reflink=auto failed from '{src}' to '{dest}': {proc.stderr.strip()}")


def _publish(staging: Path, entry: CacheEntry) -> None:
    """Mark ``staging`` complete and rename it over ``entry`` (an incomplete entry is re-ingested);
    when another process published the same entry first, ``staging`` goes."""
    (staging / MARKER).write_text("agentbox\n")
    if entry.path.exists():
        remove_tree(entry.path)
    try:
        os.rename(staging, entry.path)
    except OSError:
        if not entry.complete():
            raise
        remove_tree(staging)


def local_digest(ref: str) -> str | None:
    """The digest of ``ref`` in the local image store (no pull), if it is there."""
    try:
        proc = subprocess.run(["buildah", "inspect", "--type", "image", "--format", "{{.FromImageDigest}}", ref],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    digest = proc.stdout.strip()
    if proc.returncode != 0 or not digest:
        return None
    try:
        parse_digest(digest)
    except AgentboxError:
        return None
    return digest


def resolve_reference(explicit: str | None, cache: ImageCache) -> str:
    """The image to run (9.2): explicit, else the local default when cached or in Buildah's store."""
    if explicit:
        return explicit
    if cache.lookup(DEFAULT_REF):
        return DEFAULT_REF
    try:
        present = subprocess.run(["buildah", "inspect", "--type", "image", DEFAULT_REF], capture_output=True,
                                 timeout=60).returncode == 0
    except FileNotFoundError:
        present = False
    return DEFAULT_REF if present else "ghcr.io/zeroqn/agentbox:latest"
