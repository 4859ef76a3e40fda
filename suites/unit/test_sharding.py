"""Sharding the nightly: pytest-split shards, merged by scripts/merge_reports.py, equal the unsharded run.

A small generated project (13 tests: passed, failed, skipped, xfailed, a setup error,
parametrized and class tests) runs once whole and then as shards 1/2 and 2/2, one
after the other, as the nightly workflow runs them on separate runners. Outcomes
are read back from each run's JUnit XML by this module's own parser, so the merge
script is checked against pytest's files, not against itself.
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
# -p no:agentbox: the generated project needs no VM fixtures, and the plugin's session
# start (the reaper) has no business in it.
PLAIN = ("-p", "no:cacheprovider", "-p", "no:agentbox")

ALPHA = """
import pytest

def test_passes_quickly():
    pass

def test_passes_slowly():
    pass

def test_fails():
    assert 1 == 2

@pytest.mark.skip(reason="not on this host")
def test_skipped():
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfailed():
    assert False

@pytest.mark.parametrize("n", [1, 2, 3])
def test_param(n):
    assert n != 3
"""

BETA = """
import pytest

class TestGroup:
    def test_in_class_passes(self):
        pass

    def test_in_class_skips(self):
        pytest.skip("skipped at run time")

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_setup_error(broken):
    pass

def test_xfail_imperative():
    pytest.xfail("imperative")

def test_passes_too():
    pass
"""

EXPECTED = {"passed": 6, "failed": 2, "skipped": 2, "xfailed": 2, "error": 1}
SLOW = "checks/test_alpha.py::test_passes_slowly"
# Recorded durations (seconds); two tests are missing on purpose (pytest-split uses the average for them).
RECORDED = {
    SLOW: 8.0,
    "checks/test_alpha.py::test_passes_quickly": 0.5,
    "checks/test_alpha.py::test_fails": 1.0,
    "checks/test_alpha.py::test_skipped": 0.1,
    "checks/test_alpha.py::test_xfailed": 1.5,
    "checks/test_alpha.py::test_param[1]": 2.0,
    "checks/test_alpha.py::test_param[2]": 2.0,
    "checks/test_alpha.py::test_param[3]": 2.0,
    "checks/test_beta.py::TestGroup::test_in_class_passes": 3.0,
    "checks/test_beta.py::TestGroup::test_in_class_skips": 0.2,
    "checks/test_beta.py::test_setup_error": 0.3,
}


def outcomes(junit: Path) -> dict[tuple[str, str], str]:
    """(classname, name) -> passed | failed | error | skipped | xfailed, from a pytest JUnit XML file."""
    found: dict[tuple[str, str], str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        assert key not in found, f"{key} appears twice in {junit}"
        skipped = case.find("skipped")
        if case.find("failure") is not None:
            found[key] = "failed"
        elif case.find("error") is not None:
            found[key] = "error"
        elif skipped is not None:
            found[key] = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
        else:
            found[key] = "passed"
    return found


def run_script(script: Path, *args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture()
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """The generated project, with its recorded durations in ``durations.json``."""
    pytester.mkpydir("checks")
    (pytester.path / "checks" / "test_alpha.py").write_text(ALPHA)
    (pytester.path / "checks" / "test_beta.py").write_text(BETA)
    (pytester.path / "durations.json").write_text(json.dumps(RECORDED))
    return pytester


def run_shard(project: pytest.Pytester, out: str, *split: str) -> dict[tuple[str, str], str]:
    result = project.runpytest_subprocess(*PLAIN, *split, "--splitting-algorithm", "least_duration",
                                          "--durations-path", "durations.json",
                                          f"--junitxml={out}/junit.xml", f"--alluredir={out}/allure")
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.stdout.str()[-2000:]
    return outcomes(project.path / out / "junit.xml")


def test_two_shards_run_one_after_the_other_equal_the_unsharded_run_and_merge_into_one_report(
        project: pytest.Pytester) -> None:
    whole = run_shard(project, "whole")
    counts = {o: list(whole.values()).count(o) for o in EXPECTED}
    assert counts == EXPECTED and len(whole) == 13

    first = run_shard(project, "shard-1", "--splits", "2", "--group", "1")
    second = run_shard(project, "shard-2", "--splits", "2", "--group", "2")
    assert first and second and not first.keys() & second.keys()
    assert {**first, **second} == whole, "the two shards ran exactly the whole run's tests, with its outcomes"
    slow_in_first = ("checks.test_alpha", "test_passes_slowly") in first
    with_slow, without_slow = (first, second) if slow_in_first else (second, first)
    assert len(with_slow) < len(without_slow), "the recorded 8 s test was balanced against several short ones"

    merge = run_script(MERGE, "--junit-out", "merged/junit.xml", "--allure-out", "merged/allure",
                       "--summary", "merged/summary.md", "--expect", "2", "--title", "Sharded checks",
                       "shard-1", "shard-2", cwd=project.path)
    assert merge.returncode == 1, merge.stderr  # the project has failing tests
    assert outcomes(project.path / "merged" / "junit.xml") == whole

    summary = (project.path / "merged" / "summary.md").read_text()
    assert merge.stdout == summary
    rows = {line.split("|")[1].strip(): [c.strip().strip("*") for c in line.split("|")[2:-1]]
            for line in summary.splitlines() if line.startswith("| ") and "---" not in line}
    # columns: tests, passed, failed, skipped (xfailed included, as in JUnit), errors, time
    assert rows["**total**"][:5] == ["13", "6", "2", "4", "1"]
    assert rows["shard-1"][0] == str(len(first)) and rows["shard-2"][0] == str(len(second))
    assert "### Failed or errored (3)" in summary
    assert "checks.test_alpha::test_param[3]" in summary and "checks.test_beta::test_setup_error" in summary

    merged_allure = list((project.path / "merged" / "allure").glob("*-result.json"))
    assert len(merged_allure) == 13
    names = {json.loads(p.read_text())["name"] for p in merged_allure}
    assert names == {name for _, name in whole}


def test_the_merge_fails_when_a_shard_is_missing(project: pytest.Pytester) -> None:
    run_shard(project, "shard-1", "--splits", "2", "--group", "1")
    merge = run_script(MERGE, "--junit-out", "merged.xml", "--expect", "2", "shard-1", cwd=project.path)
    assert merge.returncode == 1
    assert "**Expected 2 shards, got 1.**" in merge.stdout
    assert "Expected" not in run_script(MERGE, "--junit-out", "merged.xml", "--expect", "1", "shard-1",
                                        cwd=project.path).stdout


def test_durations_from_junit_gives_the_node_ids_pytest_split_itself_stores(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess(*PLAIN, "--store-durations", "--durations-path", "stored.json",
                                          "--junitxml=whole.xml")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    stored = json.loads((project.path / "stored.json").read_text())

    made = run_script(DURATIONS, "--durations", "made.json", "whole.xml", cwd=project.path)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == "made.json: 13 durations updated, 13 in all"
    assert json.loads((project.path / "made.json").read_text()).keys() == stored.keys()

    beta = run_script(DURATIONS, "--durations", "beta.json", "--only", "checks/test_beta.py", "whole.xml",
                      cwd=project.path)
    assert beta.returncode == 0, beta.stderr
    assert sorted(json.loads((project.path / "beta.json").read_text())) == sorted(
        k for k in stored if k.startswith("checks/test_beta.py"))
