"""``agentbox doctor [--json] [--no-probe]``: what this host can run and how to get the rest."""

from __future__ import annotations

import argparse
import json

from runtime.doctor import render_text, run_checks, usable_backends


def run(args: argparse.Namespace) -> int:
    """Print the report (text or JSON); exit 0: the report is information."""
    checks = run_checks(probe_kvm=not args.no_probe)
    if args.json:
        print(json.dumps({"checks": [c.as_dict() for c in checks],
                          "backends": {k: {"usable": ok, "reason": why}
                                       for k, (ok, why) in usable_backends(checks).items()}},
                         indent=2))
    else:
        print(render_text(checks))
    return 0
