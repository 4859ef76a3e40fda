#!/usr/bin/env python3
"""Merge the JUnit and Allure results of test shards into one report and one summary table.

Each shard is a directory holding what one pytest run wrote:

    SHARD/*.xml        its JUnit XML (pytest --junitxml=SHARD/junit.xml); at least one
    SHARD/allure/      its Allure results (pytest --alluredir=SHARD/allure); optional

The shard's name (its directory's name, e.g. ``smoke-qemu-1of3``) labels its row in
the summary and its ``<testsuite>`` in the merged JUnit. The nightly workflow runs
it over the downloaded shard artifacts; on your own hosts, copy each host's shard
directory to one place and run:

    python3 scripts/merge_reports.py --junit-out report/junit.xml --allure-out report/allure \\
        --summary report/summary.md --expect 3 shard-1 shard-2 shard-3

- ``--junit-out``: one ``<testsuites>`` holding every shard's test suites (renamed to
  the shard), with the totals on the root element.
- ``--allure-out``: every shard's Allure result files copied into one new (or empty)
  directory; ``allure generate`` or ``allure serve`` reads it. When a shard's
  ``environment.properties`` names its ``agentbox.backend``, that shard's results get a
  ``backend`` parameter and a history id of their own, so the same test on two
  backends shows as two tests rather than as retries of one. The
  ``environment.properties`` files are merged (a key with several values lists them).
- ``--summary``: the Markdown table (one row per shard: tests, passed, failed, skipped,
  errors, time; then the totals and the failed tests). It is printed in any case.
  xfailed tests count as skipped and xpassed ones under strict xfail as failed, as in JUnit.
- ``--expect N``: the number of shards there should be; another number is reported and fails.

Exit status: 0 every test passed (or skipped), 1 a test failed or errored or the shard
count is not ``--expect``, 2 a bad input (one line on stderr naming it). Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROG = "merge_reports"
LISTED_FAILURES = 50
"""At most this many failed tests are named in the summary."""
BACKEND_KEY = "agentbox.backend"
"""The ``environment.properties`` key the agentbox plugin writes the session backend to."""


class InputError(Exception):
    """A user mistake: the message is the whole one-line error."""


@dataclass
class Shard:
    """One shard's results: its JUnit test suites, counts, and its Allure directory."""

    name: str
    suites: list[ET.Element]
    allure: Path | None
    tests: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: int = 0
    time: float = 0.0
    failures: list[str] = field(default_factory=list)


def _suites(path: Path) -> list[ET.Element]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise InputError(f"{path}: not valid XML ({exc})") from None
    if root.tag == "testsuite":
        return [root]
    if root.tag == "testsuites":
        return list(root.iter("testsuite"))
    raise InputError(f"{path}: not a JUnit XML file (root element <{root.tag}>, expected <testsuites> or <testsuite>)")


def read_shard(directory: Path) -> Shard:
    """Read one shard directory (see the module docstring for its layout)."""
    if not directory.is_dir():
        raise InputError(f"{directory}: no such shard directory")
    xmls = sorted(directory.glob("*.xml"))
    if not xmls:
        raise InputError(f"{directory}: no JUnit XML file (*.xml) in this shard directory")
    shard = Shard(name=directory.resolve().name, suites=[s for x in xmls for s in _suites(x)],
                  allure=directory / "allure" if (directory / "allure").is_dir() else None)
    for suite in shard.suites:
        suite.set("name", shard.name)
        try:
            shard.time += float(suite.get("time", "0") or 0)
        except ValueError:
            raise InputError(f"{directory}: a test suite has a non-numeric time {suite.get('time')!r}") from None
        for case in suite.iter("testcase"):
            shard.tests += 1
            bad = case.find("failure")
            bad = bad if bad is not None else case.find("error")
            shard.failed += case.find("failure") is not None
            shard.errors += case.find("error") is not None
            if bad is None:
                shard.skipped += case.find("skipped") is not None
                shard.passed += case.find("skipped") is None
                continue
            message = (bad.get("message") or "").splitlines()
            shard.failures.append(f"{case.get('classname', '')}::{case.get('name', '')}"
                                  + (f": {message[0][:160]}" if message else ""))
    return shard


def write_junit(shards: Sequence[Shard], out: Path) -> None:
    """One ``<testsuites>`` with every shard's suites and the totals."""
    root = ET.Element("testsuites", name=f"{len(shards)} shards")
    for attr, count in (("tests", "tests"), ("failures", "failed"), ("errors", "errors"), ("skipped", "skipped")):
        root.set(attr, str(sum(getattr(shard, count) for shard in shards)))
    root.set("time", f"{sum(shard.time for shard in shards):.3f}")
    for shard in shards:
        root.extend(shard.suites)
    out.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)


