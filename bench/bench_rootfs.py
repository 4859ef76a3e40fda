"""Task rootfs materialization per storage backend versus a plain ``cp -a``.

For synthetic rootfs trees of 100 MiB and 1 GiB (many small files plus a few
large ones) on a loop-mounted btrfs, times ``agentbox_runtime.microvm.storage`` with
btrfs-snapshot, reflink and fuse-overlay, and ``cp -a`` as the baseline.
Prints JSON: median seconds per backend and size, and the ratio backend / cp.
Needs root (loop mount, fuse) and btrfs-progs, fuse-overlayfs.

    .venv/bin/python bench/bench_rootfs.py [--rounds 3] [--sizes 100,1024]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from agentbox_runtime.microvm import storage

BACKENDS = ("btrfs-snapshot", "reflink", "fuse-overlay")


T = TypeVar("T")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=1800)


def synth(root: Path, mib: int) -> None:
    """``mib`` MiB: 3/4 in 4 KiB files spread over dirs, the rest in 8 MiB files."""
    sh("btrfs", "subvolume", "create", str(root))
    small = os.urandom(4096)
    small_count = mib * 1024 * 3 // 4 // 4
    for i in range(small_count):
        d = root / "usr" / f"d{i // 256}"
        if i % 256 == 0:
            d.mkdir(parents=True)
        (d / f"f{i}").write_bytes(small)
    big = os.urandom(8 << 20)
    (root / "opt").mkdir()
    for i in range(max(1, mib // 4 // 8)):
        (root / "opt" / f"blob{i}").write_bytes(big)
    os.sync()


def timed(fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    """``fn(*args)``'s wall time in seconds and its result (the arguments are bound now, not later)."""
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def measure(mnt: Path, src: Path, rounds: int) -> dict[str, float]:
    out: dict[str, list[float]] = {name: [] for name in ("cp -a", *BACKENDS)}
    for r in range(rounds):
        dst = mnt / f"cp{r}"
        dst.mkdir()
        seconds, _ = timed(sh, "cp", "-a", f"{src}/.", str(dst))
        out["cp -a"].append(seconds)
        shutil.rmtree(dst)
        for name in BACKENDS:
            seconds, rootfs = timed(storage.materialize, name, src, mnt / "tasks" / f"{name}{r}")
            out[name].append(seconds)
            rootfs.unmount()
            rootfs.cleanup()
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="100,1024", help="MiB, comma separated")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        image, mnt = Path(tmp) / "btrfs.img", Path(tmp) / "mnt"
        mnt.mkdir()
        sizes = [int(s) for s in args.sizes.split(",")]
        with open(image, "wb") as f:
            f.truncate((max(sizes) * 5 + 1024) << 20)
        sh("mkfs.btrfs", "-q", str(image))
        sh("mount", "-o", "loop,user_subvol_rm_allowed", str(image), str(mnt))
        try:
            for mib in sizes:
                src = mnt / f"src{mib}"
                synth(src, mib)
                medians = measure(mnt, src, args.rounds)
                base = medians["cp -a"]
                results.append({"size_mib": mib, "median_s": {k: round(v, 4) for k, v in medians.items()},
                                "ratio_vs_cp": {k: round(v / base, 4) for k, v in medians.items() if k != "cp -a"}})
                sh("btrfs", "subvolume", "delete", str(src))
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True, timeout=300)
    print(json.dumps({"bench": "rootfs_materialization", "rounds": args.rounds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
