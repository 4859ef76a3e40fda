"""Plugin tests run small test files in fresh pytester projects.

The inner runs see the real per-user caches (guest image, microvm image cache),
so a VM-backed inner test does not rebuild or re-ingest the image.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_CACHE = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")


@pytest.fixture(autouse=True)
def _real_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", REAL_CACHE)
