"""``agentbox evidence verify DIR``: recheck an evidence bundle (:mod:`agentbox_runtime.evidence_verify`).

Prints ``evidence bundle DIR: ok, N files, root sha256 R`` and exits 0, or prints one line per
file that changed, went missing, is not in the index or was refused (a name leaving the bundle,
a symlink, FIFO or device, a file over the size cap) and exits 1. A directory that is not a
bundle is a one-line error, exit 2. Every name printed is escaped, so each stays one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agentbox_runtime.evidence_verify import check, escape


def run(args: argparse.Namespace) -> int:
    """Dispatch ``evidence verify``."""
    bundle = Path(args.bundle)
    verdict = check(bundle)
    shown = escape(str(bundle))
    if verdict.problems:
        for problem in verdict.problems:
            print(f"evidence bundle {shown}: {problem}")
        return 1
    print(f"evidence bundle {shown}: ok, {verdict.files} files, root sha256 {escape(verdict.root)}")
    return 0
