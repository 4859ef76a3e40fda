"""``smoke/`` wall time, serial (and optionally with xdist workers), with the number of guest boots.

Runs ``pytest smoke/`` in a subprocess per configuration after the guest image exists, then
reads the per-test timings the harness wrote (``results/timings/``) to count boots (every
machine ``start``, restarts included) and their total time. Prints JSON; with ``--workers N``
also the serial/parallel speedup measured in the same process.

    .venv/bin/python bench/bench_smoke.py [--backend qemu] [--workers 2] [-- extra pytest args]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMINGS = REPO / "results" / "timings"


def boots_since(started: float) -> tuple[int, float]:
    """(boots, total boot seconds) from the timings files written after ``started``."""
    count, total = 0, 0.0
    for path in TIMINGS.glob("smoke_*.json") if TIMINGS.is_dir() else []:
        if path.stat().st_mtime < started:
            continue
        for profile in json.loads(path.read_text()).values():
            count += int(profile.get("verbs", {}).get("start", {}).get("count", 0))
            total += float(profile.get("verbs", {}).get("start", {}).get("total_s", 0.0))
    return count, total


def run(backend: str, workers: int, extra: list[str]) -> dict[str, object]:
    argv = [sys.executable, "-m", "pytest", "smoke/", "-q", "-p", "no:cacheprovider",
            f"--agentbox-backend={backend}", *(["-n", str(workers)] if workers > 1 else []), *extra]
    started = time.time()
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - t0
    boots, boot_total = boots_since(started)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return {"workers": workers, "wall_s": round(wall, 1), "boots": boots, "boot_total_s": round(boot_total, 1),
            "boot_share": round(boot_total / wall, 3) if wall else None, "exit_status": proc.returncode,
            "outcome": last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="qemu")
    parser.add_argument("--workers", type=int, default=1, help="also run with this many xdist workers")
    parser.add_argument("extra", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    serial = run(args.backend, 1, args.extra)
    out: dict[str, object] = {"benchmark": "smoke_wall_time", "backend": args.backend, "serial": serial}
    if args.workers > 1:
        parallel = run(args.backend, args.workers, args.extra)
        out["parallel"] = parallel
        out["speedup_ratio"] = round(float(serial["wall_s"]) / float(parallel["wall_s"]), 3)  # type: ignore[arg-type]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
