"""The fresh-setup test's host probes: which Debian mirror, whether it answers, what is missing."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from suites.integration import fresh_root
from suites.integration.fresh_root import debian_mirror, probe_mirror


def sources(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_mirror_comes_from_a_deb822_sources_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTBOX_DEBIAN_MIRROR", raising=False)
    apt = sources(tmp_path, {"sources.list.d/debian.sources": (
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n")})
    assert debian_mirror(apt) == "http://mirror.example/debian"


def test_the_mirror_comes_from_a_one_line_sources_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTBOX_DEBIAN_MIRROR", raising=False)
    apt = sources(tmp_path, {"sources.list": ("# deb http://commented.example/debian bookworm main\n"
                                              "deb [arch=amd64 signed-by=/k.gpg] http://local.example/debian trixie main\n")})
    assert debian_mirror(apt) == "http://local.example/debian"


def test_an_ubuntu_host_falls_back_to_debians_own_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTBOX_DEBIAN_MIRROR", raising=False)
    apt = sources(tmp_path, {"sources.list.d/ubuntu.sources": (
        "Types: deb\nURIs: http://archive.ubuntu.com/ubuntu/\nSuites: noble noble-updates\nComponents: main universe\n")})
    assert debian_mirror(apt) == fresh_root.DEFAULT_MIRROR


def test_the_environment_overrides_the_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTBOX_DEBIAN_MIRROR", "http://mine.example/debian/")
    assert debian_mirror(sources(tmp_path, {})) == "http://mine.example/debian"


def test_an_unreachable_mirror_is_one_line_naming_the_url() -> None:
    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        why = probe_mirror(f"http://127.0.0.1:{port}/debian", "trixie", timeout=5)
    assert why is not None and why.startswith(f"http://127.0.0.1:{port}/debian/dists/trixie/InRelease unreachable: ")
    assert "\n" not in why


def test_a_debootstrap_without_the_suites_script_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fresh_root.os, "geteuid", lambda: 0)
    monkeypatch.setattr(fresh_root.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(fresh_root, "DEBOOTSTRAP_SCRIPTS", tmp_path)
    assert fresh_root.missing_prerequisite("trixie") == "this debootstrap has no script for trixie: install a newer debootstrap"


def test_not_root_and_no_debootstrap_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fresh_root.os, "geteuid", lambda: 1000)
    assert fresh_root.missing_prerequisite("trixie") == "needs root (debootstrap, mounts and namespaces)"
    monkeypatch.setattr(fresh_root.os, "geteuid", lambda: 0)
    monkeypatch.setattr(fresh_root.shutil, "which", lambda tool: None)
    assert fresh_root.missing_prerequisite("trixie") == "needs debootstrap: apt-get install debootstrap"
