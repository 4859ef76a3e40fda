"""scripts/merge_reports.py and scripts/durations_from_junit.py: their inputs, outputs and one-line errors.

The end-to-end check (real pytest-split shards merged) is in test_sharding.py; these
cases use small hand-written JUnit and Allure files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MERGE = REPO / "scripts" / "merge_reports.py"
DURATIONS = REPO / "scripts" / "durations_from_junit.py"

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4" failures="0" errors="0" skipped="1" time="{time}">
<testcase classname="smoke.test_disk_flows" name="test_reset_nix_flow[qemu]" time="17.5"/>
<testcase classname="smoke.test_disk_flows" name="test_grow[qemu]" time="{grow}"/>
<testcase classname="smoke.test_image_contract" name="test_skipped" time="0.1"><skipped message="no"/></testcase>
<testcase classname="suites.unit.test_x.TestY" name="test_z" time="0.2"/>
</testsuite></testsuites>
"""


def run(script: Path, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def one_error_line(proc: subprocess.CompletedProcess[str], prog: str, *words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def shard(root: Path, name: str, grow: float = 30.0, backend: str | None = None, history: str = "abc") -> Path:
    """A shard directory: junit.xml, and allure/ with one result when a backend is given."""
    d = root / name
    d.mkdir(parents=True)
    (d / "junit.xml").write_text(JUNIT.format(time=50.0, grow=grow))
    if backend is not None:
        (d / "allure").mkdir()
        (d / "allure" / f"{name}-result.json").write_text(json.dumps(
            {"name": "test_reset_nix_flow", "status": "passed", "historyId": history, "parameters": []}))
        (d / "allure" / "environment.properties").write_text(f"agentbox.backend={backend}\nagentbox.strict=True\n")
    return d


# merge_reports.py


def test_merge_tags_each_backend_so_the_same_test_is_not_shown_as_a_retry(tmp_path: Path) -> None:
    shard(tmp_path, "smoke-qemu-1of1", backend="qemu")
    shard(tmp_path, "smoke-krun-direct-1of1", backend="krun-direct")
    proc = run(MERGE, "--junit-out", "out.xml", "--allure-out", "allure", "smoke-qemu-1of1", "smoke-krun-direct-1of1",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "allure").glob("*-result.json"))]
    assert len({r["historyId"] for r in results}) == 2
    assert sorted(r["parameters"][0]["value"] for r in results) == ["krun-direct", "qemu"]
    env = (tmp_path / "allure" / "environment.properties").read_text().splitlines()
    assert env == ["agentbox.backend=qemu, krun-direct", "agentbox.strict=True"]
    suites = ET.parse(tmp_path / "out.xml").getroot()
    assert [s.get("name") for s in suites] == ["smoke-qemu-1of1", "smoke-krun-direct-1of1"]
    assert (suites.get("tests"), suites.get("skipped"), suites.get("failures"), suites.get("time")) == ("8", "2", "0", "100.000")


def test_merge_without_failures_exits_0_and_prints_the_table(tmp_path: Path) -> None:
    shard(tmp_path, "a")
    proc = run(MERGE, "--junit-out", "out.xml", "--expect", "1", "a", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| a | 4 | 3 | 0 | 1 | 0 | 50.0s |" in proc.stdout
    assert "Failed" not in proc.stdout


@pytest.mark.parametrize("case", ["missing", "no-xml", "bad-xml", "not-junit", "allure-out-used", "same-name",
                                  "expect-zero", "bad-allure-json"])
def test_merge_errors_are_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    out = ["--junit-out", "out.xml"]
    args: list[str | Path]
    words: tuple[str, ...]
    if case == "missing":
        args, words = [*out, "nowhere"], ("nowhere", "no such shard directory")
    elif case == "no-xml":
        (tmp_path / "empty").mkdir()
        args, words = [*out, "empty"], ("empty", "no JUnit XML file")
    elif case == "bad-xml":
        (tmp_path / "s").mkdir()
        (tmp_path / "s" / "junit.xml").write_text("<testsuites><testcase>")
        args, words = [*out, "s"], ("junit.xml", "not valid XML")
    elif case == "not-junit":
        (tmp_path / "s").mkdir()
        (tmp_path / "s" / "pom.xml").write_text("<project/>")
        args, words = [*out, "s"], ("pom.xml", "not a JUnit XML file", "<project>")
    elif case == "allure-out-used":
        shard(tmp_path, "a", backend="qemu")
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "x-result.json").write_text("{}")
        args, words = [*out, "--allure-out", "old", "a"], ("--allure-out old", "not an empty directory")
    elif case == "same-name":
        shard(tmp_path / "night1", "a")
        shard(tmp_path / "night2", "a")
        args, words = [*out, "night1/a", "night2/a"], ("night2/a", "a second shard named a")
    elif case == "expect-zero":
        shard(tmp_path, "a")
        args, words = [*out, "--expect", "0", "a"], ("--expect 0",)
    else:
        d = shard(tmp_path, "a", backend="qemu")
        (d / "allure" / "a-result.json").write_text("{not json")
        args, words = [*out, "--allure-out", "merged", "a"], ("a-result.json", "not a valid Allure result")
    one_error_line(run(MERGE, *args, cwd=tmp_path), "merge_reports", *words)
    assert not (tmp_path / "out.xml").exists(), "nothing is written after a bad input"


