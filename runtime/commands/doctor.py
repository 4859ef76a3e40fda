"""``agentbox doctor [--json] [--no-probe]``: what this host can run and how to get the rest."""

from __future__ import annotations

import argparse

from runtime.doctor import render_json, render_text, run_checks


def run(args: argparse.Namespace) -> int:
    """Print the host report, as a table or with ``--json`` as JSON; exit 0 (the report is information).

    ``--no-probe`` skips the KVM boot probe line.
    """
    checks = run_checks(probe_kvm=not args.no_probe)
    print(render_json(checks) if args.json else render_text(checks))
    return 0
