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


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_flake_pins_at_least_the_ledger_s_minimum_versions() -> None:
    """The flake's ``.#libkrun`` and ``.#crun`` (what the doctor sends users to) must provide every call
    the helper makes: libkrun at or above the ledger's minimum, built with block devices, and crun
    from the reference's fork, the only crun with ``krun.disk.*``. (The flake cannot be built here;
    the ledger says so.)"""
    ledger = LEDGER.read_text()
    minimum = re.search(r"^\| libkrun \| (\d+\.\d+\.\d+) \|", ledger, re.MULTILINE)
    assert minimum, "the ledger's Minimum versions table has no libkrun row"
    flake = (REPO / "flake.nix").read_text()
    pinned = re.search(r'url = "github:containers/libkrun/v(\d+\.\d+\.\d+)"', flake)
    assert pinned, "flake.nix pins no libkrun release"
    assert _version(pinned[1]) >= _version(minimum[1]), (pinned[1], minimum[1])
    assert "withBlk = true" in flake, "libkrun without BLK=1 has no krun_add_disk"
    fork = re.search(r'url = "git\+https://github\.com/zeroqn/crun\?rev=([0-9a-f]{40})&submodules=1"', flake)
    assert fork, "the flake's crun is not the reference's fork (no krun.disk.* annotations elsewhere)"
    assert fork[1][:8] in ledger, f"the ledger does not name the pinned fork commit {fork[1][:8]}"
    assert "src = crun-krun-disk" in flake and "src = libkrun-src" in flake
