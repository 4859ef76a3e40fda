"""Evidence bundles (agentbox_runtime.evidence): written redacted, verified, and every kind of
tampering reported by file name, through the library and through `agentbox evidence verify`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agentbox_runtime.errors import InputError
from agentbox_runtime.evidence import INDEX, REDACTED, Redactor, root_digest, write_bundle
from agentbox_runtime.evidence_verify import verify

REPO = Path(__file__).resolve().parents[2]
FILES = {"vm-transcript.json": b'[{"argv": ["echo", "hi"]}]\n', "vm-console.log": b"booted\n\xff\xfebinary\n",
         "sub/launch.conf": b"task_rootfs=2f74\n"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "evidence", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    write_bundle(tmp_path / "b", FILES, Redactor())
    return tmp_path / "b"


def test_a_fresh_bundle_verifies_and_its_index_pins_every_file(bundle: Path) -> None:
    root, problems = verify(bundle)
    index = json.loads((bundle / INDEX).read_text())
    assert problems == [] and set(index["files"]) == set(FILES) and root == root_digest(index["files"])
    assert (bundle / "vm-console.log").read_bytes() == FILES["vm-console.log"]  # binary content survives
    ok = cli("verify", str(bundle))
    assert ok.returncode == 0 and ok.stdout.strip() == f"evidence bundle {bundle}: ok, 3 files, root sha256 {root}"


def _swap_for_symlink(bundle: Path) -> None:
    (bundle / "vm-transcript.json").unlink()
    (bundle / "vm-transcript.json").symlink_to("/etc/hostname")


@pytest.mark.parametrize("tamper, problem", [
    (lambda b: (b / "vm-console.log").write_bytes(b"booted\nedited\n"), "changed: vm-console.log"),
    (lambda b: (b / "sub/launch.conf").unlink(), "missing: sub/launch.conf"),
    (lambda b: (b / "sub/extra.txt").write_text("planted"), "not in the index: sub/extra.txt"),
    (_swap_for_symlink, "refused: vm-transcript.json: it is a symlink; accepted: a regular file inside the bundle"),
])
def test_tampering_with_any_file_is_reported_by_name(bundle: Path, tamper, problem: str) -> None:  # type: ignore[no-untyped-def]
    tamper(bundle)
    _, problems = verify(bundle)
    assert problems == [problem]
    out = cli("verify", str(bundle))
    assert out.returncode == 1 and out.stdout.strip() == f"evidence bundle {bundle}: {problem}"


def test_a_rewritten_index_that_no_longer_adds_up_is_reported(bundle: Path) -> None:
    index = json.loads((bundle / INDEX).read_text())
    (bundle / "vm-console.log").write_bytes(b"forged\n")
    index["files"]["vm-console.log"] = "0" * 64  # hides nothing: the file no longer matches either
    (bundle / INDEX).write_text(json.dumps(index))
    _, problems = verify(bundle)
    assert problems == ["changed: vm-console.log",
                        "changed: index.json (its file list does not add up to its root_sha256)"]


def test_what_is_not_a_bundle_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / INDEX).write_text("{not json")
    for target, text in ((tmp_path / "nope", "is not a directory"), (tmp_path / "plain", "has no index.json"),
                         (tmp_path / "bad", "is not a format-1 evidence index")):
        with pytest.raises(InputError, match=text):
            verify(target)
        out = cli("verify", str(target))
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and text in out.stderr


def test_secrets_are_redacted_before_anything_is_written(tmp_path: Path) -> None:
    redactor = Redactor()
    redactor.register_env({"GITHUB_TOKEN": "ghp_abcdef123456", "DB_PASSWORD": "hunter2-long", "HOME": "/root",
                           "API_KEY": "abc"})  # too short to redact as text
    redactor.register("registered-value-42")
    with pytest.raises(InputError, match="at least 4 characters"):
        redactor.register("xy")
    text = b"token ghp_abcdef123456 and hunter2-long and registered-value-42 in /root\n"
    write_bundle(tmp_path / "b", {"log": text}, redactor)
    written = (tmp_path / "b" / "log").read_text()
    assert written == f"token {REDACTED} and {REDACTED} and {REDACTED} in /root\n"
    assert redactor.env({"MY_SECRET": "x", "PATH": "/bin:registered-value-42"}) == {
        "MY_SECRET": REDACTED, "PATH": f"/bin:{REDACTED}"}
    assert verify(tmp_path / "b")[1] == []


@pytest.mark.parametrize("name", ["../escape", "/abs", INDEX, "a/../b", "./x", "a//b", ""])
def test_bundle_file_names_stay_inside(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match="not accepted"):
        write_bundle(tmp_path / "b", {"fine": b"y", name: b"x"}, Redactor())
    assert not (tmp_path / "b").exists(), "a refused name is refused before anything is written"
