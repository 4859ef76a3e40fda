"""``agentbox image build``: the guest image in two cached stages.

1. base ``localhost/agentbox-base:<recipe hash>``: the Debian root (slow; minutes);
2. final ``localhost/agentbox:latest``: ``FROM`` the base, plus ``guest_init``
   at a Nix-store-shaped path (exactly one executable
   ``/nix/store/*/bin/agentbox-guest-init``), ``/bin/agentbox-guest-init``
   pointing at it, the in-image scripts, and the image config.

A build whose labels already match does nothing. A file lock makes
concurrent builds (xdist workers) build once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from guest_init import contract
from runtime.errors import AgentboxError
from runtime.images import recipe
from runtime.images.rootfs import build_root, step

TOOL_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class BuildResult:
    """What a build did."""

    tag: str
    base_tag: str
    built_base: bool
    built_final: bool
    seconds: float

    @property
    def up_to_date(self) -> bool:
        return not (self.built_base or self.built_final)


def cache_dir() -> Path:
    """Where build logs and the lock live."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "agentbox" / "image-build"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tool(argv: list[str], what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise AgentboxError(f"{what} needs {argv[0]}, which is not installed; run scripts/setup.sh") from None
    if proc.returncode != 0:
        raise AgentboxError(f"{what} failed: {' '.join(argv)}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def image_labels(tag: str) -> dict[str, str] | None:
    """The labels of a local image, or None when it does not exist."""
    proc = subprocess.run(["podman", "image", "inspect", "--format", "{{json .Labels}}", tag],
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout or "null") or {}


def base_tag() -> str:
    return f"{recipe.BASE_REPO}:{recipe.recipe_hash()[:16]}"


def build_base(tag: str, log: Path) -> None:
    """Debootstrap a root and import it as the base image."""
    with tempfile.TemporaryDirectory(prefix="agentbox-root-", dir=os.environ.get("AGENTBOX_BUILD_DIR")) as tmp:
        root = Path(tmp) / "root"
        build_root(root, log)
        step("import base image", ["sh", "-c", f"tar -C {root} --numeric-owner -cf - . | "
                                   f"podman import --change 'LABEL {recipe.LABEL_RECIPE}={recipe.recipe_hash()}' "
                                   f"- {tag}"], log)


def install_guest_init(mount: Path, gi_hash: str) -> str:
    """Copy guest_init and the in-image scripts into a mounted image root; return the store dir."""
    store = mount / "nix/store" / recipe.store_dir_name(gi_hash)
    for old in (mount / "nix/store").glob("*-agentbox-guest-init-*"):
        shutil.rmtree(old)
    pkg, files = recipe.guest_init_sources()
    for f in files:
        dest = store / "lib/guest_init" / f.relative_to(pkg)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    launcher = store / "bin/agentbox-guest-init"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    in_image_lib = Path("/") / store.relative_to(mount) / "lib"
    launcher.write_text(recipe.launcher_text(in_image_lib))
    launcher.chmod(0o755)
    link = mount / contract.GUEST_INIT_PATH.lstrip("/")
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path("/") / launcher.relative_to(mount))
    wrappers = pkg / "wrappers"
    if wrappers.is_dir():
        for w in wrappers.iterdir():
            if w.is_file():
                dest = mount / "usr/local/bin" / w.name
                shutil.copy2(w, dest)
                dest.chmod(0o755)
    if recipe.FILES_DIR.is_dir():
        for f in recipe.FILES_DIR.iterdir():
            dest = mount / "bin" / f.name
            shutil.copy2(f, dest)
            dest.chmod(0o755)
    return str(Path("/") / store.relative_to(mount))


def build_final(tag: str, base: str, gi_hash: str) -> None:
    """FROM base: add guest_init and the config, commit as ``tag``."""
    ctr = _tool(["buildah", "from", "--pull-never", base], "buildah from")
    try:
        mount = Path(_tool(["buildah", "mount", ctr], "buildah mount"))
        install_guest_init(mount, gi_hash)
        _tool(["buildah", "umount", ctr], "buildah umount")
        config = ["buildah", "config",
                  "--entrypoint", json.dumps(list(recipe.ENTRYPOINT)),
                  "--cmd", json.dumps(list(recipe.CMD)),
                  "--workingdir", "/workspace",
                  "--env", "SHELL=/usr/bin/fish",
                  "--env", f"{contract.ENV_REAL_PODMAN}=/usr/bin/podman",
                  "--label", f"{recipe.LABEL_RECIPE}={recipe.recipe_hash()}",
                  "--label", f"{recipe.LABEL_GUEST_INIT}={gi_hash}", ctr]
        _tool(config, "buildah config")
        _tool(["buildah", "commit", "--rm", ctr, tag], "buildah commit")
        ctr = ""
    finally:
        if ctr:
            subprocess.run(["buildah", "rm", ctr], capture_output=True, timeout=120, check=False)


def build(tag: str = recipe.DEFAULT_TAG, *, force: bool = False,
          guest_init_only: bool = False) -> BuildResult:
    """Build (or confirm up to date) the guest image; see the module docstring."""
    started = time.monotonic()
    log = cache_dir() / "build.log"
    with FileLock(str(cache_dir() / "build.lock"), timeout=3600):
        base = base_tag()
        gi_hash = recipe.guest_init_hash()
        labels = image_labels(tag)
        if (not force and labels and labels.get(recipe.LABEL_RECIPE) == recipe.recipe_hash()
                and labels.get(recipe.LABEL_GUEST_INIT) == gi_hash):
            print(f"agentbox image: {tag} is up to date", file=sys.stderr)
            return BuildResult(tag, base, False, False, time.monotonic() - started)
        built_base = False
        if image_labels(base) is None:
            if guest_init_only:
                raise AgentboxError(f"--guest-init-only needs the base image {base}, which does not "
                                    "exist; run 'agentbox image build' once")
            log.write_text("")
            build_base(base, log)
            built_base = True
        print("agentbox image: guest_init layer ...", file=sys.stderr, flush=True)
        build_final(tag, base, gi_hash)
        print(f"agentbox image: {tag} built", file=sys.stderr)
        return BuildResult(tag, base, built_base, True, time.monotonic() - started)
