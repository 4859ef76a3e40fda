"""The resize size grammar: ``128`` (GiB), ``128G``, ``128GiB``, ``2T``, ``2TiB``."""

from __future__ import annotations

from agentbox_runtime.errors import InputError

GIB = 1 << 30
TIB = 1 << 40
U64_MAX = (1 << 64) - 1
MAX_SIZE = (1 << 63) - 1
"""Largest accepted size: file sizes are signed 64-bit (off_t)."""
ACCEPTED = "must be a positive integer size like 128, 128G, 128GiB, or 2TiB"
# Tried in this order; no K/M suffixes on purpose.
SUFFIXES = (("GiB", GIB), ("GIB", GIB), ("gib", GIB), ("G", GIB), ("g", GIB),
            ("TiB", TIB), ("TIB", TIB), ("tib", TIB), ("T", TIB), ("t", TIB))


def parse_resize_size(text: str) -> int:
    """Bytes for a resize ``--size`` value; :class:`InputError` names what is accepted."""
    value = text.strip()
    digits, unit = value, GIB
    for suffix, factor in SUFFIXES:
        if value.endswith(suffix):
            digits, unit = value[: -len(suffix)], factor
            break
    if not digits or not (digits.isascii() and digits.isdigit()):
        raise InputError(f"invalid size '{text}': {ACCEPTED}")
    number = int(digits)
    if number == 0:
        raise InputError(f"invalid size '{text}': size must be greater than zero")
    total = number * unit
    if total > MAX_SIZE:
        raise InputError(f"invalid size '{text}': size is too large (at most {MAX_SIZE} bytes, about 8 EiB)")
    return total
