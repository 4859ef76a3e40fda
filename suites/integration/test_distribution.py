"""The built distribution: its import packages are ``agentbox_harness``, ``agentbox_runtime`` and
``agentbox_guest_init`` only, so installing it next to another project's ``runtime`` or
``guest_init`` package shadows nothing, and its console scripts and pytest plugin load."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"agentbox_harness", "agentbox_runtime", "agentbox_guest_init"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from the tracked sources (a copy: the build writes nothing into the repo)."""
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):  # the working tree's version of every tracked file
        if name and (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                           capture_output=True, text=True, timeout=600)
    if built.returncode != 0 and "Could not find a version that satisfies" in built.stderr:
        pytest.skip(f"the build backend cannot be fetched from PyPI: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    (whl,) = out.glob("agentbox_harness-*.whl")
    return whl


def test_the_wheel_has_only_uniquely_named_import_packages(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith((".dist-info", ".data"))}
        entry_points = next(z.read(n).decode() for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert tops == PACKAGES
    assert "agentbox = agentbox_runtime.cli:main" in entry_points
    assert "agentbox = agentbox_harness.plugin" in entry_points  # the pytest11 entry point


def test_the_installed_distribution_imports_beside_unrelated_runtime_and_guest_init_packages(
        wheel: Path, tmp_path: Path) -> None:
    target, other = tmp_path / "site", tmp_path / "other"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    for name in ("runtime", "guest_init"):  # another project's packages, first on the path
        (other / name).mkdir(parents=True)
        (other / name / "__init__.py").write_text(f"OWNER = 'another project ({name})'\n")
    probe = """
import runtime, guest_init
import agentbox_runtime.cli, agentbox_runtime.vmm.qemu, agentbox_guest_init.cli, agentbox_guest_init.agent
import agentbox_harness.plugin
print(runtime.OWNER, guest_init.OWNER, sep='|')
print(agentbox_runtime.__file__, agentbox_guest_init.__file__, agentbox_harness.__file__, sep='|')
"""
    env = {"PYTHONPATH": f"{other}:{target}", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    owners, files = run.stdout.splitlines()
    assert owners == "another project (runtime)|another project (guest_init)"
    assert all(f.startswith(str(target)) for f in files.split("|")), files
    cli = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "--version"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and cli.stdout.strip(), cli.stderr
