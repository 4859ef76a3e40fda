"""What goes into the guest image, and the hashes that key its two cached stages.

The base stage (a Debian root with every package) is keyed by :func:`recipe_hash`;
the final stage adds ``guest_init`` and is keyed by :func:`guest_init_hash` too, so
a change to ``guest_init`` rebuilds only the small final layer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import guest_init

BUILD_VERSION = "1"  # bump when the build steps change meaning
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_TAG = "localhost/agentbox:latest"
BASE_REPO = "localhost/agentbox-base"
GUEST_INIT_VERSION = "0.1.0"
NIXBLD_GID = 30000
NIXBLD_USERS = 8
DEV_UID = 1000

PACKAGES = (
    "python3", "podman", "crun", "runc", "conmon", "netavark", "aardvark-dns", "passt",
    "slirp4netns", "uidmap", "fuse-overlayfs", "btrfs-progs", "util-linux", "mount", "kmod",
    "busybox-static", "nix-bin", "fish", "bash", "iproute2", "socat", "ca-certificates",
    "procps", "linux-image-amd64", "e2fsprogs", "coreutils", "docker-compose", "file",
)

LABEL_RECIPE = "io.agentbox.recipe"
LABEL_GUEST_INIT = "io.agentbox.guest-init"
ENTRYPOINT = ("/bin/agentbox-guest-init", "default", "enter", "--")
CMD = ("fish", "-l")
FILES_DIR = Path(__file__).with_name("files")


def _hash_files(paths: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def recipe_hash() -> str:
    """Hash of the package list, suite, build version and the build code itself."""
    h = hashlib.sha256()
    h.update(f"{BUILD_VERSION}\0{SUITE}\0{' '.join(PACKAGES)}\0{NIXBLD_GID}\0{DEV_UID}".encode())
    here = Path(__file__).parent
    h.update(_hash_files([here / "rootfs.py"], here).encode())
    return h.hexdigest()


def guest_init_sources() -> tuple[Path, list[Path]]:
    """(package dir, its files) that go into the image."""
    pkg = Path(guest_init.__file__).parent
    files = [p for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return pkg, files


def guest_init_hash() -> str:
    """Hash of every ``guest_init`` file, the in-image scripts and the launcher format."""
    pkg, files = guest_init_sources()
    extra = [p for p in FILES_DIR.rglob("*") if p.is_file()] if FILES_DIR.exists() else []
    h = hashlib.sha256()
    h.update(_hash_files(files, pkg).encode())
    if extra:
        h.update(_hash_files(extra, FILES_DIR).encode())
    h.update(launcher_text(Path("/x")).encode())
    return h.hexdigest()


def store_dir_name(gi_hash: str) -> str:
    """The Nix-store-shaped directory that holds guest_init in the image."""
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"  # nix base32 alphabet
    digest = hashlib.sha256(gi_hash.encode()).digest()
    name = "".join(alphabet[b % 32] for b in digest[:32])
    return f"{name}-agentbox-guest-init-{GUEST_INIT_VERSION}"


def launcher_text(lib_dir: Path) -> str:
    """The ``bin/agentbox-guest-init`` launcher: isolated python3 running guest_init.cli."""
    return ("#!/usr/bin/python3 -I\n"
            "import sys\n"
            f"sys.path.insert(0, {str(lib_dir)!r})\n"
            "from guest_init.cli import main\n"
            "sys.exit(main())\n")
