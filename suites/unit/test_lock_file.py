"""requirements.lock pins every dependency of pyproject.toml with hashes (scripts/lock.sh refreshes it)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def locked() -> dict[str, tuple[str, int]]:
    """name -> (pinned version, number of hashes)."""
    out: dict[str, tuple[str, int]] = {}
    name = ""
    for line in (REPO / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)", line)
        if m:
            name = m[1].lower().replace("_", "-")
            out[name] = (m[2], 0)
        elif "--hash=sha256:" in line and name:
            version, count = out[name]
            out[name] = (version, count + 1)
    return out


def test_every_dependency_is_pinned_with_hashes() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    pins = locked()
    for requirement in wanted:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower())  # PEP 503 names
        assert name in pins, f"{name} is not in requirements.lock; run scripts/lock.sh"
    assert all(count > 0 for _, count in pins.values()), "every pin carries its hashes"


def test_setup_installs_from_the_lock_with_hash_checking() -> None:
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "--require-hashes -r \"$repo/requirements.lock\"" in setup and "--no-deps -e" in setup
