"""Listening TCP sockets as the guest kernel lists them, read from ``/proc/net/tcp`` and ``tcp6``.

``Machine.wait_for_open_port`` reads those two files in the guest (no tool the image may lack)
and asks :func:`serves`. Each row's ``local_address`` is ``ADDR:PORT`` in hex: the address as
32-bit words in the kernel's byte order (little-endian here), the port big-endian; state ``0A``
is LISTEN.
"""

from __future__ import annotations

import ipaddress
import sys

LISTEN = "0A"
READ_COMMAND = ["sh", "-c", "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; true"]
"""What the guest runs (as root): both tables; a guest without IPv6 has no ``tcp6``."""

Listener = tuple[str, int]
"""A listening socket: (address, port)."""


def _address(hexaddr: str) -> str:
    words = [bytes.fromhex(hexaddr[i:i + 8]) for i in range(0, len(hexaddr), 8)]
    raw = b"".join(w[::-1] if sys.byteorder == "little" else w for w in words)
    ip = ipaddress.ip_address(raw)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return f"::ffff:{mapped}" if mapped is not None else str(ip)


def listening(table: str) -> list[Listener]:
    """The LISTEN sockets in the text of ``/proc/net/tcp`` and/or ``/proc/net/tcp6`` (header
    lines and anything unparsable are skipped), sorted."""
    found: set[Listener] = set()
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[3] != LISTEN or ":" not in fields[1]:
            continue
        hexaddr, _, hexport = fields[1].partition(":")
        try:
            found.add((_address(hexaddr), int(hexport, 16)))
        except ValueError:
            continue
    return sorted(found)


def normalize(addr: str) -> str:
    """``addr`` as an IP address string (``localhost`` is 127.0.0.1); one clear error otherwise."""
    if addr == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        raise ValueError(f"address {addr!r} is not accepted: give an IPv4 or IPv6 address "
                         "(or localhost)") from None


def serves(listeners: list[Listener], addr: str, port: int) -> bool:
    """True when a connection to ``addr:port`` would reach one of ``listeners``: a socket bound
    to that address, to the wildcard of its family, or to ``::`` (dual-stack) for IPv4."""
    want = ipaddress.ip_address(normalize(addr))
    accepted = {str(want), "0.0.0.0" if want.version == 4 else "::", "::"}
    if want.version == 4:
        accepted.add(f"::ffff:{want}")
    return any(p == port and a in accepted for a, p in listeners)


def describe(listeners: list[Listener]) -> str:
    """The listeners as ``addr:port`` words (IPv6 in brackets), or ``none``."""
    if not listeners:
        return "none"
    return ", ".join(f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in listeners)
