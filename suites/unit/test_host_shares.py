"""Host shares against a hostile guest: the id-mapped export and the share filter, on the real kernel.

The filter is loaded into a child process that then tries what a guest would ask
its file server for; the export is checked by creating and handing over files
through it, as the VMM does."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbox_guest_init import contract
from agentbox_runtime.vmm import host_share, share_filter

ATTEMPTS = r"""
import errno, os, stat, sys
from agentbox_runtime.vmm import share_filter
share_filter.install()
d = sys.argv[1]
def attempt(name, fn):
    try:
        fn()
        print(name, "ok")
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])
open(f"{d}/plain", "w").close()
attempt("chmod-0755", lambda: os.chmod(f"{d}/plain", 0o755))
attempt("chmod-4755", lambda: os.chmod(f"{d}/plain", 0o4755))
attempt("chmod-2755", lambda: os.chmod(f"{d}/plain", 0o2755))
attempt("fchmod-6755", lambda: os.fchmod(os.open(f"{d}/plain", os.O_RDONLY), 0o6755))
attempt("fchmodat-4700", lambda: os.chmod("plain", 0o4700, dir_fd=os.open(d, os.O_RDONLY)))
attempt("create-4755", lambda: os.open(f"{d}/suid", os.O_CREAT | os.O_WRONLY, 0o4755))
attempt("create-0644", lambda: os.open(f"{d}/new", os.O_CREAT | os.O_WRONLY, 0o644))
attempt("read", lambda: os.open(f"{d}/plain", os.O_RDONLY))
attempt("mknod-char", lambda: os.mknod(f"{d}/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3)))
attempt("mknod-block", lambda: os.mknod(f"{d}/loop", 0o666 | stat.S_IFBLK, os.makedev(7, 0)))
attempt("mknod-setuid", lambda: os.mknod(f"{d}/sreg", 0o4755 | stat.S_IFREG))
attempt("mkfifo", lambda: os.mkfifo(f"{d}/fifo"))
attempt("setxattr-capability", lambda: os.setxattr(f"{d}/plain", "security.capability", bytes(20)))
attempt("setxattr-user", lambda: os.setxattr(f"{d}/plain", "user.x", b"1"))
"""

REPO = Path(__file__).resolve().parents[2]


def test_the_share_filter_refuses_setuid_setgid_devices_and_xattrs_and_allows_the_rest(tmp_path: Path) -> None:
    ok, why = share_filter.available()
    assert ok, why
    proc = subprocess.run([sys.executable, "-c", ATTEMPTS, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    seen = dict(line.split() for line in proc.stdout.splitlines())
    assert seen == {"chmod-0755": "ok", "chmod-4755": "EPERM", "chmod-2755": "EPERM", "fchmod-6755": "EPERM",
                    "fchmodat-4700": "EPERM", "create-4755": "EPERM", "create-0644": "ok", "read": "ok",
                    "mknod-char": "EPERM", "mknod-block": "EPERM", "mknod-setuid": "EPERM", "mkfifo": "ok",
                    "setxattr-capability": errno.errorcode[errno.EOPNOTSUPP],
                    "setxattr-user": errno.errorcode[errno.EOPNOTSUPP]}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["fifo", "new", "plain"]
    assert all(not (p.lstat().st_mode & 0o6000) for p in tmp_path.iterdir())


def test_the_filter_is_inherited_and_cannot_be_lifted(tmp_path: Path) -> None:
    """Loaded with no_new_privs: a program it executes (here chmod(1)) is filtered too."""
    (tmp_path / "f").write_text("x")
    code = ("import os, sys\nfrom agentbox_runtime.vmm import share_filter\nshare_filter.install()\n"
            "os.execvp('chmod', ['chmod', 'u+s', sys.argv[1]])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "not permitted" in proc.stderr
    assert not (tmp_path / "f").stat().st_mode & stat.S_ISUID
    assert "NoNewPrivs:\t1" in subprocess.run(
        [sys.executable, "-c", "from agentbox_runtime.vmm import share_filter; share_filter.install(); "
         "print(open('/proc/self/status').read())"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="id-mapped exports need root")


@needs_root
@pytest.mark.parametrize("owner", [(0, 0), (4242, 4343), (contract.DEV_UID, contract.DEV_GID)])
def test_the_export_shows_the_owner_as_dev_and_lands_dev_files_as_the_owner(tmp_path: Path,
                                                                          owner: tuple[int, int]) -> None:
    project = tmp_path / "project"
    project.mkdir(mode=0o755)
    (project / "existing").write_text("x")
    os.chown(project / "existing", *owner)
    os.chown(project, *owner)
    (project / "someone-else").write_text("y")
    os.chown(project / "someone-else", 5151, 5151)
    share = host_share.export(project)
    try:
        assert share.mapped, share.why
        seen = os.stat(share.path)
        assert (seen.st_uid, seen.st_gid) == (contract.DEV_UID, contract.DEV_GID)
        assert os.stat(f"{share.path}/existing").st_uid == contract.DEV_UID
        assert os.stat(f"{share.path}/someone-else").st_uid == host_share.OVERFLOW_ID
        # what the VMM does for a file the guest's dev user creates: create as root, hand it to dev
        created = f"{share.path}/by-dev"
        with open(created, "w") as f:
            f.write("z")
        os.chown(created, contract.DEV_UID, contract.DEV_GID)
        os.mkdir(f"{share.path}/dir-by-dev")
        os.chown(f"{share.path}/dir-by-dev", contract.DEV_UID, contract.DEV_GID)
        with open(f"{share.path}/by-guest-root", "w") as f:
            f.write("r")
    finally:
        share.close()
    for name in ("by-dev", "dir-by-dev"):
        st = (project / name).stat()
        assert (st.st_uid, st.st_gid) == owner, name
    root_lands_as = 0 if owner[0] != 0 else host_share.OVERFLOW_ID
    assert (project / "by-guest-root").stat().st_uid == root_lands_as


@needs_root
def test_the_export_is_nosuid_nodev_and_read_only_when_asked(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    share = host_share.export(project, read_only=True)
    try:
        with pytest.raises(OSError) as err:
            open(f"{share.path}/x", "w").close()
        assert err.value.errno == errno.EROFS
        options = os.statvfs(share.path).f_flag
        assert options & os.ST_NOSUID and options & os.ST_NODEV and options & os.ST_RDONLY
    finally:
        share.close()
    assert not (project / "x").exists()


@needs_root
def test_the_export_leaves_no_mount_behind(tmp_path: Path) -> None:
    share = host_share.export(tmp_path)
    share.close()
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
    assert share.pass_fds == ()


def test_without_root_or_idmap_support_the_directory_is_shared_as_it_is(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_share.os, "geteuid", lambda: 1000)
    share = host_share.export(tmp_path)
    assert (share.path, share.pass_fds, share.mapped) == (str(tmp_path), (), False)
    assert "not root" in share.why


def test_a_missing_or_non_directory_share_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for path, words in ((tmp_path / "nope", "No such file"), (tmp_path / "file", "not a directory")):
        with pytest.raises(host_share.AgentboxError, match=words):
            host_share.export(path)


def test_fd_paths_are_passed_on() -> None:
    assert host_share.fds_in(["/proc/self/fd/7", "/home/u/p", "/proc/self/fd/x", "/proc/self/fd/12"]) == (7, 12)


SUID_WRITE = r"""
import os, sys
from agentbox_runtime.vmm import share_filter
if sys.argv[2] == "filtered":
    share_filter.install()
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC)
os.write(fd, b"#!/bin/sh\necho guest\n")
os.close(fd)
"""


@needs_root
@pytest.mark.parametrize("mode", ["filtered", "unfiltered"])
def test_a_write_from_the_vmm_clears_setuid_on_an_existing_root_binary(tmp_path: Path, mode: str) -> None:
    """Finding 4 (security round 2): root keeps S_ISUID across a write through CAP_FSETID; the VMM
    gives that capability up, so a guest's rewrite of a setuid-root file loses the bit on the host.
    The unfiltered run shows what the filter stops."""
    target = tmp_path / "newgrp"
    target.write_bytes(b"\x7fELF original")
    os.chown(target, 0, 0)
    target.chmod(0o4755)
    proc = subprocess.run([sys.executable, "-c", SUID_WRITE, str(target), mode], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() == b"#!/bin/sh\necho guest\n"
    kept = bool(target.stat().st_mode & (stat.S_ISUID | stat.S_ISGID))
    assert kept is (mode == "unfiltered")


def test_the_vmm_has_no_cap_fsetid_in_any_set_and_cannot_regain_it() -> None:
    code = ("import os\nfrom agentbox_runtime.vmm import share_filter\nshare_filter.install()\n"
            "os.execvp('grep', ['grep', '^Cap', '/proc/self/status'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    sets = {key.rstrip(":"): int(value, 16) for key, value in (line.split() for line in proc.stdout.splitlines())}
    assert set(sets) >= {"CapInh", "CapPrm", "CapEff", "CapBnd"}
    for name in ("CapInh", "CapPrm", "CapEff"):
        assert not sets[name] & (1 << share_filter.CAP_FSETID), name
    if os.geteuid() == 0:
        assert not sets["CapBnd"] & (1 << share_filter.CAP_FSETID)
        assert sets["CapEff"] & (1 << 0)  # CAP_CHOWN stays: only CAP_FSETID is given up


RENAME_WHITEOUT = r"""
import ctypes, errno, os, sys
from agentbox_runtime.vmm import share_filter
if sys.argv[2] == "filtered":
    share_filter.install()
libc = ctypes.CDLL(None, use_errno=True)
d = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
rc = libc.renameat2(d, b"a", d, b"b", share_filter.RENAME_WHITEOUT)
print("ok" if rc == 0 else errno.errorcode[ctypes.get_errno()])
"""


@needs_root
@pytest.mark.parametrize("mode", ["filtered", "unfiltered"])
def test_rename_whiteout_cannot_create_a_character_device(tmp_path: Path, mode: str) -> None:
    """Finding 14: ``renameat2(RENAME_WHITEOUT)`` leaves a 0:0 character device at the old name;
    the filter refuses it (the unfiltered run shows it would)."""
    (tmp_path / "a").write_text("x")
    proc = subprocess.run([sys.executable, "-c", RENAME_WHITEOUT, str(tmp_path), mode], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    if mode == "filtered":
        assert proc.stdout.split() == ["EPERM"]
        assert (tmp_path / "a").read_text() == "x" and not (tmp_path / "b").exists()
    else:
        if proc.stdout.split() != ["ok"]:
            pytest.skip(f"this filesystem has no whiteouts ({proc.stdout.strip()})")
        assert stat.S_ISCHR((tmp_path / "a").lstat().st_mode)


@pytest.fixture
def fuse_project(tmp_path: Path) -> Iterator[Path]:
    """A project directory on FUSE (fuse-overlayfs), which cannot be id-mapped."""
    if os.geteuid() != 0 or shutil.which("fuse-overlayfs") is None:
        pytest.skip("needs root and fuse-overlayfs")
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "MARKER").write_text("project\n")
    subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
                   check=True, capture_output=True, timeout=60)
    try:
        yield merged
    finally:
        subprocess.run(["fusermount", "-u", str(merged)], capture_output=True, timeout=60)


def test_root_never_shares_a_fuse_project_without_nosuid_nodev(fuse_project: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Finding 1: the as-root fallback used to be the plain path (and nosuid/nodev were dropped
    silently). It is a detached nosuid,nodev clone, said on the agentbox logger."""
    with caplog.at_level("WARNING", logger="agentbox"):
        share = host_share.export(fuse_project)
    try:
        assert not share.mapped
        assert share.path.startswith(host_share.FD_PATH_PREFIX) and share.pass_fds
        flags = os.statvfs(share.path).f_flag
        assert flags & os.ST_NOSUID and flags & os.ST_NODEV
        assert Path(share.path, "MARKER").read_text() == "project\n"
        assert "nosuid,nodev" in share.why and "cannot id-map" in share.why
    finally:
        share.close()
    assert any("nosuid,nodev" in r.getMessage() for r in caplog.records)


@needs_root
def test_root_refuses_a_share_it_can_neither_id_map_nor_clone(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> int:
        raise OSError(errno.EINVAL, "open_tree: Invalid argument")

    monkeypatch.setattr(host_share, "_detached_clone", refuse)
    with pytest.raises(host_share.AgentboxError, match="cannot share .* safely as root") as err:
        host_share.export(tmp_path)
    assert "\n" not in str(err.value)
