"""Install guest_init into an image root the way the microvm contract wants it.

Layout written under ``root`` (reference 9.4 step 7 and 9.6):

- ``/nix/store/<hash>-agentbox-guest-init-<version>/lib/agentbox_guest_init/...``: the package;
- ``.../bin/agentbox-guest-init``: a ``#!/usr/bin/python3 -I`` launcher, the only
  executable ``/nix/store/*/bin/agentbox-guest-init`` (older copies are removed);
- ``/bin/agentbox-guest-init`` -> that launcher (the stable path);
- ``/usr/local/bin/<wrapper>`` for every file in ``agentbox_guest_init/wrappers`` (7.15);
- ``/bin/<script>`` for every in-image script in ``agentbox_runtime/images/files`` (8.3);
- the image user (:mod:`agentbox_guest_init.image_user`): the base's ``dev`` account renamed and
  renumbered to it (passwd, group, shadow, gshadow, subuid, subgid, ``/home/dev`` moved to its home
  and re-owned), its workdir created, and ``/etc/agentbox/image-user`` naming it;
- the user's XDG base directories (``~/.config``, ``~/.local/share``, ``~/.local/state``,
  ``~/.cache``), owned by it, as the image contract wants them whatever runs the image.

The content of this file is part of the guest_init hash.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

from agentbox_guest_init import contract
from agentbox_guest_init.image_user import FILE as IMAGE_USER_FILE
from agentbox_guest_init.image_user import DEFAULT_IMAGE_USER, ImageUser
from agentbox_runtime.errors import AgentboxError, InputError
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


def _entries(path: Path) -> list[list[str]]:
    try:
        return [line.split(":") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    except FileNotFoundError:
        return []


def _rename_entry(path: Path, old: str, fields: list[str] | None = None, name: str = "") -> None:
    """Replace the ``old`` line of a colon file by ``fields`` (or rename it to ``name``), keeping
    the file's mode and owner."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    out = [":".join(fields or [name, *line.split(":")[1:]]) if line.split(":", 1)[0] == old else line
           for line in lines]
    path.write_text("\n".join(out) + "\n")


def _check_free(etc: Path, user: ImageUser) -> None:
    """The name, uid and gid must not belong to another account or group of the base image."""
    for table, what, key, value in (("passwd", "account", "uid", user.uid), ("group", "group", "gid", user.gid)):
        for fields in _entries(etc / table):
            if fields[0] != contract.DEV_USER and len(fields) > 2 and (fields[0] == user.user or
                                                                         fields[2] == str(value)):
                raise InputError(f"image user {user.user} ({key} {value}): the base image's {what} {fields[0]} "
                                 f"({key} {fields[2]}) already has that name or {key}; choose another")


def _chown_tree(top: Path, old: tuple[int, int], new: tuple[int, int]) -> None:
    """Give ``new`` ids to every entry under ``top`` that had ``old`` ones (no symlink followed)."""
    if os.geteuid() != 0 or old == new:
        return
    for path in [top, *top.rglob("*")]:
        st = os.lstat(path)
        uid = new[0] if st.st_uid == old[0] else st.st_uid
        gid = new[1] if st.st_gid == old[1] else st.st_gid
        if (uid, gid) != (st.st_uid, st.st_gid):
            os.lchown(path, uid, gid)


