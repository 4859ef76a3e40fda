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
MAX_FRAME = 64 << 20  # a partial frame longer than this is noise (file transfers go in CHUNK pieces)
CHUNK = 4 << 20
"""Bytes of file data per ``read_file``/``write_file`` frame (base64 makes it a third larger)."""
MAX_DEPTH = 32
"""Deepest JSON nesting a frame may have (messages are flat; deeper is hostile)."""


def encode_frame(message: dict[str, Any]) -> bytes:
    """One frame holding ``message``."""
    payload = base64.b64encode(json.dumps(message, separators=(",", ":")).encode())
    return b"\n" + MAGIC + payload + b" " + f"{zlib.crc32(payload):08x}".encode() + b"\n"


class Damaged(ValueError):
    """Why a frame body was dropped."""


def _depth(text: bytes) -> int:
    """The deepest ``[``/``{`` nesting of JSON text (strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == 0x5C:  # backslash
                escaped = True
            elif ch == 0x22:
                in_string = False
        elif ch == 0x22:
            in_string = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return deepest


def decode_body(line: bytes) -> dict[str, Any]:
    """The message of one frame body (``<base64> <crc>``); raises :class:`Damaged` naming the fault."""
    payload, _, crc = line.strip().rpartition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(payload):
            raise Damaged("checksum mismatch")
        text = base64.b64decode(payload, validate=True)
    except ValueError as exc:
        raise Damaged(f"bad framing ({exc})") from None
    if _depth(text) > MAX_DEPTH:
        raise Damaged(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Damaged(f"bad JSON ({type(exc).__name__})") from None
    if not isinstance(message, dict):
        raise Damaged(f"a JSON {type(message).__name__}, not an object")
    return message


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The message of one frame body (``<base64> <crc>``), or None when it is damaged."""
    try:
        return decode_body(line)
    except Damaged:
        return None


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

    def __init__(self, noise_keep: int = 4096, max_frame: int = MAX_FRAME) -> None:
        self.buf = bytearray()
        self.scanned = 0  # bytes of an open frame already searched for its end
        self.noise = b""
        self.noise_keep = noise_keep
        self.max_frame = max_frame
        self.dropped = 0
        self.last_drop = ""
        """Why the last frame was dropped (for diagnostics)."""

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
                if len(self.buf) > self.max_frame:
                    self.dropped += 1
                    self.last_drop = f"a frame longer than {self.max_frame} bytes"
                    self._drop_front(len(self.buf), True)
                return out
            body = bytes(self.buf[len(MAGIC):end])
            self._drop_front(end + 1, False)
            try:
                out.append(decode_body(body))
            except Damaged as exc:
                self.dropped += 1
                self.last_drop = str(exc)
