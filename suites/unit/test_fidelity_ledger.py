"""docs/libkrun-fidelity.md stays in step with the libkrun calls the product makes.

The ledger has one row per libkrun symbol the helper calls (its first table); the helper names
them in ``agentbox_runtime.vmm.libkrun.HELPER_CALLS``; and no module of the runtime may name a
``krun_*`` symbol that list lacks. A call added, dropped or renamed without its ledger row fails
here (a module that loads libraries with ctypes counts as naming the ``krun_*`` strings it holds)."""

from __future__ import annotations

import re
from pathlib import Path

from agentbox_runtime.vmm.libkrun import HELPER_CALLS

REPO = Path(__file__).resolve().parents[2]
LEDGER = REPO / "docs" / "libkrun-fidelity.md"
ROW = re.compile(r"^\| `(krun_[a-z0-9_]+)` \|", re.MULTILINE)
LITERAL = re.compile(r"""["'](krun_[a-z0-9_]+)["']""")


def ledger_symbols() -> list[str]:
    return ROW.findall(LEDGER.read_text())


def test_the_ledger_has_one_row_per_helper_call() -> None:
    rows = ledger_symbols()
    assert len(rows) == len(set(rows)), f"a symbol has two rows: {sorted(r for r in rows if rows.count(r) > 1)}"
    assert set(rows) == set(HELPER_CALLS), (f"ledger only: {sorted(set(rows) - set(HELPER_CALLS))}; "
                                            f"helper only: {sorted(set(HELPER_CALLS) - set(rows))}")


def test_every_krun_symbol_the_runtime_names_is_a_declared_helper_call() -> None:
    named = {}
    for path in (REPO / "agentbox_runtime").rglob("*.py"):
        text = path.read_text()
        if "import ctypes" not in text:  # only a module that loads libraries can call libkrun
            continue
        for symbol in LITERAL.findall(text):
            named.setdefault(symbol, path.relative_to(REPO))
    undeclared = {s: str(p) for s, p in named.items() if s not in HELPER_CALLS}
    assert not undeclared, f"libkrun symbols used but not in HELPER_CALLS (and the ledger): {undeclared}"
    assert set(HELPER_CALLS) <= set(named), f"declared but never called: {sorted(set(HELPER_CALLS) - set(named))}"


def test_every_ledger_row_names_its_upstream_source_and_a_verdict() -> None:
    for line in LEDGER.read_text().splitlines():
        if ROW.match(line):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            assert len(cells) == 5, line[:80]
            upstream, verdict = cells[1], cells[3]
            assert re.search(r"lib\.rs|\.rs|\.c|\.h", upstream), f"no upstream file cited: {line[:80]}"
            assert verdict.startswith(("same", "differs")), f"no verdict: {line[:80]}"
