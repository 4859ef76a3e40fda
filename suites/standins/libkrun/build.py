"""Build the QEMU-backed libkrun stand-in with the system C compiler (cached).

``python -m suites.standins.libkrun.build`` prints the library path, so a user
can run the krun-direct backend on a host without libkrun::

    AGENTBOX_LIBKRUN_LIBRARY=$(.venv/bin/python -m suites.standins.libkrun.build) \\
        ./harness smoke --agentbox-backend=krun-direct

The library execs :mod:`launcher` (this directory) with this interpreter, both
compiled in. The build is cached by the hash of the source, the interpreter and
the launcher path, under the user's cache dir.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "libkrun_qemu.c"
LAUNCHER = HERE / "launcher.py"


class StandinBuildError(RuntimeError):
    """The stand-in library could not be compiled."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agentbox" / "libkrun-standin"


def build(python: str = sys.executable) -> Path:
    """The path of the compiled stand-in (``libkrun.so.1``), compiling it once per source and interpreter."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise StandinBuildError("no C compiler on PATH (apt-get install gcc)")
    key = hashlib.sha256(SOURCE.read_bytes() + b"\0" + python.encode() + b"\0" + str(LAUNCHER).encode())
    out_dir = cache_dir() / key.hexdigest()[:16]
    lib = out_dir / "libkrun.so.1"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".libkrun.so.1.{os.getpid()}"
    argv = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(tmp), str(SOURCE),
            f'-DSTANDIN_PYTHON="{python}"', f'-DSTANDIN_LAUNCHER="{LAUNCHER}"']
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise StandinBuildError(f"{' '.join(argv)} failed:\n{proc.stderr.strip()}")
    os.replace(tmp, lib)
    return lib


if __name__ == "__main__":
    print(build())
