"""passt DNS (7.8), RLIMIT_NOFILE floor, dmesg, /dev/kvm, allocator preload (7.11) and home (7.10)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agentbox_guest_init.dns import fix_passt_dns, normalize_resolv_conf
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.hardening import INF, materialize_allocator_preload, nofile_floor, open_kvm, restrict_dmesg
from agentbox_guest_init.home import materialize_home
from agentbox_guest_init.identity import Identity


@pytest.mark.parametrize("before,after", [
    ("search example.test\nnameserver 8.8.8.8\noptions ndots:1\n",
     "nameserver 169.254.1.1\nsearch example.test\nnameserver 8.8.8.8\noptions ndots:1\n"),
    ("nameserver 8.8.8.8\nnameserver 169.254.1.1\n", "nameserver 169.254.1.1\nnameserver 8.8.8.8\n"),
    (None, "nameserver 169.254.1.1\n"),
    ("", "nameserver 169.254.1.1\n"),
    ("nameserver 169.254.1.1\n", "nameserver 169.254.1.1\n"),
])
def test_libkrun_passt_dns_normalizes_resolv_conf(before: str | None, after: str) -> None:
    assert normalize_resolv_conf(before) == after


def test_fix_passt_dns_replaces_a_symlink_with_a_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    target = tmp_path / "stub"
    target.write_text("nameserver 10.0.0.1\n")
    (tmp_path / "etc/resolv.conf").symlink_to(target)
    fix_passt_dns(tmp_path)
    assert not (tmp_path / "etc/resolv.conf").is_symlink()
    assert (tmp_path / "etc/resolv.conf").read_text() == "nameserver 169.254.1.1\nnameserver 10.0.0.1\n"
    assert target.read_text() == "nameserver 10.0.0.1\n"


class Limits:
    def __init__(self, soft: int, hard: int, get_error: bool = False, set_error: bool = False) -> None:
        self.value, self.sets = (soft, hard), []  # type: ignore[var-annotated]
        self.get_error, self.set_error = get_error, set_error

    def get(self) -> tuple[int, int]:
        if self.get_error:
            raise OSError(1, "Operation not permitted")
        return self.value

    def set(self, v: tuple[int, int]) -> None:
        self.sets.append(v)
        if self.set_error:
            raise ValueError("not allowed to raise maximum limit")
        self.value = v


def test_nofile_floor_preserves_higher_limits_without_setrlimit() -> None:
    lim = Limits(1 << 20, INF)
    assert nofile_floor(lim.get, lim.set) == (1 << 20, INF)
    assert lim.sets == []


def test_nofile_floor_raises_both_soft_and_hard_when_below_floor() -> None:
    lim = Limits(1024, 4096)
    assert nofile_floor(lim.get, lim.set) == (524288, 524288)
    assert lim.sets == [(524288, 524288)]


def test_nofile_floor_raises_only_soft_when_hard_is_already_high_enough() -> None:
    lim = Limits(1024, 1 << 21)
    nofile_floor(lim.get, lim.set)
    assert lim.sets == [(524288, 1 << 21)]


def test_nofile_floor_rejects_invalid_limits() -> None:
    lim = Limits(9000, 8000)
    with pytest.raises(GuestError, match="^guest RLIMIT_NOFILE is invalid: soft limit 9000 is greater than hard "
                                         "limit 8000$"):
        nofile_floor(lim.get, lim.set)
    assert lim.sets == []


def test_nofile_floor_reports_getrlimit_failure() -> None:
    lim = Limits(1, 1, get_error=True)
    with pytest.raises(GuestError, match="^failed to read guest RLIMIT_NOFILE before launching the guest shell"):
        nofile_floor(lim.get, lim.set)


def test_nofile_floor_reports_setrlimit_failure() -> None:
    lim = Limits(1024, 4096, set_error=True)
    with pytest.raises(GuestError, match="^failed to raise guest RLIMIT_NOFILE from soft=1024 hard=4096 to "
                                         "soft=524288 hard=524288 before launching the guest shell"):
        nofile_floor(lim.get, lim.set)


def test_restrict_dmesg_truncates_and_writes_1(tmp_path: Path) -> None:
    path = tmp_path / "proc/sys/kernel/dmesg_restrict"
    path.parent.mkdir(parents=True)
    path.write_text("0 and more\n")
    restrict_dmesg(tmp_path)
    assert path.read_text() == "1\n"


def test_restrict_dmesg_open_failure(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="^failed to open /proc/sys/kernel/dmesg_restrict for dmesg restriction"):
        restrict_dmesg(tmp_path)


def test_open_kvm_only_when_present(tmp_path: Path) -> None:
    assert open_kvm(tmp_path) is False
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kvm").write_text("")
    os.chmod(tmp_path / "dev/kvm", 0o600)
    assert open_kvm(tmp_path) is True
    assert stat.S_IMODE((tmp_path / "dev/kvm").stat().st_mode) == 0o666


def lib(root: Path, rel: str) -> str:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return rel


def test_allocator_default_mimalloc_missing_is_a_no_op(tmp_path: Path) -> None:
    assert materialize_allocator_preload(GuestEnv(), tmp_path) is None
    assert not (tmp_path / "etc/ld-nix.so.preload").exists()


def test_allocator_from_metadata_then_env(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    m = lib(tmp_path, "/nix/store/a-mimalloc/lib/libmimalloc.so")
    h = lib(tmp_path, "/opt/h/lib/libhardened_malloc.so")
    (tmp_path / "etc/nix-allocator-libs").write_text(f"# libs\nmimalloc={m}\n")
    assert materialize_allocator_preload(GuestEnv(allocator=""), tmp_path) == m
    assert (tmp_path / "etc/ld-nix.so.preload").read_text() == f"{m}\n"
    assert stat.S_IMODE((tmp_path / "etc/ld-nix.so.preload").stat().st_mode) == 0o644
    assert materialize_allocator_preload(GuestEnv(allocator="hardened", hardened_malloc_lib=h), tmp_path) == h


def test_allocator_errors(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="^AGENTBOX_NIX_ALLOCATOR must be 'mimalloc' or 'hardened'$"):
        materialize_allocator_preload(GuestEnv(allocator="jemalloc"), tmp_path)
    with pytest.raises(GuestError, match="^AGENTBOX_NIX_ALLOCATOR=hardened requires hardened in "
                                         "/etc/nix-allocator-libs or AGENTBOX_GRAPHENE_HARDENED_MALLOC_LIB$"):
        materialize_allocator_preload(GuestEnv(allocator="hardened"), tmp_path)
    with pytest.raises(GuestError, match="must be an absolute path ending in /lib/libmimalloc.so, got lib/x.so"):
        materialize_allocator_preload(GuestEnv(mimalloc_lib="lib/x.so"), tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_materialize_home_rewrites_identity_and_creates_owned_dirs(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\ndev:x:1000:1000::/home/dev:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\ndev:x:1000:\nnixbld:x:30000:\n")
    nix_cache = tmp_path / "home/dev/.cache/nix"
    nix_cache.mkdir(parents=True)
    (nix_cache / "f").write_text("")
    (nix_cache / "link").symlink_to("/etc/shadow")
    materialize_home(Identity(1234, 2345, "/usr/bin/fish"), tmp_path)
    assert (etc / "passwd").read_text() == ("root:x:0:0::/root:/bin/sh\n"
                                            "dev:x:1234:2345:dev user:/home/dev:/usr/bin/fish\n")
    assert (etc / "group").read_text() == "root:x:0:\nnixbld:x:30000:\ndev:x:2345:\n"
    home = tmp_path / "home/dev"
    for rel in ("", ".local", ".local/share", ".local/state", ".cache", ".cache/tmp", ".config", ".cache/nix",
                ".cache/nix/f"):
        st = (home / rel).stat()
        assert (st.st_uid, st.st_gid) == (1234, 2345), rel
    assert (home / ".cache/nix/link").lstat().st_uid == 1234
    assert os.stat("/etc/shadow").st_uid == 0  # the symlink was not followed
    assert stat.S_IMODE((home / ".local/state").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / ".cache/tmp").stat().st_mode) == 0o700
