"""What goes into the guest image, and the hashes that key its two cached stages.

The base stage (a Debian root with every package) is keyed by :func:`recipe_hash`:
the package list, the suite, the user ids, the build version and the source of
the root builder (``rootfs.py``); the mirror is deliberately not part of it.
The final stage adds ``guest_init`` and is keyed by :func:`guest_init_hash`
too (file contents by sorted path, plus the in-image scripts, the install
layout and the image config), so a change to ``guest_init`` rebuilds only the
small final layer.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import agentbox_guest_init
from agentbox_guest_init import contract
from agentbox_guest_init.image_user import DEFAULT_IMAGE_USER, ImageUser
from agentbox_runtime.errors import InputError

BUILD_VERSION = "2"  # bump when the build steps change meaning
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_TAG = "localhost/agentbox:latest"
BASE_REPO = "localhost/agentbox-base"
GUEST_INIT_VERSION = "0.1.0"
NIXBLD_GID = 30000
NIXBLD_USERS = 8
DEV_UID = contract.DEV_UID

PACKAGES = (
    "python3", "podman", "crun", "runc", "conmon", "netavark", "aardvark-dns", "passt",
    "slirp4netns", "uidmap", "fuse-overlayfs", "btrfs-progs", "util-linux", "mount", "kmod",
    "busybox-static", "nix-bin", "fish", "bash", "iproute2", "socat", "ca-certificates",
    "procps", "linux-image-amd64", "e2fsprogs", "coreutils", "docker-compose", "file",
    "catatonit", "iptables",  # podman run --init; netavark's firewall for user-defined networks
    "git", "ripgrep", "jq", "curl", "less", "gawk", "diffutils", "debianutils",  # the image contract's base tools
)

LABEL_RECIPE = "io.agentbox.recipe"
LABEL_GUEST_INIT = "io.agentbox.guest-init"
ENTRYPOINT = (contract.GUEST_INIT_PATH, "default", "enter", "--")
CMD = contract.DEFAULT_SHELL
SHELL = "/usr/bin/fish"
REAL_PODMAN = "/usr/bin/podman"
WRAPPER_DIR = "/usr/local/bin"
FILES_DIR = Path(__file__).with_name("files")
HERE = Path(__file__).parent
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG_RE = re.compile(rf"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
                     r"(?::[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?")


@dataclass(frozen=True)
class ImageConfig:
    """The OCI config of the final image."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    workdir: str
    labels: tuple[tuple[str, str], ...]


def _hash_tree(paths: list[Path], root: Path) -> str:
    """sha256 over (relative path, contents) of ``paths``, in sorted path order."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.relative_to(root).as_posix()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    """Regular files under ``directory``, without bytecode caches."""
    if not directory.is_dir():
        return []
    return [p for p in directory.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]


def recipe_hash(rootfs_source: Path = HERE / "rootfs.py") -> str:
    """Hash of the package list, suite, ids, build version and the root builder's source."""
    h = hashlib.sha256()
    h.update(json.dumps([BUILD_VERSION, SUITE, PACKAGES, NIXBLD_GID, NIXBLD_USERS, DEV_UID]).encode())
    h.update(rootfs_source.read_bytes())
    return h.hexdigest()


def guest_init_dir() -> Path:
    """The ``guest_init`` package directory that goes into the image."""
    return Path(agentbox_guest_init.__file__).parent


def guest_init_files(pkg: Path | None = None) -> list[Path]:
    """Every file of the ``guest_init`` package (no bytecode), unsorted."""
    return _files(pkg or guest_init_dir())


def guest_init_hash(pkg: Path | None = None, files_dir: Path = FILES_DIR,
                    install_source: Path = HERE / "install.py", user: ImageUser = DEFAULT_IMAGE_USER) -> str:
    """Hash of everything in the final layer: guest_init files, in-image scripts,
    the install code, the launcher format, the image config (minus labels) and the image user."""
    pkg = pkg or guest_init_dir()
    h = hashlib.sha256()
    h.update(_hash_tree(guest_init_files(pkg), pkg).encode())
    h.update(_hash_tree(_files(files_dir), files_dir).encode())
    h.update(install_source.read_bytes())
    h.update(launcher_text(Path("/lib")).encode())
    h.update(json.dumps([ENTRYPOINT, CMD, env_pairs(), user.fields()]).encode())
    return h.hexdigest()


def store_dir_name(gi_hash: str) -> str:
    """The Nix-store-shaped directory name that holds guest_init in the image:
    ``<32 nix-base32 chars>-agentbox-guest-init-<version>``."""
    digest = hashlib.sha256(gi_hash.encode()).digest()
    name = "".join(NIX_BASE32[b % 32] for b in digest[:32])
    return f"{name}-agentbox-guest-init-{GUEST_INIT_VERSION}"


def launcher_text(lib_dir: Path) -> str:
    """The ``bin/agentbox-guest-init`` launcher: isolated python3 running agentbox_guest_init.cli."""
    return ("#!/usr/bin/python3 -I\n"
            "import sys\n"
            f"sys.path.insert(0, {str(lib_dir)!r})\n"
            "from agentbox_guest_init.cli import main\n"
            "sys.exit(main())\n")


def env_pairs() -> tuple[tuple[str, str], ...]:
    """The image environment (besides the base's PATH)."""
    return (("SHELL", SHELL), (contract.ENV_REAL_PODMAN, REAL_PODMAN))


def image_config(recipe: str, gi_hash: str, user: ImageUser = DEFAULT_IMAGE_USER) -> ImageConfig:
    """The final image's config: the user's workdir, labelled with both stage hashes and the image user."""
    return ImageConfig(entrypoint=ENTRYPOINT, cmd=CMD, env=env_pairs(), workdir=user.workdir,
                       labels=((LABEL_RECIPE, recipe), (LABEL_GUEST_INIT, gi_hash), *user.labels().items()))


def check_tag(value: str) -> str:
    """Return ``value`` if it is a valid image name (``NAME[:TAG]``); raise :class:`InputError` otherwise."""
    if len(value) > 255 or not _TAG_RE.fullmatch(value) or "@" in value:
        raise InputError(f"invalid image tag '{value}': expected NAME[:TAG] such as {DEFAULT_TAG} "
                         "(lowercase name components; a tag of letters, digits, '_', '.', '-')")
    return value


def base_tag(recipe: str) -> str:
    """The cached base image of a recipe hash."""
    return f"{BASE_REPO}:{recipe[:16]}"
