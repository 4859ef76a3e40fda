"""Turn roots into images in local Podman/Buildah storage, and read them back.

- :func:`import_root`: a finished Debian root directory -> the base image
  (``tar | podman import``, labelled with the recipe hash);
- :func:`commit_layer`: ``buildah from <base>``, let a callback write into the
  mounted root, apply the :class:`~agentbox_runtime.images.recipe.ImageConfig`,
  ``buildah commit``; the working container is removed on every path;
- :func:`image_labels` / :func:`image_id` / :func:`image_user`: what is in local storage (read
  through the Podman API, :mod:`agentbox_runtime.container.podman_api`);
- :func:`remove_if_untagged` / :func:`prune_other_tags`: drop superseded images (through the API).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentbox_guest_init.image_user import ImageUser
from agentbox_runtime.container import podman_api
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.images.recipe import LABEL_RECIPE, ImageConfig
from agentbox_runtime.images.steps import step, tool

INSPECT_TIMEOUT_S = 120.0


def _inspect(ref: str, kind: str = "image") -> dict[str, Any] | None:
    """``podman <kind> inspect <ref>``; None when it does not exist or Podman is not installed."""
    if shutil.which("podman") is None:
        return None
    return podman_api.container_inspect(ref) if kind == "container" else podman_api.image_inspect(ref)


def image_labels(ref: str, kind: str = "image") -> dict[str, str] | None:
    """The labels of a local image (``kind="container"``: of a container, which carries its image's),
    an empty dict if it has none, or None when it does not exist."""
    attrs = _inspect(ref, kind)
    if attrs is None:
        return None
    labels = (attrs.get("Config") or {}).get("Labels") if kind == "container" else attrs.get("Labels")
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def image_user(ref: str, kind: str = "image") -> ImageUser:
    """The image user (:mod:`agentbox_guest_init.image_user`) a local image's labels name
    (``kind="container"``: a container's); the defaults (dev, 1000:1000, /workspace) when it has none
    or is not in local storage (yet)."""
    try:
        return ImageUser.from_labels(image_labels(ref, kind) or {})
    except ValueError as exc:
        raise AgentboxError(f"{kind} {ref} has bad image user labels: {exc}") from None


def image_id(ref: str) -> str | None:
    """The full id of a local image, or None when it does not exist."""
    attrs = _inspect(ref)
    return str(attrs.get("Id") or "") or None if attrs else None


def import_root(root: Path, tag: str, recipe_hash: str, log: Path) -> None:
    """Import the directory ``root`` as image ``tag`` labelled with ``recipe_hash``."""
    script = (f"set -o pipefail; tar -C {shlex.quote(str(root))} --numeric-owner -cf - . | "
              f"podman import --change {shlex.quote(f'LABEL {LABEL_RECIPE}={recipe_hash}')} "
              f"- {shlex.quote(tag)}")
    step(f"import base image {tag}", ["bash", "-c", script], log)


def config_argv(config: ImageConfig) -> list[str]:
    """The ``buildah config`` options that apply ``config``."""
    argv = ["--entrypoint", json.dumps(list(config.entrypoint)), "--cmd", json.dumps(list(config.cmd)),
            "--workingdir", config.workdir]
    for key, value in config.env:
        argv += ["--env", f"{key}={value}"]
    for key, value in config.labels:
        argv += ["--label", f"{key}={value}"]
    return argv


def commit_layer(base: str, tag: str, config: ImageConfig, populate: Callable[[Path], object]) -> None:
    """``FROM base``: run ``populate(mounted root)``, apply ``config``, commit as ``tag``."""
    ctr = tool(["buildah", "from", "--pull-never", base], "buildah from")
    try:
        mount = Path(tool(["buildah", "mount", ctr], "buildah mount"))
        populate(mount)
        tool(["buildah", "umount", ctr], "buildah umount")
        tool(["buildah", "config", *config_argv(config), ctr], "buildah config")
        tool(["buildah", "commit", "--quiet", "--rm", ctr, tag], "buildah commit")
        ctr = ""
    finally:
        if ctr:
            subprocess.run(["buildah", "rm", ctr], capture_output=True, timeout=INSPECT_TIMEOUT_S,
                           check=False)


def prune_other_tags(repo: str, keep: str) -> None:
    """Best effort: untag and delete ``repo``'s other images (older recipes); images
    still used by a container or by a child image stay."""
    for ref in sorted(set(podman_api.image_tags(repo)) - {keep}):
        podman_api.remove_image(ref)


def remove_if_untagged(image: str | None) -> None:
    """Best effort: delete a superseded image that lost its last tag (never one in use)."""
    attrs = _inspect(image) if image else None
    if image and attrs is not None and not attrs.get("RepoTags"):
        podman_api.remove_image(image)
