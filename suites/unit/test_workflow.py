"""The sharded nightly workflow (.github/workflows/nightly-vm.yml) and its durations file.

- The workflow passes the GitHub workflow JSON schema (check-jsonschema's vendored copy,
  offline), and a broken copy does not.
- Its shape: a matrix of every backend x N pytest-split groups on self-hosted KVM
  runners, ``fail-fast: false``, each shard uploading its results under a name the
  merge job downloads; the merge job runs after every shard, whatever happened, and
  merges them with scripts/merge_reports.py.
- A shard's command line, as ``./harness smoke`` hands it to pytest, parses with the
  real plugins (agentbox, pytest-split, allure) and carries the intended values.
  Nothing runs: a plugin stops pytest as soon as the options are parsed.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from agentbox_harness.registry import BUILTIN_BACKENDS

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "nightly-vm.yml"
REFRESH = "python3 scripts/durations_from_junit.py --only smoke/ JUNIT.xml"

# Parses a pytest command line with every installed plugin, prints the options that
# matter here as JSON and exits before the session starts (no collection, no reaper).
PARSE_ONLY = """
import json, sys

import pytest

class ParseOnly:
    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config):
        o = config.option
        print(json.dumps({"args": config.args, "backend": o.agentbox_backend, "strict": o.agentbox_strict,
                          "splits": o.splits, "group": o.group, "algorithm": o.splitting_algorithm,
                          "durations": o.durations_path, "junit": o.xmlpath, "allure": o.allure_report_dir}))
        pytest.exit("options parsed", returncode=0)

sys.exit(pytest.main(sys.argv[1:], plugins=[ParseOnly()]))
"""


def workflow() -> dict[str, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(data, dict)
    return data


def step(job: dict[str, Any], *, uses: str | None = None, runs: str | None = None) -> list[dict[str, Any]]:
    """The job's steps using an action (prefix match) or whose script contains ``runs``."""
    return [s for s in job["steps"]
            if (uses is not None and str(s.get("uses", "")).startswith(uses))
            or (runs is not None and runs in str(s.get("run", "")))]


def render(text: str, cell: dict[str, Any]) -> str:
    """``${{ matrix.KEY }}`` replaced by the cell's values (the only expressions the names use)."""
    return re.sub(r"\$\{\{\s*matrix\.([\w-]+)\s*\}\}", lambda m: str(cell[m[1]]), text)


def cells(job: dict[str, Any]) -> list[dict[str, Any]]:
    matrix = job["strategy"]["matrix"]
    keys = [k for k in matrix if k not in ("include", "exclude")]
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(matrix[k] for k in keys))]


def check_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           str(path)], capture_output=True, text=True, timeout=120, check=False)


def test_the_workflow_passes_the_github_workflow_schema(tmp_path: Path) -> None:
    proc = check_schema(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("    runs-on: ubuntu-latest\n", ""))
    proc = check_schema(broken)
    assert proc.returncode == 1 and "'runs-on' is a required property" in proc.stdout, proc.stdout + proc.stderr


def test_shards_cover_every_backend_times_every_split_on_kvm_runners() -> None:
    smoke = workflow()["jobs"]["smoke"]
    matrix = smoke["strategy"]["matrix"]
    assert smoke["strategy"]["fail-fast"] is False
    assert sorted(matrix["backend"]) == sorted(BUILTIN_BACKENDS)
    assert len(matrix["splits"]) == 1 and matrix["splits"][0] >= 2
    assert matrix["group"] == list(range(1, matrix["splits"][0] + 1)), "groups are 1..splits"
    assert {"self-hosted", "kvm"} <= set(smoke["runs-on"])


def test_a_shard_runs_harness_smoke_with_its_split_and_backend_as_pytest_parses_it() -> None:
    smoke = workflow()["jobs"]["smoke"]
    [shard_step] = step(smoke, runs="./harness smoke")
    argv = shlex.split(shard_step["run"].replace("\\\n", " "))
    assert argv[:2] == ["./harness", "smoke"]
    cell = cells(smoke)[-1]
    env = {k: render(str(v), cell) for k, v in smoke["env"].items()}
    shard_args = [re.sub(r"\$(\w+)", lambda m: env[m[1]], a) for a in argv[2:]]

    harness = (REPO / "harness").read_text()
    [line] = [ln for ln in harness.splitlines() if re.search(r"exec .* -m pytest smoke/ .*\"\$@\"", ln)]
    base = shlex.split(line.split("-m pytest", 1)[1].replace('"$@"', "ARGS"))
    full = [a for b in base for a in (shard_args if b == "ARGS" else [b])]

    proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, "-p", "no:cacheprovider", *full], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    parsed = json.loads(proc.stdout.splitlines()[0])
    assert parsed["args"] == ["smoke/"]
    assert (parsed["backend"], parsed["strict"]) == (cell["backend"], True)
    assert (parsed["splits"], parsed["group"], parsed["algorithm"]) == (cell["splits"], cell["group"], "least_duration")
    assert (REPO / parsed["durations"]).resolve() == (REPO / ".test_durations").resolve()
    # merge_reports.py reads SHARD/*.xml and SHARD/allure/, and the step uploads SHARD = results/shard/
    [upload] = [s for s in step(smoke, uses="actions/upload-artifact@") if s["with"]["name"] == "${{ env.SHARD }}"]
    shard_dir = Path(upload["with"]["path"])
    assert Path(parsed["junit"]).parent == shard_dir and Path(parsed["junit"]).suffix == ".xml"
    assert Path(parsed["allure"]) == shard_dir / "allure"
    assert not (REPO / shard_dir).exists(), "parsing wrote nothing"


