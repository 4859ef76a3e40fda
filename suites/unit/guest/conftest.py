"""Helpers for the guest_init unit tests: a recording tool runner (the boundary to blkid/mount/btrfs)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence

import pytest

Reply = tuple[int, str, str]


class Recorder:
    """Records every argv; answers from ``rules`` (first prefix match) or with success."""

    def __init__(self, rules: dict[tuple[str, ...], Reply] | None = None,
                 fallback: Callable[[list[str]], Reply] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.rules = dict(rules or {})
        self.fallback = fallback

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append(argv)
        for prefix, (rc, out, err) in self.rules.items():
            if tuple(argv[:len(prefix)]) == prefix:
                return subprocess.CompletedProcess(argv, rc, out, err)
        rc, out, err = self.fallback(argv) if self.fallback else (0, "", "")
        return subprocess.CompletedProcess(argv, rc, out, err)

    def tools(self) -> list[str]:
        return [" ".join(c) for c in self.calls]


@pytest.fixture()
def recorder() -> type[Recorder]:
    return Recorder
