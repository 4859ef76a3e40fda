"""``agentbox image build [--tag T] [--force] [--guest-init-only]``."""

from __future__ import annotations

import argparse

from agentbox_runtime.images import recipe
from agentbox_runtime.images.build import build


def run(args: argparse.Namespace) -> int:
    """Build the guest image (or say it is up to date) and print one summary line.

    ``--tag`` names the final image (default localhost/agentbox:latest);
    ``--force`` rebuilds even when cached; ``--guest-init-only`` redoes only
    the guest_init layer on the cached base."""
    tag = recipe.check_tag(args.tag if args.tag is not None else recipe.DEFAULT_TAG)
    result = build(tag, force=bool(args.force), guest_init_only=bool(args.guest_init_only))
    if result.up_to_date:
        print(f"{result.tag} is up to date (base {result.base_tag})")
    else:
        stages = "base and guest_init layer" if result.built_base else "guest_init layer"
        print(f"{result.tag} built ({stages}) in {result.seconds:.1f}s (base {result.base_tag})")
    return 0
