"""Names and fixed values of container mode (reference sections 3.2 and 8.3)."""

from __future__ import annotations

import hashlib
from typing import Final

SIDECAR_PREFIX: Final = "agentbox-nix-sidecar-"
SIDECAR_ENTRYPOINT: Final = "/bin/agentbox-nix-sidecar-entrypoint"
SIDECAR_PROXY: Final = "/bin/agentbox-sidecar-proxy"
PROXY_PORT: Final = 19876
ROLE_TASK: Final = "task"
ROLE_SIDECAR: Final = "sidecar"

# files and directories under the per-workspace state root
NIX_UPPER: Final = "nix-upper"
NIX_WORK: Final = "nix-work"
NIX_MERGED: Final = "nix-merged"
STATE_FILE: Final = "nix-sidecar.state"
LOCK_FILE: Final = "nix-sidecar.lock"


def sidecar_hash(canonical_cwd: str, image_id: str) -> str:
    """Return the 16 lowercase hex digits that identify a sidecar.

    The value is a stable 64-bit BLAKE2b hash of the canonical workspace
    path and the image ID (each length-prefixed, so no two different pairs
    encode the same way). It does not match the Rust binary's SipHash
    names: the harness never shares sidecars with the reference tool.
    """
    h = hashlib.blake2b(digest_size=8, person=b"agentbox-sidecar")
    for part in (canonical_cwd, image_id):
        data = part.encode("utf-8", "surrogateescape")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def sidecar_name(slug: str, canonical_cwd: str, image_id: str) -> str:
    """The sidecar container name ``agentbox-nix-sidecar-<slug>-<16 hex>``."""
    return f"{SIDECAR_PREFIX}{slug}-{sidecar_hash(canonical_cwd, image_id)}"