def _move_tree(src: Path, dest: Path) -> None:
    """``mv src dest`` that also works where a rename cannot (an overlay's lower directory gives
    EXDEV): a copy keeping owners, modes and links (``cp -a``), then the source removed."""
    try:
        src.rename(dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    proc = subprocess.run(["cp", "-a", "--", str(src), str(dest)], capture_output=True, text=True, timeout=300,
                          check=False)
    if proc.returncode != 0:
        raise AgentboxError(f"image build: cannot move {src} to {dest}: {proc.stderr.strip()}")
    shutil.rmtree(src)


def apply_image_user(root: Path, user: ImageUser) -> None:
    """Make the base's ``dev`` account ``user`` and write the image user file (see the module text)."""
    etc = in_root(root, "/etc")
    dev = next((f for f in _entries(etc / "passwd") if f[0] == contract.DEV_USER and len(f) >= 7), None)
    if dev is None and not user.is_default:
        raise AgentboxError(f"image build: the base image has no {contract.DEV_USER} account to make {user.user}")
    old_ids = (int(dev[2]), int(dev[3])) if dev is not None else (user.uid, user.gid)
    _check_free(etc, user)
    if dev is not None:
        _rename_entry(etc / "passwd", contract.DEV_USER,
                      [user.user, dev[1], str(user.uid), str(user.gid), dev[4], user.home, *dev[6:]])
    group = next((f for f in _entries(etc / "group") if f[0] == contract.DEV_USER), None)
    if group is not None:
        _rename_entry(etc / "group", contract.DEV_USER, [user.user, group[1], str(user.gid), *group[3:]])
    for name in ("shadow", "gshadow", "subuid", "subgid"):
        _rename_entry(etc / name, contract.DEV_USER, name=user.user)
    old_home, home = in_root(root, contract.DEV_HOME), in_root(root, user.home)
    if old_home != home and old_home.is_dir() and not old_home.is_symlink() and not home.exists():
        _move_tree(old_home, home)
    home.mkdir(parents=True, exist_ok=True)
    _chown_tree(home, old_ids, (user.uid, user.gid))
    workdir = in_root(root, user.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if user.workdir.startswith(user.home + "/") and os.geteuid() == 0:
        for part in [workdir, *workdir.parents]:
            if part == home:
                break
            os.lchown(part, user.uid, user.gid)
    path = in_root(root, IMAGE_USER_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(user.file_text())
    path.chmod(0o644)


def install_guest_init(root: Path, gi_hash: str, pkg: Path | None = None,
                       files_dir: Path = recipe.FILES_DIR, user: ImageUser = DEFAULT_IMAGE_USER) -> Path:
    """Write the layout above into ``root``; return the store dir as a path inside the image."""
    pkg = pkg or recipe.guest_init_dir()
    in_image = _write_store(root, gi_hash, pkg)
    link = in_root(root, str(Path(contract.GUEST_INIT_PATH).parent)) / Path(contract.GUEST_INIT_PATH).name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(in_image / "bin/agentbox-guest-init")
    _copy_scripts(root, pkg, files_dir)
    apply_image_user(root, user)
    _own_xdg_dirs(root, user)
    precompile(root, in_image / "lib")
    return in_image


def _write_store(root: Path, gi_hash: str, pkg: Path) -> Path:
    """The guest_init store dir (its files and launcher, every dir 0755) in place of any older one;
    its path inside the image."""
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
    return in_image


def _copy_scripts(root: Path, pkg: Path, files_dir: Path) -> None:
    """The package's wrappers into the wrapper dir and ``files_dir``'s scripts into /bin, executable."""
    for wrapper in sorted((pkg / "wrappers").glob("*")):
        if wrapper.is_file():
            _copy_exec(wrapper, in_root(root, recipe.WRAPPER_DIR) / wrapper.name)
    for script in sorted(files_dir.glob("*")):
        if script.is_file():
            _copy_exec(script, in_root(root, "/bin") / script.name)


def _own_xdg_dirs(root: Path, user: ImageUser) -> None:
    """The image contract: the user's XDG dirs exist and are the user's (up to the home)."""
    for xdg in user.xdg_dirs().values():
        path = in_root(root, xdg)
        path.mkdir(parents=True, exist_ok=True)
        for part in [path, *path.parents]:
            if part == in_root(root, user.home):
                break
            if os.geteuid() == 0:  # image builds run as root; a unit test as another user keeps its own ids
                os.lchown(part, user.uid, user.gid)


def precompile(root: Path, lib_in_image: Path) -> None:
    """Bytecode for guest_init made by the image's own python3 (in a chroot), as unchecked-hash pycs
    that stay valid whatever the file times become: no guest boot compiles guest_init again.
    Skipped (with no error) when the root has no python3 or this is not root."""
    if os.geteuid() != 0 or not (root / "usr/bin/python3").exists():
        return
    subprocess.run(["chroot", str(root), "/usr/bin/python3", "-m", "compileall", "-q", "--invalidation-mode",
                    "unchecked-hash", str(lib_in_image)], capture_output=True, timeout=300, check=False,
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