def test_every_shard_uploads_under_its_own_name_which_the_merge_downloads() -> None:
    jobs = workflow()["jobs"]
    smoke, merge = jobs["smoke"], jobs["merge"]
    uploads = step(smoke, uses="actions/upload-artifact@")
    assert uploads and all(s.get("if") == "always()" for s in uploads), "results are uploaded after a failure too"
    [download] = step(merge, uses="actions/download-artifact@")
    pattern = download["with"]["pattern"]
    results_names = [render(smoke["env"]["SHARD"], c) for c in cells(smoke)]
    assert len(set(results_names)) == len(cells(smoke))
    assert all(fnmatch.fnmatchcase(n, pattern) for n in results_names)
    other = [s["with"]["name"] for s in uploads if s["with"]["name"] != "${{ env.SHARD }}"]
    assert other and not any(fnmatch.fnmatchcase(n.replace("${{ env.SHARD }}", results_names[0]), pattern) for n in other)


def test_the_merge_job_runs_after_every_shard_and_merges_all_of_them() -> None:
    jobs = workflow()["jobs"]
    merge = jobs["merge"]
    needs = merge["needs"] if isinstance(merge["needs"], list) else [merge["needs"]]
    assert needs == ["smoke"] and "always()" in merge["if"]
    [merging] = step(merge, runs="scripts/merge_reports.py")
    [command] = [ln for ln in merging["run"].replace("\\\n", " ").splitlines() if "scripts/merge_reports.py" in ln]
    argv = shlex.split(command)
    assert argv[:2] == ["python3", "scripts/merge_reports.py"]
    opts = {argv[i]: argv[i + 1] for i in range(2, len(argv) - 1) if argv[i].startswith("--")}
    shard_dirs = [a for i, a in enumerate(argv[2:], 2) if not a.startswith("--") and not argv[i - 1].startswith("--")]
    assert int(opts["--expect"]) == len(cells(jobs["smoke"]))
    assert {"--junit-out", "--allure-out", "--summary"} <= opts.keys()
    [download] = step(merge, uses="actions/download-artifact@")
    assert shard_dirs == [f"{download['with']['path']}/*/"], "every downloaded shard is merged"
    assert '>> "$GITHUB_STEP_SUMMARY"' in merging["run"]
    [upload] = step(merge, uses="actions/upload-artifact@")
    assert upload.get("if") == "always()" and upload["with"]["path"].rstrip("/") == str(Path(opts["--junit-out"]).parent)


def test_expressions_and_shell_variables_name_defined_keys() -> None:
    smoke = workflow()["jobs"]["smoke"]
    text = json.dumps(smoke)
    assert set(re.findall(r"matrix\.([\w-]+)", text)) <= set(smoke["strategy"]["matrix"])
    assert set(re.findall(r"env\.(\w+)", text)) <= set(smoke["env"])
    for s in smoke["steps"]:
        for var in re.findall(r"\$\{?([A-Z_]+)", str(s.get("run", ""))):
            assert var in smoke["env"], f"{var} is used in a run step but not set in the job env"


def test_the_durations_file_holds_smoke_node_ids_and_seconds() -> None:
    durations = json.loads((REPO / ".test_durations").read_text())
    assert isinstance(durations, dict) and durations
    for nodeid, seconds in durations.items():
        module = nodeid.split("::", 1)[0]
        assert nodeid.startswith("smoke/"), f"{nodeid}: only smoke/ belongs here; refresh with {REFRESH}"
        assert (REPO / module).is_file(), f"{nodeid}: {module} is gone; refresh with {REFRESH}"
        assert isinstance(seconds, (int, float)) and seconds >= 0


def test_the_workflow_runs_nightly_and_on_demand() -> None:
    data = workflow()
    triggers = data.get("on", data.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"schedule", "workflow_dispatch"} <= set(triggers)