def _properties(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if line.strip() and not line.lstrip().startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _tag_backend(result: Path, backend: str) -> bytes:
    """A result file with a ``backend`` parameter and a history id of its own backend."""
    data = json.loads(result.read_text())
    params = data.setdefault("parameters", [])
    if not any(p.get("name") == "backend" for p in params):
        params.append({"name": "backend", "value": backend})
    if data.get("historyId"):
        data["historyId"] = hashlib.md5(f"{data['historyId']}:{backend}".encode()).hexdigest()
    return json.dumps(data).encode()


def merge_allure(shards: Sequence[Shard], out: Path) -> int:
    """Copy every shard's Allure files into ``out``; return how many test results it holds."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--allure-out {out}: exists and is not an empty directory (merging into old results would mix runs)")
    out.mkdir(parents=True, exist_ok=True)
    environment: dict[str, list[str]] = {}
    for shard in shards:
        if shard.allure is None:
            print(f"{PROG}: note: {shard.name} has no allure/ directory; its tests are only in the JUnit report",
                  file=sys.stderr)
            continue
        env_file = shard.allure / "environment.properties"
        env = _properties(env_file) if env_file.is_file() else {}
        for key, value in env.items():
            if value not in environment.setdefault(key, []):
                environment[key].append(value)
        backend = env.get(BACKEND_KEY)
        for src in sorted(p for p in shard.allure.iterdir() if p.is_file() and p.name != "environment.properties"):
            try:
                content = _tag_backend(src, backend) if backend and src.name.endswith("-result.json") else src.read_bytes()
            except ValueError:
                raise InputError(f"{src}: not a valid Allure result (bad JSON)") from None
            dest = out / src.name
            if dest.exists() and dest.read_bytes() != content:
                print(f"{PROG}: note: {src.name} differs between shards; kept the first copy", file=sys.stderr)
                continue
            dest.write_bytes(content)
    if environment:
        (out / "environment.properties").write_text(
            "".join(f"{key}={', '.join(values)}\n" for key, values in environment.items()))
    return sum(1 for _ in out.glob("*-result.json"))


def summary(shards: Sequence[Shard], expect: int | None, title: str) -> str:
    """The Markdown summary: one row per shard, the totals, missing shards, failed tests."""
    cols = ("tests", "passed", "failed", "skipped", "errors")
    lines = [f"## {title}", "", "| shard | " + " | ".join(cols) + " | time |", "|---|" + "---:|" * (len(cols) + 1)]
    for shard in shards:
        lines.append(f"| {shard.name} | " + " | ".join(str(getattr(shard, c)) for c in cols) + f" | {shard.time:.1f}s |")
    totals = {c: sum(getattr(shard, c) for shard in shards) for c in cols}
    lines.append("| **total** | " + " | ".join(f"**{totals[c]}**" for c in cols)
                 + f" | **{sum(s.time for s in shards):.1f}s** |")
    lines.append("")
    longest = max(shards, key=lambda s: s.time)
    lines.append(f"{len(shards)} shards; the longest, {longest.name}, took {longest.time:.1f}s.")
    if expect is not None and len(shards) != expect:
        lines.append(f"**Expected {expect} shards, got {len(shards)}.**")
    failures = ["- " + shard.name + ": `" + line.replace("`", "'") + "`" for shard in shards for line in shard.failures]
    if failures:
        lines += ["", f"### Failed or errored ({len(failures)})", "", *failures[:LISTED_FAILURES]]
        if len(failures) > LISTED_FAILURES:
            lines.append(f"- ... and {len(failures) - LISTED_FAILURES} more (see the merged JUnit report)")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Merge test shards' JUnit and Allure results "
                                     "into one report and one summary table.")
    parser.add_argument("shards", nargs="+", type=Path, metavar="SHARD_DIR",
                        help="a shard's result directory: *.xml (JUnit) and optionally allure/")
    parser.add_argument("--junit-out", type=Path, required=True, help="the merged JUnit XML file to write")
    parser.add_argument("--allure-out", type=Path, help="a new or empty directory for the merged Allure results")
    parser.add_argument("--summary", type=Path, help="also write the Markdown summary to this file")
    parser.add_argument("--expect", type=int, help="how many shards there should be (another number fails the merge)")
    parser.add_argument("--title", default="Test results", help="the summary's heading")
    args = parser.parse_args(argv)
    try:
        if args.expect is not None and args.expect < 1:
            raise InputError(f"--expect {args.expect}: must be at least 1")
        seen: dict[str, Path] = {}
        for directory in args.shards:
            name = directory.resolve().name
            if name in seen:
                raise InputError(f"{directory}: a second shard named {name} (first: {seen[name]}); each shard "
                                 "directory needs its own name")
            seen[name] = directory
        shards = [read_shard(d) for d in args.shards]
        allure_results = merge_allure(shards, args.allure_out) if args.allure_out else None
        write_junit(shards, args.junit_out)
        text = summary(shards, args.expect, args.title)
        if args.summary:
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(text)
    except (InputError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    print(f"{PROG}: wrote {args.junit_out}" + (f", {args.allure_out} ({allure_results} results)" if args.allure_out else "")
          + (f", {args.summary}" if args.summary else ""), file=sys.stderr)
    mismatch = args.expect is not None and len(shards) != args.expect
    return 1 if mismatch or any(s.failed or s.errors for s in shards) else 0


if __name__ == "__main__":
    sys.exit(main())
