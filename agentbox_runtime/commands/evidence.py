"""``agentbox evidence verify DIR``: recheck an evidence bundle (:mod:`agentbox_runtime.evidence`).

Prints ``evidence bundle DIR: ok, N files, root sha256 R`` and exits 0, or prints one line per
file that changed, went missing or is not in the index and exits 1. A directory that is not a
bundle is a one-line error, exit 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agentbox_runtime import evidence


def run(args: argparse.Namespace) -> int:
    """Dispatch ``evidence verify``."""
    bundle = Path(args.bundle)
    root, problems = evidence.verify(bundle)
    if problems:
        for problem in problems:
            print(f"evidence bundle {bundle}: {problem}")
        return 1
    count = len(json.loads((bundle / evidence.INDEX).read_text())["files"])
    print(f"evidence bundle {bundle}: ok, {count} files, root sha256 {root}")
    return 0
