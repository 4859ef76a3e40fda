"""The passt DNS fix (reference 7.8)."""

from __future__ import annotations

from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init.proc import ROOT, under

FIRST_LINE = f"nameserver {c.PASST_DNS}"


def normalize_resolv_conf(text: str | None) -> str:
    """``text`` with ``nameserver 169.254.1.1`` as the only such line and the first line.

    Other lines keep their order; ``None`` (no file) gives just that line.
    """
    kept = [line for line in (text or "").splitlines() if line.strip() != FIRST_LINE]
    return "\n".join([FIRST_LINE, *kept]) + "\n"


def fix_passt_dns(root: Path = ROOT) -> None:
    """Rewrite ``/etc/resolv.conf`` (a symlink there is replaced by a file)."""
    path = under(root, "/etc/resolv.conf")
    try:
        text: str | None = path.read_text()
    except FileNotFoundError:
        text = None
    if path.is_symlink():
        path.unlink()
    path.write_text(normalize_resolv_conf(text))
