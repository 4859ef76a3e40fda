"""Security regressions of the evidence-bundle surface (issue 23, findings 2, 9, 10, 11), each running
its reproduction on real files, links, FIFOs and devices:

2. writing a bundle never follows a link another user planted, nor writes into their directory
   (also the other output dirs a user names: artifacts, the Allure dir);
9. ``agentbox evidence verify`` refuses index names that leave the bundle;
10. it refuses a FIFO, device or symlinked ``index.json`` (and listed file) without opening or
    reading it unbounded;
11. it prints every name escaped, so a planted name cannot forge an ``ok`` line.

A "reproduction" of another local user runs as root: the planted entry is chowned to another uid.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agentbox_harness import artifacts, evidence_bundle
from agentbox_runtime.evidence import INDEX, Redactor, root_digest, write_bundle
from agentbox_runtime.private_dir import UnsafeDirectory

REPO = Path(__file__).resolve().parents[2]
OTHER_UID = 4242
NODEID = "suites/x/test_a.py::test_b"
NODE = "suites_x_test_a.py_test_b"
PRECIOUS = b"root's own file, not evidence\n"
CLI_TIMEOUT_S = 30
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (chown, mknod)")


def cli(bundle: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``agentbox evidence verify BUNDLE`` in a subprocess: bounded in time (a hang fails instead of
    hanging the suite) and in memory (an unbounded read fails instead of exhausting the host)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "evidence", "verify", bundle], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, preexec_fn=limit)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_index(bundle: Path, files: dict[str, str]) -> str:
    """A self-consistent index (what a forger writes): its root adds up."""
    root = root_digest(files)
    (bundle / INDEX).unlink(missing_ok=True)
    (bundle / INDEX).write_text(json.dumps({"format": 1, "files": files, "root_sha256": root}))
    return root


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    write_bundle(tmp_path / "b", {"log": b"booted\n", "sub/launch.conf": b"x=1\n"}, Redactor())
    return tmp_path / "b"


# -- finding 2: writes follow no link ---------------------------------------------------------------

def _harness_run(tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    """A pytest config and reports as the plugin passes them, with one artifact file to bundle."""
    config = SimpleNamespace(rootpath=tmp_path / "project")
    source = tmp_path / "project" / "results" / "artifacts" / NODE
    source.mkdir(parents=True)
    (source / "vm-console.log").write_bytes(b"booted\n")
    reports = {"call": SimpleNamespace(outcome="passed", duration=0.5)}
    return config, reports


def _victim(tmp_path: Path) -> Path:
    """A root-owned directory with a root-owned index.json: what the planted link names."""
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / INDEX).write_bytes(PRECIOUS)
    return victim


def _shared_evidence_dir(tmp_path: Path) -> Path:
    """``--agentbox-evidence DIR`` in a directory other users can write (ours, mode 1777)."""
    base = tmp_path / "evidence"
    base.mkdir()
    os.chmod(base, 0o1777)
    return base


@needs_root
def test_finding2_a_link_another_user_planted_at_the_bundle_dir_is_refused(tmp_path: Path) -> None:
    config, reports = _harness_run(tmp_path)
    base, victim = _shared_evidence_dir(tmp_path), _victim(tmp_path)
    link = base / NODE
    link.symlink_to(victim)
    os.lchown(link, OTHER_UID, OTHER_UID)  # the other user's link
    with pytest.raises(UnsafeDirectory, match=r"it is a symlink \(accepted: a real directory owned by uid 0"):
        evidence_bundle.write(config, NODEID, reports, base, Redactor())
    assert (victim / INDEX).read_bytes() == PRECIOUS and os.listdir(victim) == [INDEX]
    assert link.is_symlink(), "the refused link is left for the user to inspect"


@needs_root
def test_finding2_a_directory_another_user_planted_at_the_bundle_dir_is_refused(tmp_path: Path) -> None:
    config, reports = _harness_run(tmp_path)
    base, victim = _shared_evidence_dir(tmp_path), _victim(tmp_path)
    planted = base / NODE
    planted.mkdir()
    (planted / INDEX).symlink_to(victim / INDEX)
    os.chown(planted, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafeDirectory, match=f"it is owned by uid {OTHER_UID}"):
        evidence_bundle.write(config, NODEID, reports, base, Redactor())
    assert (victim / INDEX).read_bytes() == PRECIOUS
    assert (planted / INDEX).is_symlink(), "another user's directory is not emptied either"


def test_finding2_the_evidence_dir_itself_as_a_link_is_refused(tmp_path: Path) -> None:
    config, reports = _harness_run(tmp_path)
    victim = _victim(tmp_path)
    (tmp_path / "evidence").symlink_to(victim)
    with pytest.raises(UnsafeDirectory, match="it is a symlink"):
        evidence_bundle.write(config, NODEID, reports, tmp_path / "evidence", Redactor())
    with pytest.raises(UnsafeDirectory, match="it is a symlink"):
        write_bundle(tmp_path / "evidence", {"log": b"x"}, Redactor())
    assert os.listdir(victim) == [INDEX] and (victim / INDEX).read_bytes() == PRECIOUS


def test_finding2_a_previous_bundle_of_ours_is_replaced_without_following_its_links(tmp_path: Path) -> None:
    config, reports = _harness_run(tmp_path)
    victim = _victim(tmp_path)
    base = tmp_path / "evidence"
    first = evidence_bundle.write(config, NODEID, reports, base, Redactor())
    assert first is not None and first[0] == base / NODE
    (base / NODE / "stale.txt").write_text("earlier run")
    (base / NODE / "into-victim").symlink_to(victim)
    (base / NODE / "vm-console.log").unlink()
    (base / NODE / "vm-console.log").symlink_to(victim / INDEX)  # a rewrite through it would hit root's file
    second = evidence_bundle.write(config, NODEID, reports, base, Redactor())
    assert second is not None and second[1] == first[1]
    assert sorted(os.listdir(base / NODE)) == [INDEX, "test.json", "vm-console.log"]
    assert not (base / NODE / "vm-console.log").is_symlink()
    assert os.listdir(victim) == [INDEX] and (victim / INDEX).read_bytes() == PRECIOUS
    assert stat.S_IMODE((base / NODE / INDEX).stat().st_mode) == 0o600
    assert stat.S_IMODE((base / NODE).stat().st_mode) == 0o700


@needs_root
def test_finding2_artifact_dirs_refuse_a_planted_link_and_remove_only_the_link(tmp_path: Path) -> None:
    config, reports = _harness_run(tmp_path)
    victim = _victim(tmp_path)
    root = tmp_path / "project" / "results" / "artifacts"
    other = "suites/x/test_a.py::test_c"
    link = root / artifacts.node_name(other)
    link.symlink_to(victim)
    os.lchown(link, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafeDirectory, match="it is a symlink"):
        artifacts.node_dir(config, other)
    failing = {"call": SimpleNamespace(outcome="failed", duration=0.1, failed=True)}
    with pytest.raises(UnsafeDirectory, match="it is a symlink"):  # outcome.json is not written through it
        artifacts.finalize(config, other, failing, preserve=False, doctor=None)
    passing = {"call": SimpleNamespace(outcome="passed", duration=0.1, failed=False)}
    assert artifacts.finalize(config, other, passing, preserve=False, doctor=None) is None
    assert not os.path.lexists(link), "a passing test's planted link is removed, as a link"
    assert os.listdir(victim) == [INDEX] and (victim / INDEX).read_bytes() == PRECIOUS
    kept = artifacts.finalize(config, NODEID, failing, preserve=False, doctor=[{"name": "qemu"}])
    assert kept is not None and json.loads((kept / "outcome.json").read_text())["failed"] is True


def test_finding2_the_allure_dir_as_a_link_is_refused(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    (tmp_path / "allure").symlink_to(victim)
    with pytest.raises(UnsafeDirectory, match="it is a symlink"):
        artifacts.write_allure_environment(str(tmp_path / "allure"), {"k": "v"})
    assert os.listdir(victim) == [INDEX]
    written = artifacts.write_allure_environment(str(tmp_path / "real"), {"k": "v"})
    assert written is not None and written.read_text() == "k=v\n"
    assert artifacts.write_allure_environment(str(tmp_path / "real"), {"k": "w"}) == written
    assert written.read_text() == "k=v\n", "once per run"


# -- finding 9: verify refuses names that leave the bundle ------------------------------------------

def test_finding9_index_names_leaving_the_bundle_are_refused(bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not evidence\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f").write_bytes(b"also not evidence\n")
    (bundle / "linked").symlink_to(tmp_path / "elsewhere")
    files = json.loads((bundle / INDEX).read_text())["files"]
    files.update({"../outside.txt": sha(outside.read_bytes()), str(outside): sha(outside.read_bytes()),
                  "linked/f": sha(b"also not evidence\n")})
    write_index(bundle, files)
    out = cli(str(bundle), tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    accepted = ("not a name inside the bundle; accepted: a relative path without '..', '.', empty parts or a "
                "leading '/', other than index.json")
    assert out.stdout.splitlines() == [
        f"evidence bundle {bundle}: refused: ../outside.txt: {accepted}",
        f"evidence bundle {bundle}: refused: {outside}: {accepted}",
        f"evidence bundle {bundle}: refused: linked/f: linked is a symlink; accepted: a directory inside the bundle",
        f"evidence bundle {bundle}: not in the index: linked",
    ]


# -- finding 10: no FIFO, device or unbounded read ----------------------------------------------------

def test_finding10_a_fifo_index_is_refused_without_hanging(bundle: Path, tmp_path: Path) -> None:
    (bundle / INDEX).unlink()
    os.mkfifo(bundle / INDEX)
    out = cli(str(bundle), tmp_path)  # today's main blocks here until the timeout fails the test
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [f"agentbox: {bundle}: index.json: it is a FIFO; accepted: a regular file "
                                       "inside the bundle"]


def test_finding10_an_index_linked_to_dev_zero_is_refused_without_reading(bundle: Path, tmp_path: Path) -> None:
    (bundle / INDEX).unlink()
    (bundle / INDEX).symlink_to("/dev/zero")
    out = cli(str(bundle), tmp_path)  # today's main reads /dev/zero until its 2 GiB limit
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"agentbox: {bundle}: index.json: it is a symlink; accepted: a regular "
                                       "file inside the bundle"]


@needs_root
def test_finding10_device_nodes_are_refused_by_name_never_opened(bundle: Path, tmp_path: Path) -> None:
    os.unlink(bundle / "log")
    os.mknod(bundle / "log", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
    os.unlink(bundle / "sub" / "launch.conf")
    os.mkfifo(bundle / "sub" / "launch.conf")
    out = cli(str(bundle), tmp_path)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        f"evidence bundle {bundle}: refused: log: it is a character device; accepted: a regular file inside the bundle",
        f"evidence bundle {bundle}: refused: sub/launch.conf: it is a FIFO; accepted: a regular file inside the bundle",
    ]
    os.unlink(bundle / INDEX)
    os.mknod(bundle / INDEX, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    out = cli(str(bundle), tmp_path)
    assert out.returncode == 2 and "index.json: it is a character device; accepted: a regular file" in out.stderr


def test_finding10_an_oversized_index_or_file_is_refused_by_its_size(bundle: Path, tmp_path: Path) -> None:
    big = bundle / "log"
    os.truncate(big, (256 << 20) + 1)  # sparse: nothing is really written
    out = cli(str(bundle), tmp_path)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [f"evidence bundle {bundle}: refused: log: it is larger than 268435456 bytes; "
                                       "accepted: up to 268435456 bytes"]
    os.truncate(bundle / INDEX, (16 << 20) + 1)
    out = cli(str(bundle), tmp_path)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"agentbox: {bundle}: index.json: it is larger than 16777216 bytes; "
                                       "accepted: up to 16777216 bytes"]


# -- finding 11: names are printed escaped ------------------------------------------------------------

def test_finding11_a_planted_name_cannot_forge_an_ok_line(bundle: Path, tmp_path: Path) -> None:
    index = json.loads((bundle / INDEX).read_text())
    forged = f"evidence bundle b: ok, 2 files, root sha256 {index['root_sha256']}"
    (bundle / f"x\n{forged}").write_text("planted")  # a file name (no '/': the bundle is named relatively)
    listed = f"y\r{forged}\x1b[2K"
    write_index(bundle, {**index["files"], listed: sha(b"")})  # an index name, missing from the bundle
    out = cli("b", tmp_path)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        f"evidence bundle b: missing: y\\r{forged}\\x1b[2K",
        f"evidence bundle b: not in the index: x\\n{forged}",
    ]
    assert not any(line.startswith("evidence bundle b: ok") for line in out.stdout.splitlines())


def test_finding11_backslashes_and_undecodable_bytes_are_escaped_too(bundle: Path, tmp_path: Path) -> None:
    (bundle / "a\\nb").write_text("planted")
    with open(os.open(os.fsencode(bundle) + b"/c\xff", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write("planted")
    out = cli("b", tmp_path)
    assert out.returncode == 1
    assert out.stdout.splitlines() == ["evidence bundle b: not in the index: a\\\\nb",
                                       "evidence bundle b: not in the index: c\\xff"]
