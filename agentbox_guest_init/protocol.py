"""Framing of the harness control channel, robust against noise on the same stream.

A frame is one line: ``\\n@@AGENTBOX1 <base64 of JSON> <crc32 hex>\\n``. A
reader scans for the magic, ignores every other byte (kernel messages,
shell echo), drops frames whose checksum or payload is bad, and resyncs on
a new magic. Requests and responses are JSON objects; a request carries
``op`` and usually an ``id`` that its response echoes; byte fields are
base64 strings (:func:`b64`).

A channel reachable by other local users (the krun-podman attach port) is
guarded by a shared token that never crosses the wire: both ends prove they
hold it with HMAC-SHA256 over a fresh nonce from each side
(:class:`ClientAuth` on the host, :class:`GuestAuth` in the agent; the one
implementation of the exchange):

1. host → guest: ``{"op": "auth", "client_nonce": C}``;
2. guest → host: ``{"ok": true, "agent_nonce": A, "proof": HMAC(token, "guest|C|A")}``;
   the host checks it before it sends anything else;
3. host → guest: ``{"op": "auth_proof", "proof": HMAC(token, "client|A|C")}``;
4. guest → host: ``{"ok": true}``; only now does the guest serve other requests.

Until then the guest reads at most :data:`PREAUTH_MAX_BYTES` per connection, in
frames of at most :data:`PREAUTH_MAX_FRAME` bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import zlib
from collections.abc import Mapping
from typing import Any

MAGIC = b"@@AGENTBOX1 "
MAX_FRAME = 64 << 20  # a partial frame longer than this is noise (file transfers go in CHUNK pieces)
CHUNK = 4 << 20
"""Bytes of file data per ``read_file``/``write_file`` frame (base64 makes it a third larger)."""
MAX_DEPTH = 32
"""Deepest JSON nesting a frame may have (messages are flat; deeper is hostile)."""
AUTH_OP = "auth"
AUTH_PROOF_OP = "auth_proof"
NONCE_BYTES = 32
"""Random bytes per nonce (sent as 64 lowercase hex digits)."""
MIN_TOKEN_CHARS = 32
"""The shortest attach token accepted."""
PREAUTH_MAX_FRAME = 4096
"""The longest frame a connection may send before it authenticated (the auth frames are ~250 bytes)."""
PREAUTH_MAX_BYTES = 16384
"""Bytes a connection may send in all before it authenticated (frames and noise); more closes it."""
WINSIZE_MAX = 4096
"""The most rows or columns a pty window may have (``pty_spawn``, ``pty_resize``): bigger is a broken
or hostile peer, refused rather than handed to TIOCSWINSZ."""
_NONCE = re.compile(rf"[0-9a-f]{{{2 * NONCE_BYTES}}}")


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


def _dimension(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= WINSIZE_MAX:
        raise ValueError(f"pty window {name} must be an integer from 1 to {WINSIZE_MAX}, got {repr(value)[:40]}")
    return value


def winsize(rows: object, cols: object) -> tuple[int, int]:
    """A pty window size from a request: ``rows`` and ``cols`` must be integers from 1 to
    :data:`WINSIZE_MAX`; anything else raises ValueError naming the value and what is accepted."""
    return _dimension("rows", rows), _dimension("cols", cols)


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


class AuthFailed(ValueError):
    """The peer did not prove it holds the token (or broke the exchange)."""


def new_nonce() -> str:
    """A fresh nonce: :data:`NONCE_BYTES` random bytes as lowercase hex."""
    return secrets.token_hex(NONCE_BYTES)


def _nonce(value: object) -> str | None:
    return value if isinstance(value, str) and _NONCE.fullmatch(value) else None


def auth_proof(token: str, role: str, first: str, second: str) -> str:
    """HMAC-SHA256 (hex) of ``role|first|second`` keyed with ``token``; ``role`` is ``guest`` or ``client``,
    so a proof one side sent can never be replayed as the other side's."""
    if role not in ("guest", "client"):
        raise ValueError(f"auth proof role must be 'guest' or 'client', got {role!r}")
    return hmac.new(token.encode(), f"{role}|{first}|{second}".encode(), hashlib.sha256).hexdigest()


def _proof_matches(expected: str, given: object) -> bool:
    return isinstance(given, str) and given.isascii() and hmac.compare_digest(expected.encode(), given.encode())


class ClientAuth:
    """The host's half of the exchange: :meth:`hello` fields, then :meth:`answer` checks the guest's
    proof and gives the ``auth_proof`` fields (raises :class:`AuthFailed` when the guest's is wrong)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.nonce = new_nonce()

    def hello(self) -> dict[str, Any]:
        """The fields of the ``auth`` request."""
        return {"client_nonce": self.nonce}

    def answer(self, reply: Mapping[str, Any]) -> dict[str, Any]:
        """The fields of the ``auth_proof`` request, once ``reply`` (the guest's answer to ``auth``)
        proved the guest holds the token."""
        agent_nonce = _nonce(reply.get("agent_nonce"))
        if agent_nonce is None or agent_nonce == self.nonce:
            raise AuthFailed("the guest sent no valid agent_nonce")
        if not _proof_matches(auth_proof(self.token, "guest", self.nonce, agent_nonce), reply.get("proof")):
            raise AuthFailed("the guest's proof does not match the token")
        return {"proof": auth_proof(self.token, "client", agent_nonce, self.nonce)}


class GuestAuth:
    """The guest's half: :meth:`step` answers each request of a connection that has not authenticated
    yet. Its verdict is None (go on), True (authenticated: serve the connection) or False (answer,
    then close the connection)."""

    def __init__(self, token: str) -> None:
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the attach token must be at least {MIN_TOKEN_CHARS} characters")
        self.token = token
        self.client_nonce: str | None = None
        self.agent_nonce: str | None = None

    def step(self, req: Mapping[str, Any]) -> tuple[dict[str, Any], bool | None]:
        """The answer to ``req`` and the verdict."""
        op = req.get("op")
        if self.agent_nonce is None:
            client_nonce = _nonce(req.get("client_nonce"))
            if op != AUTH_OP or client_nonce is None:
                return {"ok": False, "error": f"authentication required: the first request must be "
                                              f"'{AUTH_OP}' with a client_nonce of {2 * NONCE_BYTES} lowercase "
                                              "hex digits"}, False
            self.client_nonce, self.agent_nonce = client_nonce, new_nonce()
            return {"ok": True, "agent_nonce": self.agent_nonce,
                    "proof": auth_proof(self.token, "guest", client_nonce, self.agent_nonce)}, None
        assert self.client_nonce is not None
        if op != AUTH_PROOF_OP:
            return {"ok": False, "error": f"authentication required: the second request must be "
                                          f"'{AUTH_PROOF_OP}'"}, False
        if not _proof_matches(auth_proof(self.token, "client", self.agent_nonce, self.client_nonce),
                              req.get("proof")):
            return {"ok": False, "error": "authentication failed: the proof does not match the attach token"}, False
        return {"ok": True}, True
