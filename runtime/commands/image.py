"""``agentbox image build [--tag T] [--force] [--guest-init-only]``."""

from __future__ import annotations

import argparse

from runtime.images import recipe
from runtime.images.build import build


def run(args: argparse.Namespace) -> int:
    """Build the guest image, or say it is up to date."""
    result = build(args.tag or recipe.DEFAULT_TAG, force=bool(args.force),
                   guest_init_only=bool(args.guest_init_only))
    state = "up to date" if result.up_to_date else "built"
    print(f"{result.tag} {state} in {result.seconds:.1f}s (base {result.base_tag})")
    return 0
