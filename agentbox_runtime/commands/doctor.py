"""``agentbox doctor [--json] [--no-probe]``: what this host can run and how to get the rest."""

from __future__ import annotations

import argparse
import logging

from agentbox_runtime.doctor import render_json, render_text, run_checks
from agentbox_runtime.doctor import check_by_name
from agentbox_runtime.images.recipe import DEFAULT_TAG
from agentbox_runtime.microvm.probe import probe
from agentbox_runtime.vmm import boot_verdicts


def probe_krun_direct() -> None:
    """Boot once through libkrun when it loads, the guest image exists, and no verdict is cached."""

    key = boot_verdicts.krun_direct_key()
    if key is None or boot_verdicts.read(boot_verdicts.KRUN_DIRECT, key) is not None:
        return
    if not check_by_name("guest-image").ok:
        return

    logging.getLogger("agentbox").info("agentbox doctor: probing krun-direct with one guest boot ...")
    probe(DEFAULT_TAG)


def run(args: argparse.Namespace) -> int:
    """Print the host report, as a table or with ``--json`` as JSON; exit 0 (the report is information).

    ``--no-probe`` skips the probe boots: the KVM boot probe line and the krun-direct boot
    (otherwise krun-direct is probed once per libkrun library when the guest image exists).
    """
    if not args.no_probe:
        probe_krun_direct()
    checks = run_checks(probe_kvm=not args.no_probe)
    print(render_json(checks) if args.json else render_text(checks))
    return 0
