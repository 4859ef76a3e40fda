"""``agentbox-krun-runtime`` (the real console script, in a subprocess) on hostile input, without
booting anything: a ``config.json`` that is not a regular file, wrongly typed or out-of-range
``process.user`` ids, and container state under a ``--root`` another user could write. Each
answer is one line on stderr with a non-zero exit, never a traceback or a hang, and a pid read
from untrusted state is never signalled."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentbox_runtime.microvm.reaper import start_time
from agentbox_runtime.oci.locate import runtime_path
from agentbox_runtime.oci.state import StateStore
from agentbox_runtime.oci.state_trust import UntrustedState

CLI_TIMEOUT_S = 120  # a bound on a hang, not a speed requirement


def runtime(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``agentbox-krun-runtime`` (pyproject's console script) with ``args``."""
    return subprocess.run([runtime_path(), *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (no traceback, nothing else)."""
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("agentbox-krun-runtime: ")
    return lines[0]


def krun_config(rootfs: Path, user: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    process: dict[str, Any] = {"args": ["/bin/true"], "cwd": "/", "user": user or {"uid": 0, "gid": 0}}
    return {"ociVersion": "1.0.2", "root": {"path": str(rootfs)}, "process": process,
            "annotations": {"run.oci.handler": "krun"}, **extra}


# -- finding 12: config.json ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "symlink", "device", "directory"])
def test_create_refuses_a_config_json_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    config = bundle / "config.json"
    if kind == "fifo":
        os.mkfifo(config)
        words = "it is a FIFO"
    elif kind == "symlink":  # out of the bundle, to a config that would otherwise load
        outside = tmp_path / "elsewhere.json"
        outside.write_text(json.dumps(krun_config(tmp_path / "no-rootfs")))
        config.symlink_to(outside)
        words = "it is a symlink"
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(config, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is
        words = "it is a character device"
    else:
        config.mkdir()
        words = "it is a directory"
    line = one_error_line(runtime("--root", str(tmp_path / "root"), "create", "--bundle", str(bundle), "c1"))
    assert f"refusing {config}: {words}; accepted: a regular file config.json of at most" in line
    assert not (tmp_path / "root" / "agentbox-krun" / "c1").exists()


def test_create_refuses_an_oversized_config_json(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with open(bundle / "config.json", "wb") as f:
        f.truncate((8 << 20) + 1)
    line = one_error_line(runtime("--root", str(tmp_path / "root"), "create", "--bundle", str(bundle), "c1"))
    assert "it is over 8388608 bytes" in line


@pytest.mark.parametrize(("field", "value"), [("uid", "abc"), ("gid", "abc"), ("uid", -1), ("gid", 1 << 32),
                                              ("uid", 4294967295), ("uid", 1.5), ("uid", True), ("gid", None)])
def test_create_refuses_a_non_numeric_or_out_of_range_user_id(tmp_path: Path, field: str, value: Any) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    user = {"uid": 1000, "gid": 1000, field: value}
    # the rootfs is missing on purpose: the id is refused before it is looked at
    (bundle / "config.json").write_text(json.dumps(krun_config(tmp_path / "no-rootfs", user)))
    line = one_error_line(runtime("--root", str(tmp_path / "root"), "create", "--bundle", str(bundle), "c1"))
    assert f"process.user.{field} " in line and "is not accepted; accepted: an integer from 0 to 4294967294" in line


@pytest.mark.parametrize(("extra", "words"), [
    ({"linux": 5}, "linux 5 is not accepted; accepted: a JSON object"),
    ({"mounts": "none"}, "mounts 'none' is not accepted; accepted: a JSON array"),
    ({"hostname": ["h"]}, "hostname ['h'] is not accepted; accepted: a JSON string"),
    ({"linux": {"namespaces": {"type": "network"}}}, "linux.namespaces"),
])
def test_create_refuses_a_wrongly_typed_field_with_one_line(tmp_path: Path, extra: dict[str, Any], words: str) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(krun_config(tmp_path / "no-rootfs", **extra)))
    line = one_error_line(runtime("--root", str(tmp_path / "root"), "create", "--bundle", str(bundle), "c1"))
    assert words in line


# -- finding 13: state under --root -----------------------------------------------------------------


@pytest.fixture()
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process of ours that a forged state names."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def write_state(root: Path, container_id: str, pid: int, pid_start: str | None) -> Path:
    """A state record as the runtime writes it, private at every level; returns state.json."""
    d = root / "agentbox-krun" / container_id
    d.mkdir(parents=True)
    for level in (root, root / "agentbox-krun", d):
        level.chmod(0o700)
    state = d / "state.json"
    state.write_text(json.dumps({"id": container_id, "pid": pid, "pid_start": pid_start, "bundle": "/b",
                                 "rootfs": "/b/rootfs", "annotations": {}, "created": ""}))
    state.chmod(0o600)
    return state


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another uid needs root")


UNTRUSTED = {
    "root-owned-by-another-uid": lambda root, state: (_needs_root(), os.chown(root, 12345, 12345)),
    "root-mode-0777": lambda root, state: root.chmod(0o777),
    "state-dir-mode-0755": lambda root, state: (root / "agentbox-krun").chmod(0o755),
    "container-dir-owned-by-another-uid": lambda root, state: (_needs_root(), os.chown(state.parent, 12345, 12345)),
    "state-json-owned-by-another-uid": lambda root, state: (_needs_root(), os.chown(state, 12345, 12345)),
    "state-json-group-writable": lambda root, state: state.chmod(0o620),
}


@pytest.mark.parametrize("command", [["kill", "c1", "KILL"], ["delete", "--force", "c1"]])
@pytest.mark.parametrize("how", sorted(UNTRUSTED))
def test_a_forged_state_under_an_untrusted_root_is_refused_and_nothing_is_signalled(
        tmp_path: Path, sleeper: subprocess.Popen[bytes], how: str, command: list[str]) -> None:
    root = tmp_path / "root"
    state = write_state(root, "c1", sleeper.pid, start_time(sleeper.pid))
    UNTRUSTED[how](root, state)
    line = one_error_line(runtime("--root", str(root), *command))
    assert "refusing the runtime state at " in line and "accepted: " in line
    assert sleeper.poll() is None, "the pid named by an untrusted state was signalled"
    assert state.exists(), "nothing is removed on an untrusted state's say-so"


@pytest.mark.parametrize("how", ["root-is-a-symlink", "state-json-is-a-symlink"])
def test_a_state_reached_through_a_symlink_is_refused(tmp_path: Path, sleeper: subprocess.Popen[bytes],
                                                     how: str) -> None:
    real = tmp_path / "real"
    state = write_state(real, "c1", sleeper.pid, start_time(sleeper.pid))
    root = tmp_path / "root"
    if how == "root-is-a-symlink":
        root.symlink_to(real)
    else:
        write_state(root, "c1", 0, None).unlink()
        (root / "agentbox-krun" / "c1" / "state.json").symlink_to(state)
    line = one_error_line(runtime("--root", str(root), "kill", "c1", "KILL"))
    assert "it is a symlink" in line
    assert sleeper.poll() is None


def test_a_trusted_state_signals_only_the_process_create_started(tmp_path: Path,
                                                                 sleeper: subprocess.Popen[bytes]) -> None:
    """The control: in a private root the recorded process is signalled; a record whose start
    time is not the live process's (the pid was reused) is not running, and nothing is signalled."""
    root = tmp_path / "root"
    state = write_state(root, "c1", sleeper.pid, "1")  # not the sleeper's start time
    line = one_error_line(runtime("--root", str(root), "kill", "c1", "KILL"))
    assert line == "agentbox-krun-runtime: container c1 is not running"
    assert sleeper.poll() is None
    record = json.loads(state.read_text())
    record["pid_start"] = start_time(sleeper.pid)
    state.write_text(json.dumps(record))
    proc = runtime("--root", str(root), "kill", "c1", "KILL")
    assert proc.returncode == 0, proc.stderr
    assert sleeper.wait(timeout=CLI_TIMEOUT_S) == -9


def test_create_refuses_an_untrusted_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(UntrustedState, match=r"its mode is 0777; accepted: a real directory owned by uid"):
        StateStore(root).create("c1", tmp_path, tmp_path, {})
    assert not (root / "agentbox-krun").exists()
    fresh = tmp_path / "fresh" / "root"
    StateStore(fresh).create("c2", tmp_path, tmp_path, {})
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE((fresh / "agentbox-krun" / "c2" / "state.json").stat().st_mode) == 0o600
    assert StateStore(fresh).get("c2") is not None
