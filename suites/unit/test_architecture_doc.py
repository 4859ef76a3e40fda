"""docs/architecture.md quotes constants of the code; each quote must match the code's value.

A drifted number in the architecture page misleads the next engineer more than a missing one, so
every number it states about a limit or a default is checked here against the constant itself.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from agentbox_guest_init import listeners
from agentbox_harness import session
from agentbox_runtime import private_dir
from agentbox_runtime.vmm import qemu

DOC = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
TEXT = re.sub(r"\s+", " ", DOC)


def _quoted(pattern: str) -> list[str]:
    found = re.findall(pattern, TEXT)
    assert found, f"docs/architecture.md no longer says {pattern!r}: update this test with the doc"
    return found


def test_the_tcg_timeout_scale_is_the_harness_default() -> None:
    for value in _quoted(r"default (\d+(?:\.\d+)?) under TCG"):
        assert float(value) == session.TCG_SCALE


def test_the_status_port_cap_is_the_recorders_cap() -> None:
    for value in _quoted(r"capped at (\d+) KiB"):
        assert int(value) << 10 == qemu.STATUS_CAP


def test_the_preauth_connection_limit_is_the_gates() -> None:
    for value in _quoted(r"at most (\d+) wait at once"):
        assert int(value) == listeners.PREAUTH_CONNECTIONS


def test_the_socket_path_limit_is_the_kernels(tmp_path: Path) -> None:
    """A unix socket path of the quoted length binds; one byte more does not."""
    (limit,) = {int(v) for v in _quoted(r"limited to (\d+) bytes")}
    base = tmp_path / "s"
    base.mkdir()
    for length, binds in ((limit, True), (limit + 1, False)):
        path = str(base / ("x" * (length - len(str(base)) - 1)))
        assert len(path) == length
        with socket.socket(socket.AF_UNIX) as sock:
            if binds:
                sock.bind(path)
            else:
                with pytest.raises(OSError):
                    sock.bind(path)
    assert limit > private_dir.SOCKET_DIR_MAX


def test_the_machine_classes_are_described_as_they_are() -> None:
    """The page must not claim the machines implement only the three abstract members."""
    assert "implement only `_execute`, `_start`, `_stop`" not in TEXT
