"""Install guest_init into an image root the way the microvm contract wants it.

Layout written under ``root`` (reference 9.4 step 7 and 9.6):

- ``/nix/store/<hash>-agentbox-guest-init-<version>/lib/agentbox_guest_init/...``: the package;
- ``.../bin/agentbox-guest-init``: a ``#!/usr/bin/python3 -I`` launcher, the only
  executable ``/nix/store/*/bin/agentbox-guest-init`` (older copies are removed);
- ``/bin/agentbox-guest-init`` -> that launcher (the stable path);
- ``/usr/local/bin/<wrapper>`` for every file in ``agentbox_guest_init/wrappers`` (7.15);
- ``/bin/<script>`` for every in-image script in ``agentbox_runtime/images/files`` (8.3);
- dev's XDG base directories (``~/.config``, ``~/.local/share``, ``~/.local/state``,
  ``~/.cache``), owned by dev, as the image contract wants them whatever runs the image.

The content of this file is part of the guest_init hash.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from agentbox_guest_init import contract
from agentbox_runtime.images import recipe


def in_root(root: Path, path: str) -> Path:
    """``path`` inside ``root``, following the root's own directory symlinks (such
    as Debian's ``/bin -> usr/bin``) without ever leaving ``root``."""
    current = root
    for part in Path(path.lstrip("/")).parts:
        current = current / part
        for _ in range(40):
            if not current.is_symlink():
                break
            target = os.readlink(current)
            current = root / target.lstrip("/") if target.startswith("/") else current.parent / target
    return current


def _copy_exec(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    shutil.copyfile(src, dest)
    dest.chmod(0o755)


def install_guest_init(root: Path, gi_hash: str, pkg: Path | None = None,
                       files_dir: Path = recipe.FILES_DIR) -> Path:
    """Write the layout above into ``root``; return the store dir as a path inside the image."""
    pkg = pkg or recipe.guest_init_dir()
    store_root = root / "nix/store"
    for old in store_root.glob("*-agentbox-guest-init-*"):
        shutil.rmtree(old)
    store = store_root / recipe.store_dir_name(gi_hash)
    lib = store / "lib"
    for f in recipe.guest_init_files(pkg):
        dest = lib / "agentbox_guest_init" / f.relative_to(pkg)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
        dest.chmod(0o755 if f.stat().st_mode & 0o111 else 0o644)
    in_image = Path("/") / store.relative_to(root)
    launcher = store / "bin/agentbox-guest-init"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(recipe.launcher_text(in_image / "lib"))
    launcher.chmod(0o755)
    for d in (store, lib, launcher.parent, *(p for p in lib.rglob("*") if p.is_dir())):
        d.chmod(0o755)
    link = in_root(root, str(Path(contract.GUEST_INIT_PATH).parent)) / Path(contract.GUEST_INIT_PATH).name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(in_image / "bin/agentbox-guest-init")
    for wrapper in sorted((pkg / "wrappers").glob("*")):
        if wrapper.is_file():
            _copy_exec(wrapper, in_root(root, recipe.WRAPPER_DIR) / wrapper.name)
    for script in sorted(files_dir.glob("*")):
        if script.is_file():
            _copy_exec(script, in_root(root, "/bin") / script.name)
    for xdg in contract.dev_dirs().values():  # the image contract: dev's XDG dirs exist and are dev's
        path = in_root(root, xdg)
        path.mkdir(parents=True, exist_ok=True)
        for part in [path, *path.parents]:
            if part == in_root(root, contract.DEV_HOME):
                break
            if os.geteuid() == 0:  # image builds run as root; a unit test as another user keeps its own ids
                os.lchown(part, contract.DEV_UID, contract.DEV_GID)
    precompile(root, in_image / "lib")
    return in_image


def precompile(root: Path, lib_in_image: Path) -> None:
    """Bytecode for guest_init made by the image's own python3 (in a chroot), as unchecked-hash pycs
    that stay valid whatever the file times become: no guest boot compiles guest_init again.
    Skipped (with no error) when the root has no python3 or this is not root."""
    if os.geteuid() != 0 or not (root / "usr/bin/python3").exists():
        return
    subprocess.run(["chroot", str(root), "/usr/bin/python3", "-m", "compileall", "-q", "--invalidation-mode",
                    "unchecked-hash", str(lib_in_image)], capture_output=True, timeout=300, check=False,
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
