"""``agentbox image build [--tag T] [--force] [--guest-init-only] [--user NAME] [--uid N] [--gid N]
[--workdir DIR]``."""

from __future__ import annotations

import argparse

from agentbox_guest_init.image_user import ImageUser
from agentbox_runtime.errors import InputError
from agentbox_runtime.images import recipe
from agentbox_runtime.images.build import build


def image_user(args: argparse.Namespace) -> ImageUser:
    """The image user the options ask for (each unset one keeps its default); InputError naming
    the bad value and what is accepted."""
    fields = {k: v for k in ("user", "uid", "gid", "workdir") if (v := getattr(args, k, None)) is not None}
    try:
        return ImageUser.from_fields(fields)
    except ValueError as exc:
        raise InputError(f"image build: {exc}") from None


def run(args: argparse.Namespace) -> int:
    """Build the guest image (or say it is up to date) and print one summary line.

    ``--tag`` names the final image (default localhost/agentbox:latest);
    ``--force`` rebuilds even when cached; ``--guest-init-only`` redoes only
    the guest_init layer on the cached base; ``--user``, ``--uid``, ``--gid``
    and ``--workdir`` set the image's non-root user (home ``/home/<user>``)
    and the directory its shell starts in and the workspace is mounted at
    (default dev, 1000, 1000, /workspace). Images of every user share the base."""
    tag = recipe.check_tag(args.tag if args.tag is not None else recipe.DEFAULT_TAG)
    user = image_user(args)
    result = build(tag, force=bool(args.force), guest_init_only=bool(args.guest_init_only), user=user)
    who = "" if user.is_default else f"; user {user.user} {user.uid}:{user.gid}, workdir {user.workdir}"
    if result.up_to_date:
        print(f"{result.tag} is up to date (base {result.base_tag}{who})")
    else:
        stages = "base and guest_init layer" if result.built_base else "guest_init layer"
        print(f"{result.tag} built ({stages}) in {result.seconds:.1f}s (base {result.base_tag}{who})")
    return 0
