"""``agentbox -- true`` through the QEMU-backed krun runtime next to ``agentbox microvm --vmm qemu -- true``.

Both run the whole command as a user does (CLI start, image resolution, disks,
Podman or the microvm task, the boot, the guest command, teardown), in one
project and state dir, alternating, after one warm-up run of each (which
creates the disks and fills the caches). Prints JSON with every wall time, the
medians and the ratio libkrun-mode / microvm measured in this process.

    .venv/bin/python bench/bench_libkrun_mode.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGE = "localhost/agentbox:latest"
COMMANDS = {
    "libkrun_mode_s": ["--krun-runtime", "qemu", "--", "true"],
    "microvm_qemu_s": ["microvm", "--vmm", "qemu", "--", "true"],
}


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"agentbox {' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-libkrun-") as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        env = {**os.environ, "XDG_STATE_HOME": str(Path(tmp) / "state"), "AGENTBOX_IMAGE": IMAGE}
        for argv in COMMANDS.values():
            timed(argv, project, env)  # warm-up: disks, image cache, initramfs
        runs: dict[str, list[float]] = {k: [] for k in COMMANDS}
        for _ in range(args.rounds):
            for key, argv in COMMANDS.items():
                runs[key].append(round(timed(argv, project, env), 2))
    medians = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    print(json.dumps({"runs": runs, "medians": medians,
                      "ratio_libkrun_mode_to_microvm": round(medians["libkrun_mode_s"] / medians["microvm_qemu_s"], 2)},
                     indent=1))


if __name__ == "__main__":
    main()
