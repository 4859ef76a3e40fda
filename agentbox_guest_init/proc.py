"""Running guest tools, and placing guest paths under an injectable root.

Every module that touches the guest file system takes ``root`` (``/`` in the
guest, a tmp dir in tests) and resolves contract paths with :func:`under`.
Every module that runs a tool takes a :data:`Runner` (``run_tool`` in the
guest, a recorder in unit tests).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from agentbox_guest_init.errors import GuestError

ROOT = Path("/")
TOOL_TIMEOUT_S = 600

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def under(root: Path, path: str) -> Path:
    """The absolute guest ``path`` inside ``root``."""
    return Path(root) / path.lstrip("/")


def run_tool(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with captured text output (never raises for a non-zero status)."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: {exc.strerror}")
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return subprocess.CompletedProcess(list(argv), 124, "", f"timed out after {TOOL_TIMEOUT_S}s {err}")


def check(runner: Runner, argv: Sequence[str], context: str) -> str:
    """Run ``argv``; on failure raise ``<context>: <stderr>``. Returns stdout."""
    proc = runner(argv)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip() or f"{argv[0]} exited with status {proc.returncode}"
        raise GuestError(f"{context}: {detail}")
    return proc.stdout or ""


def require_tools(*names: str, which: Callable[[str], str | None] = shutil.which) -> None:
    """Every tool in ``names`` must be on PATH."""
    missing = [n for n in names if which(n) is None]
    if missing:
        raise GuestError(f"required tools missing on PATH: {', '.join(missing)}")


def is_mounted(path: str | Path, runner: Runner = run_tool) -> bool:
    """``findmnt -rn <path>`` succeeds."""
    return runner(["findmnt", "-rn", str(path)]).returncode == 0


def etc_entries(root: Path, name: str) -> list[list[str]]:
    """The colon-separated fields of each line of ``<root>/etc/<name>`` (empty when unreadable)."""
    try:
        return [line.split(":") for line in under(root, f"/etc/{name}").read_text().splitlines()]
    except OSError:
        return []
