"""Framing of the harness control channel, robust against noise on the same stream.

A frame is one line: ``\\n@@AGENTBOX1 <base64 of JSON> <crc32 hex>\\n``. A
reader scans for the magic, ignores every other byte (kernel messages,
shell echo), drops frames whose checksum or payload is bad, and resyncs on
a new magic. Requests and responses are JSON objects; a request carries
``op`` and usually an ``id`` that its response echoes; byte fields are
base64 strings (:func:`b64`).
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from typing import Any

MAGIC = b"@@AGENTBOX1 "
MAX_FRAME = 256 << 20  # a partial frame longer than this is noise


def encode_frame(message: dict[str, Any]) -> bytes:
    """One frame holding ``message``."""
    payload = base64.b64encode(json.dumps(message, separators=(",", ":")).encode())
    return b"\n" + MAGIC + payload + b" " + f"{zlib.crc32(payload):08x}".encode() + b"\n"


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The message of one frame body (``<base64> <crc>``), or None when it is damaged."""
    payload, _, crc = line.strip().rpartition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(payload):
            return None
        message = json.loads(base64.b64decode(payload, validate=True))
    except (ValueError, json.JSONDecodeError):
        return None
    return message if isinstance(message, dict) else None


def b64(data: bytes) -> str:
    """Bytes as a JSON-safe string."""
    return base64.b64encode(data).decode()


def unb64(text: str | None) -> bytes:
    """The inverse of :func:`b64` (``None`` and ``""`` give ``b""``)."""
    return base64.b64decode(text) if text else b""


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (pipes and sockets may take less per call)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class FrameReader:
    """Feed bytes in, get decoded messages out; keeps the recent noise for diagnostics."""

    def __init__(self, noise_keep: int = 4096) -> None:
        self.buf = bytearray()
        self.scanned = 0  # bytes of an open frame already searched for its end
        self.noise = b""
        self.noise_keep = noise_keep
        self.dropped = 0

    def _note_noise(self, data: bytes | bytearray) -> None:
        if data:
            self.noise = (self.noise + bytes(data[-self.noise_keep:]))[-self.noise_keep:]

    def tail(self) -> bytes:
        """The recent noise plus bytes not yet decoded (a partial frame or a possible magic start)."""
        return (self.noise + bytes(self.buf[-self.noise_keep:]))[-self.noise_keep:]

    def _drop_front(self, n: int, noise: bool) -> None:
        if noise:
            self._note_noise(self.buf[:n])
        del self.buf[:n]
        self.scanned = 0

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add ``data``; every complete, intact message found so far."""
        self.buf += data
        out: list[dict[str, Any]] = []
        while True:
            if not self.buf.startswith(MAGIC):
                start = self.buf.find(MAGIC)
                if start < 0:  # keep a tail that may be the start of a magic
                    self._drop_front(max(0, len(self.buf) - (len(MAGIC) - 1)), True)
                    return out
                self._drop_front(start, True)
            from_ = max(len(MAGIC), self.scanned)
            end = self.buf.find(b"\n", from_)
            again = self.buf.find(MAGIC, max(len(MAGIC), self.scanned - len(MAGIC)))
            if again >= 0 and (end < 0 or again < end):  # a new frame began inside this one
                self.dropped += 1
                self._drop_front(again, True)
                continue
            if end < 0:
                self.scanned = len(self.buf)
                if len(self.buf) > MAX_FRAME:
                    self.dropped += 1
                    self._drop_front(len(self.buf), True)
                return out
            message = decode_line(bytes(self.buf[len(MAGIC):end]))
            self._drop_front(end + 1, False)
            if message is None:
                self.dropped += 1
            else:
                out.append(message)
