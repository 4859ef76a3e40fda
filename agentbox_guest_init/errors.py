"""The one error type of guest init."""

from __future__ import annotations


class GuestError(Exception):
    """A guest-init failure: printed as ``agentbox-guest-init: <msg>``, exit status 1."""