# durations_from_junit.py


def test_durations_merge_into_the_existing_file_and_keep_the_longest_time(tmp_path: Path) -> None:
    (tmp_path / "smoke").mkdir()
    for name in ("test_disk_flows.py", "test_image_contract.py"):
        (tmp_path / "smoke" / name).write_text("")
    (tmp_path / "qemu.xml").write_text(JUNIT.format(time=1, grow=30.0))
    (tmp_path / "krun.xml").write_text(JUNIT.format(time=1, grow=41.25))
    (tmp_path / ".test_durations").write_text(json.dumps({"smoke/test_old.py::test_kept": 3.0,
                                                          "smoke/test_disk_flows.py::test_grow[qemu]": 5.0}))
    proc = run(DURATIONS, "--only", "smoke/", "qemu.xml", "krun.xml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ".test_durations: 3 durations updated, 4 in all\n"
    assert json.loads((tmp_path / ".test_durations").read_text()) == {
        "smoke/test_old.py::test_kept": 3.0,
        "smoke/test_disk_flows.py::test_grow[qemu]": 41.25,
        "smoke/test_disk_flows.py::test_reset_nix_flow[qemu]": 17.5,
        "smoke/test_image_contract.py::test_skipped": 0.1,
    }


def test_durations_without_the_test_files_take_capitalized_parts_as_classes(tmp_path: Path) -> None:
    (tmp_path / "run.xml").write_text(JUNIT.format(time=1, grow=1))
    proc = run(DURATIONS, "--durations", "d.json", "--only", "suites/", "run.xml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "d.json").read_text()) == {"suites/unit/test_x.py::TestY::test_z": 0.2}


@pytest.mark.parametrize("case", ["missing", "bad-xml", "not-junit", "bad-durations", "non-numeric-durations", "no-match"])
def test_durations_errors_are_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    (tmp_path / "run.xml").write_text(JUNIT.format(time=1, grow=1))
    args: list[str]
    if case == "missing":
        args, words = ["gone.xml"], ("gone.xml", "no such file")
    elif case == "bad-xml":
        (tmp_path / "bad.xml").write_text("<testsuites>")
        args, words = ["bad.xml"], ("bad.xml", "not valid XML")
    elif case == "not-junit":
        (tmp_path / "pom.xml").write_text("<project/>")
        args, words = ["pom.xml"], ("pom.xml", "not a JUnit XML file")
    elif case == "bad-durations":
        (tmp_path / ".test_durations").write_text("{oops")
        args, words = ["run.xml"], (".test_durations", "not a readable JSON durations file")
    elif case == "non-numeric-durations":
        (tmp_path / ".test_durations").write_text('{"a": "slow"}')
        args, words = ["run.xml"], (".test_durations", "not a pytest-split durations file")
    else:
        args, words = ["--only", "bench/", "run.xml"], ("no test case in run.xml matches --only bench/",)
    before = (tmp_path / ".test_durations").read_text() if (tmp_path / ".test_durations").exists() else None
    one_error_line(run(DURATIONS, *args, cwd=tmp_path), "durations_from_junit", *words)
    after = (tmp_path / ".test_durations").read_text() if (tmp_path / ".test_durations").exists() else None
    assert after == before, "a bad input leaves the durations file as it was"
