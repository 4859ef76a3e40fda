"""Framing of the harness control channel, robust against noise on the same stream.

A frame is one line: ``\\n@@AGENTBOX1 <base64 of JSON> <crc32 hex>\\n``. A
reader scans for the magic, ignores every other byte (kernel messages, shell
echo), and drops frames whose checksum does not match. Requests and
responses are JSON objects; a response echoes the request ``id``.
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

MAGIC = b"@@AGENTBOX1 "


def encode_frame(message: dict[str, Any]) -> bytes:
    payload = base64.b64encode(json.dumps(message, separators=(",", ":")).encode())
    return b"\n" + MAGIC + payload + b" " + f"{zlib.crc32(payload):08x}".encode() + b"\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


class FrameReader:
    """Feed bytes in, get decoded frames out; keeps the recent noise for diagnostics."""

    def __init__(self, noise_keep: int = 4096) -> None:
        self.buf = b""
        self.noise = b""
        self.noise_keep = noise_keep

    def _note_noise(self, data: bytes) -> None:
        if data:
            self.noise = (self.noise + data)[-self.noise_keep:]

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self.buf += data
        out: list[dict[str, Any]] = []
        while True:
            start = self.buf.find(MAGIC)
            if start < 0:
                keep = len(MAGIC) - 1
                self._note_noise(self.buf[:-keep] if len(self.buf) > keep else b"")
                self.buf = self.buf[-keep:] if len(self.buf) > keep else self.buf
                return out
            self._note_noise(self.buf[:start])
            end = self.buf.find(b"\n", start)
            if end < 0:
                self.buf = self.buf[start:]
                return out
            line = self.buf[start + len(MAGIC):end]
            self.buf = self.buf[end + 1:]
            payload, _, crc = line.strip().rpartition(b" ")
            try:
                if int(crc, 16) != zlib.crc32(payload):
                    continue
                out.append(json.loads(base64.b64decode(payload, validate=True)))
            except (ValueError, json.JSONDecodeError):
                continue
