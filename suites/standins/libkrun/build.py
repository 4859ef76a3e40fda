"""Build the QEMU-backed libkrun stand-in with the system C compiler (cached).

``python -m suites.standins.libkrun.build`` prints the library path, so a user
can run the krun-direct backend on a host without libkrun::

    AGENTBOX_LIBKRUN_LIBRARY=$(.venv/bin/python -m suites.standins.libkrun.build) \\
        ./harness smoke --agentbox-backend=krun-direct

The library execs :mod:`launcher` (this directory) with this interpreter, both
compiled in; loaded by a real crun's krun handler it starts :mod:`crun_bridge` instead
(``crun_bridge.c``). ``libkrun.h`` (this directory: the calls crun's handler makes) is
force-included, so the stand-in's definitions must agree with it. The build is cached by the
hash of the sources, the interpreter and the script paths, under the user's cache dir.
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
SOURCES = (SOURCE, HERE / "crun_bridge.c")
HEADERS = (HERE / "crun_bridge.h", HERE / "libkrun.h")
LAUNCHER = HERE / "launcher.py"
BRIDGE = HERE / "crun_bridge.py"


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
    key = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in (*SOURCES, *HEADERS)), python.encode(),
                                      str(LAUNCHER).encode(), str(BRIDGE).encode()]))
    out_dir = cache_dir() / key.hexdigest()[:16]
    lib = out_dir / "libkrun.so.1"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".libkrun.so.1.{os.getpid()}"
    # -D_GNU_SOURCE= (empty, as the sources define it) lets libkrun.h come first
    argv = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(tmp), *map(str, SOURCES),
            "-D_GNU_SOURCE=", "-include", str(HERE / "libkrun.h"),
            f'-DSTANDIN_PYTHON="{python}"', f'-DSTANDIN_LAUNCHER="{LAUNCHER}"', f'-DSTANDIN_BRIDGE="{BRIDGE}"']
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise StandinBuildError(f"{' '.join(argv)} failed:\n{proc.stderr.strip()}")
    os.replace(tmp, lib)
    return lib


if __name__ == "__main__":
    print(build())
