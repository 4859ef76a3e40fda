#!/usr/bin/env python3
"""Turn pytest JUnit XML files into pytest-split's durations file, without running the tests again.

pytest-split (``--splits N --group I``) balances shards with a JSON file of
``{"node id": seconds}`` (``.test_durations`` at the repository root). This script
fills it from JUnit XML that pytest already wrote (``--junitxml``, e.g. the nightly's
merged report or a local ``./harness smoke`` run), merging into the existing file:

    python3 scripts/durations_from_junit.py --only smoke/ results/smoke-junit.xml
    python3 scripts/durations_from_junit.py --only smoke/ nightly-vm-report/junit.xml

- A test case's time is pytest's JUnit ``time`` (setup + call + teardown, the sum
  pytest-split itself stores with ``--store-durations``).
- Node ids are rebuilt from ``classname`` and ``name``: the longest dotted prefix of
  the classname that is a ``.py`` file under ``--root`` (default: the current
  directory) is the module, the rest are classes
  (``smoke.test_disk_flows`` + ``test_reset_nix_flow[qemu]`` ->
  ``smoke/test_disk_flows.py::test_reset_nix_flow[qemu]``).
- ``--only PREFIX`` (repeatable) keeps node ids starting with PREFIX.
- Entries already in the durations file that the inputs do not mention are kept;
  the ones they mention are replaced. A node id seen more than once in the inputs
  (a merged nightly report holds each test once per backend) keeps its longest time.

Exit status: 0 written, 2 for a bad input (one line on stderr naming it).
Standard library only, so it runs on any host with Python >= 3.11.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path

PROG = "durations_from_junit"


class InputError(Exception):
    """A user mistake: the message is the whole one-line error."""


def junit_cases(path: Path) -> Iterator[ET.Element]:
    """Every ``<testcase>`` of a JUnit XML file (``<testsuites>`` or a lone ``<testsuite>``)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise InputError(f"{path}: not valid XML ({exc})") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise InputError(f"{path}: not a JUnit XML file (root element <{root.tag}>, expected <testsuites> or <testsuite>)")
    yield from root.iter("testcase")


def node_id(classname: str, name: str, root: Path, file: str | None = None) -> str:
    """The pytest node id of a JUnit test case (see the module docstring for the rule)."""
    parts = classname.split(".") if classname else []
    module_len = 0
    if file and file.endswith(".py"):
        module_len = len(Path(file).with_suffix("").parts)
    else:
        for k in range(len(parts), 0, -1):
            if (root.joinpath(*parts[:k]).with_suffix(".py")).is_file():
                module_len = k
                break
        else:  # no file here: classes are the parts from the first capitalized one on
            module_len = next((i for i, p in enumerate(parts) if p[:1].isupper()), len(parts))
    module = "/".join(parts[:module_len]) + ".py" if module_len else ""
    return "::".join([p for p in (module, *parts[module_len:]) if p] + [name])


def durations(paths: Sequence[Path], root: Path, only: Sequence[str]) -> dict[str, float]:
    """Node id -> seconds from the JUnit files, filtered by the ``only`` prefixes (longest time wins)."""
    found: dict[str, float] = {}
    for path in paths:
        for case in junit_cases(path):
            nodeid = node_id(case.get("classname", ""), case.get("name", ""), root, case.get("file"))
            if only and not nodeid.startswith(tuple(only)):
                continue
            try:
                seconds = float(case.get("time", "0") or 0)
            except ValueError:
                raise InputError(f"{path}: test case {nodeid} has a non-numeric time {case.get('time')!r}") from None
            found[nodeid] = max(seconds, found.get(nodeid, 0.0))
    return found


def load_existing(path: Path) -> dict[str, float]:
    """The current durations file, or an empty mapping when there is none."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON durations file ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise InputError(f"{path}: not a pytest-split durations file (expected a JSON object of node id -> seconds)")
    return {str(k): float(v) for k, v in data.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Merge pytest JUnit XML test times into "
                                     "pytest-split's durations file.")
    parser.add_argument("junit", nargs="+", type=Path, help="JUnit XML files written by pytest --junitxml")
    parser.add_argument("--durations", type=Path, default=Path(".test_durations"),
                        help="the durations file to update (default: .test_durations)")
    parser.add_argument("--only", action="append", default=[], metavar="PREFIX",
                        help="keep only node ids starting with PREFIX (repeatable), e.g. smoke/")
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="directory node ids are relative to (default: the current directory)")
    args = parser.parse_args(argv)
    try:
        new = durations(args.junit, args.root, args.only)
        if not new:
            names = ", ".join(str(p) for p in args.junit)
            raise InputError(f"no test case in {names}" + (f" matches --only {' '.join(args.only)}" if args.only else ""))
        merged = load_existing(args.durations)
        merged.update({k: round(v, 3) for k, v in new.items()})
        args.durations.write_text(json.dumps(merged, sort_keys=True, indent=4) + "\n")
    except (InputError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.durations}: {len(new)} durations updated, {len(merged)} in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
