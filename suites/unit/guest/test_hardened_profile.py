"""The guest shell's hardened profile: the read-only root's mount steps (recorded), and the
process confinement for real, in a child process that drops to nobody: no capability can come
back, no setuid binary raises it, and namespaces and mounts are refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbox_guest_init import hardened_profile

REPO = Path(__file__).resolve().parents[3]
NOBODY = 65534


def test_the_read_only_root_keeps_tmp_home_and_dmesg_right(tmp_path: Path, recorder) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "home" / "dev").mkdir(parents=True)
    (tmp_path / "proc" / "sys" / "kernel").mkdir(parents=True)
    rec = recorder()
    hardened_profile.read_only_root(rec, tmp_path)
    assert rec.tools() == [f"mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {tmp_path}/tmp",
                           f"mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {tmp_path}/var/tmp",
                           *scratch_tools(tmp_path),
                           f"mount --bind {tmp_path}/home/dev {tmp_path}/home/dev",
                           f"mount -o remount,bind,ro {tmp_path}"]
    assert (tmp_path / "proc/sys/kernel/dmesg_restrict").read_text() == "1\n"


def scratch_tools(root: Path, run: str = "var/run") -> list[str]:
    return [f"mount -t tmpfs -o size=67108864,mode=0755,nosuid,nodev,noexec tmpfs {root}/{run}",
            f"mount -t tmpfs -o size=67108864,mode=0755,nosuid,nodev,noexec tmpfs {root}/var/log",
            f"mount -t tmpfs -o size=16777216,mode=0755,nosuid,nodev,noexec tmpfs {root}/var/log/supervisor"]


def test_var_run_as_a_symlink_limits_run(tmp_path: Path, recorder) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "run").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "var/run").symlink_to("/run")
    rec = recorder()
    hardened_profile.scratch_mounts(rec, tmp_path)
    assert rec.tools() == scratch_tools(tmp_path, "run")


def test_the_writable_root_exception_keeps_the_root_writable_and_the_tmpfs(tmp_path: Path, recorder) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "home" / "dev").mkdir(parents=True)
    (tmp_path / "proc" / "sys" / "kernel").mkdir(parents=True)
    rec = recorder()
    hardened_profile.read_only_root(rec, tmp_path, frozenset({"writable-root"}))
    assert rec.tools() == [f"mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {tmp_path}/tmp",
                           f"mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {tmp_path}/var/tmp",
                           *scratch_tools(tmp_path)]
    assert (tmp_path / "proc/sys/kernel/dmesg_restrict").read_text() == "1\n"


def test_exceptions_are_read_from_the_env_and_unknown_names_refused() -> None:
    env = {hardened_profile.ENV_EXCEPTIONS: " writable-root, "}
    assert hardened_profile.exceptions(env) == frozenset({"writable-root"})
    assert hardened_profile.exceptions({}) == frozenset()
    with pytest.raises(Exception, match="^AGENTBOX_HARDENED_EXCEPTIONS: unknown exception ptrace; "
                                        "accepted: writable-root$"):
        hardened_profile.exceptions({hardened_profile.ENV_EXCEPTIONS: "writable-root,ptrace"})


def test_a_failed_step_is_named(tmp_path: Path, recorder) -> None:  # type: ignore[no-untyped-def]
    rec = recorder({("mount", "-o"): (32, "", "mount: permission denied")})
    with pytest.raises(Exception, match="hardened profile: read-only root"):
        hardened_profile.read_only_root(rec, tmp_path)


CHILD = """
import os, subprocess, sys
from agentbox_guest_init import hardened_profile
confine = sys.argv[2] == "1"
if confine:
    hardened_profile.drop_bounding_set()
os.setgroups([]); os.setgid(65534); os.setuid(65534)
if confine:
    hardened_profile.confine()
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print("nnp", status["NoNewPrivs"].strip())
print("capbnd", status["CapBnd"].strip())
print("suid", subprocess.run([sys.argv[1], "-u"], capture_output=True, text=True).stdout.strip())
r = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True)
print("unshare", r.returncode, r.stderr.strip()[-80:])
"""


@pytest.fixture()
def suid_dir() -> Iterator[Path]:
    """A directory nobody can reach, on a mount that honours setuid (pytest's tmp dir is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="agentbox-suid-", dir="/var/tmp"))
    try:
        probe = subprocess.run(["findmnt", "-no", "OPTIONS", "--target", str(path)], capture_output=True, text=True)
        if "nosuid" in probe.stdout:
            pytest.skip(f"{path} is on a nosuid mount: no setuid binary can run there")
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to nobody and makes a setuid-root binary: needs root")
@pytest.mark.parametrize("confined", [True, False])
def test_the_confinement_of_a_process_and_what_it_runs(suid_dir: Path, confined: bool) -> None:
    suid = suid_dir / "suid-id"
    shutil.copy("/usr/bin/id", suid)
    suid.chmod(0o4755)
    out = subprocess.run([sys.executable, "-c", CHILD, str(suid), "1" if confined else "0"], capture_output=True,
                         text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    seen = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    if confined:
        assert seen["nnp"] == "1" and int(seen["capbnd"], 16) == 0
        assert seen["suid"] == str(NOBODY), "no_new_privs: the setuid bit gives nothing"
        assert seen["unshare"].startswith("1 ") and "Operation not permitted" in seen["unshare"]
    else:  # the control: without the profile the same child gets root through the setuid bit
        assert seen["nnp"] == "0" and seen["suid"] == "0"
