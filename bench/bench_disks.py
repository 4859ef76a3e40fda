"""Raw disk creation through agentbox_runtime.disks versus bare ``truncate`` + ``mkfs.btrfs``.

Prints JSON: median seconds of each and the overhead ratio (runtime / bare).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from agentbox_runtime import disks

ROUNDS = 5


def bare(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(disks.DEFAULT_SIZE)
    subprocess.run(["mkfs.btrfs", "-f", "-L", "AGENTBOX_NIX", str(path)], check=True,
                   capture_output=True, timeout=120)


def managed(root: Path) -> None:
    disks.prepare(disks.LIBKRUN_NIX, root)


def main() -> None:
    bare_s, managed_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(ROUNDS):
            t = time.perf_counter()
            bare(Path(tmp) / f"bare{i}.raw")
            bare_s.append(time.perf_counter() - t)
            root = Path(tmp) / f"m{i}"
            t = time.perf_counter()
            managed(root)
            managed_s.append(time.perf_counter() - t)
    b, m = statistics.median(bare_s), statistics.median(managed_s)
    print(json.dumps({"benchmark": "raw_disk_create", "rounds": ROUNDS, "bare_mkfs_s": round(b, 4),
                      "runtime_prepare_s": round(m, 4), "overhead_ratio": round(m / b, 3)}, indent=2))


if __name__ == "__main__":
    main()
