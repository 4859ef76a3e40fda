"""The one quoting rule for qemu option strings.

qemu reads ``-fsdev``, ``-chardev``, ``-drive``, ``-device``, ``-object``,
``-netdev`` and ``-mon`` as ``DRIVER,key=value,key=value``: it splits at every
comma, reads ``,,`` as one literal comma, and keeps the *last* value of a key
given twice. A path with a comma (``proj,path=/etc``) would therefore add
options of its own choosing. Every value built from anything but a constant
goes through :func:`quote`, and every option string through :func:`opts`.
"""

from __future__ import annotations

import os
from pathlib import Path

from agentbox_runtime.errors import InputError

OptionValue = str | int | Path


def quote(value: OptionValue) -> str:
    """``value`` as one qemu option value: each comma doubled. A NUL byte, which no argv can
    carry, is refused with :class:`InputError`."""
    text = str(value) if isinstance(value, int) else os.fspath(value)
    if "\0" in text:
        raise InputError(f"a qemu option value cannot contain a NUL byte: {text!r}")
    return text.replace(",", ",,")


def opts(driver: str, **pairs: OptionValue | None) -> str:
    """``driver,key=value,...`` with every value quoted; keys whose value is ``None`` are left out.
    Keys are written in the order given (``mount_tag=`` for a ``mount_tag`` keyword)."""
    parts = [driver] + [f"{key}={quote(value)}" for key, value in pairs.items() if value is not None]
    return ",".join(parts)
