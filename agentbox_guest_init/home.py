"""Home and identity materialization as root (reference 7.10)."""

from __future__ import annotations

import os
from pathlib import Path

from agentbox_guest_init.identity import Identity
from agentbox_guest_init.proc import ROOT, under

HOME_DIRS = ("", ".local", ".local/share", ".local/state", ".cache", ".cache/tmp", ".config")
PRIVATE_DIRS = (".local/state", ".cache/tmp")


def replace_dev_line(text: str, entry: str) -> str:
    """``text`` without the lines of ``entry``'s name (its first ``:`` field), with ``entry`` appended."""
    name = entry.split(":", 1)[0] + ":"
    lines = [line for line in text.splitlines() if not line.startswith(name)]
    return "\n".join([*lines, entry]) + "\n"


def write_identity(ident: Identity, root: Path = ROOT) -> None:
    """Rewrite the user's entries of ``/etc/passwd`` and ``/etc/group`` (both 0644)."""
    for name, entry in zip(("/etc/passwd", "/etc/group"), ident.entries(), strict=True):
        path = under(root, name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(replace_dev_line(text, entry))
        os.chmod(path, 0o644)


def make_home(ident: Identity, root: Path = ROOT) -> None:
    """Create the user's home dirs owned by it; ``~/.cache/nix`` is chowned recursively (no symlinks followed)."""
    home = under(root, ident.home)
    for rel in HOME_DIRS:
        d = home / rel
        d.mkdir(parents=True, exist_ok=True)
        os.lchown(d, ident.uid, ident.gid)
    for rel in PRIVATE_DIRS:
        os.chmod(home / rel, 0o700)
    nix_cache = home / ".cache/nix"
    if nix_cache.is_dir() and not nix_cache.is_symlink():
        os.lchown(nix_cache, ident.uid, ident.gid)
        for top, dirs, files in os.walk(nix_cache):
            for name in dirs + files:
                os.lchown(os.path.join(top, name), ident.uid, ident.gid)


def materialize_home(ident: Identity, root: Path = ROOT) -> None:
    """The ``materialize-home`` step: identity files, then the home dirs."""
    write_identity(ident, root)
    make_home(ident, root)
