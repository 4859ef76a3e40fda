"""Logged, timed build steps: progress on stderr, output in a log file, tail on failure.

Every long step of ``agentbox image build`` runs through :func:`step`: it prints
``agentbox image: <step> ...`` when it starts and ``<step> done in N.Ns`` when
it ends, appends the tool's output to the build log, and on failure or timeout
raises an error that names the step and shows the last lines of the log.
Short tool calls whose output is their result go through :func:`tool`.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from agentbox_runtime.errors import AgentboxError

STEP_TIMEOUT_S = 1800.0
TOOL_TIMEOUT_S = 600.0
SETUP_HINT = "run scripts/setup.sh (or apt-get install debootstrap buildah podman)"


log = logging.getLogger("agentbox")


def progress(message: str) -> None:
    """One progress line (INFO on the ``agentbox`` logger: the CLI prints it on stderr, pytest's
    logging shows or captures it)."""
    log.info("agentbox image: %s", message)


def log_tail(log: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of ``log`` (or a note that there is none)."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def step(name: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
         timeout: float = STEP_TIMEOUT_S) -> None:
    """Run one build step with its output appended to ``log``; progress on stderr."""
    started = time.monotonic()
    progress(f"{name} ...")
    with open(log, "ab") as out:
        out.write(f"\n==> {name}: {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None,
                                  timeout=timeout, check=False)
        except FileNotFoundError:
            raise AgentboxError(f"image build step '{name}' needs {argv[0]}, which is not installed; "
                                f"{SETUP_HINT}") from None
        except subprocess.TimeoutExpired:
            raise AgentboxError(f"image build step '{name}' timed out after {timeout:.0f}s; "
                                f"log {log}:\n{log_tail(log)}") from None
    if proc.returncode != 0:
        raise AgentboxError(f"image build step '{name}' failed with status {proc.returncode}; "
                            f"log {log}:\n{log_tail(log)}")
    progress(f"{name} done in {time.monotonic() - started:.1f}s")


def tool(argv: Sequence[str], what: str, timeout: float = TOOL_TIMEOUT_S) -> str:
    """Run a short tool call and return its stripped stdout; failures name ``what``."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise AgentboxError(f"image build step '{what}' needs {argv[0]}, which is not installed; "
                            f"{SETUP_HINT}") from None
    except subprocess.TimeoutExpired as exc:
        out = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise AgentboxError(f"image build step '{what}' timed out after {timeout:.0f}s: "
                            f"{' '.join(argv)}; last output: {out.strip()[-2000:]}") from None
    if proc.returncode != 0:
        raise AgentboxError(f"image build step '{what}' failed: {' '.join(argv)}: "
                            f"{proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()
