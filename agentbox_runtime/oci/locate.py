"""Where the ``agentbox-krun-runtime`` executable is, for ``podman run --runtime <path>``."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from agentbox_runtime.errors import AgentboxError

EXECUTABLE = "agentbox-krun-runtime"


def runtime_path() -> str:
    """The absolute path of ``agentbox-krun-runtime``: next to the running interpreter (the venv's
    ``bin``), else on PATH. Raises :class:`AgentboxError` naming the fix when it is not installed."""
    beside = Path(sys.executable).parent / EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(EXECUTABLE)
    if found:
        return os.path.abspath(found)
    raise AgentboxError(f"{EXECUTABLE} is not installed next to {sys.executable} or on PATH; "
                        "reinstall agentbox-harness (pip install -e .) to get it")
