"""docs/behaviour.md holds every section the code cites as "reference N.N" (or "reference section N").

Docstrings point readers at the behaviour they implement; a citation of a section the repository
does not hold sends them nowhere."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"reference (?:sections? )?(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)
PACKAGES = ("agentbox_runtime", "agentbox_guest_init", "agentbox_harness", "smoke", "suites")


def cited_sections() -> dict[str, str]:
    cited: dict[str, str] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for section in CITATION.findall(path.read_text()):
                cited.setdefault(section, str(path.relative_to(REPO)))
    return cited


def test_every_cited_section_is_in_docs_behaviour() -> None:
    held = set(HEADING.findall((REPO / "docs" / "behaviour.md").read_text()))
    cited = cited_sections()
    assert cited, "no citations found: the pattern no longer matches how the code cites"
    missing = {section: where for section, where in cited.items() if section not in held}
    assert not missing, f"cited but not in docs/behaviour.md: {missing}"
