"""Error types shared by the whole runtime and how the CLI prints them."""

from __future__ import annotations


class AgentboxError(Exception):
    """A runtime failure: printed as ``agentbox: <chain>``, exit status 1."""

    exit_code = 1


class InputError(AgentboxError):
    """Bad input from the user (a value, a path, a flag combination).

    Raised before anything is written; printed as one line, exit status 2.
    """

    exit_code = 2


class NotAvailableError(AgentboxError):
    """A command whose runtime is not part of this build or host."""

    exit_code = 1


def error_chain(exc: BaseException) -> str:
    """Render ``exc`` and its ``__cause__`` chain as ``outer: inner: ...``."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip()
        if text and (not parts or parts[-1] != text):
            parts.append(text)
        current = current.__cause__
    return ": ".join(parts) if parts else type(exc).__name__


def one_line(text: str) -> str:
    """``text`` with control characters (newlines too) escaped, so an input error stays one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)
