"""The inspect-based ``--guest-init`` target (reference 6.6, Era C) against real local images."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest

from agentbox_guest_init.contract import GUEST_INIT_PATH
from agentbox_runtime.errors import InputError, error_chain
from agentbox_runtime.tasks.krun_podman_argv import guest_init_target


def _run(env: dict[str, str], *argv: str) -> str:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stdout.strip()


@pytest.fixture()
def image_with_entrypoint(podman_env: dict[str, str]) -> Iterator[Callable[[str | None], str]]:
    """``make(entrypoint or None) -> tag``: a local image whose entrypoint is ``entrypoint``; removed afterwards."""
    if shutil.which("buildah") is None:
        pytest.skip("needs buildah: apt-get install buildah")
    from suites.integration.container_test_image import build_test_image

    base = build_test_image()
    tags: list[str] = []

    def make(entrypoint: str | None) -> str:
        tag = f"localhost/agentbox-gi-target-test-{uuid.uuid4().hex[:8]}:latest"
        work = _run(podman_env, "buildah", "from", "--pull-never", base)
        try:
            _run(podman_env, "buildah", "config", "--entrypoint",
                 f'["{entrypoint}"]' if entrypoint else "[]", work)
            _run(podman_env, "buildah", "commit", "--quiet", work, tag)
        finally:
            subprocess.run(["buildah", "rm", work], env=podman_env, capture_output=True, timeout=120)
        tags.append(tag)
        return tag

    yield make
    for tag in tags:
        subprocess.run(["podman", "rmi", "-f", tag], env=podman_env, capture_output=True, timeout=120)


def test_default_target_is_the_constant_without_podman() -> None:
    assert guest_init_target("registry.invalid/never:pulled") == GUEST_INIT_PATH


def test_inspect_accepts_an_absolute_guest_init_entrypoint(image_with_entrypoint) -> None:  # type: ignore[no-untyped-def]
    tag = image_with_entrypoint("/usr/local/bin/agentbox-guest-init")
    assert guest_init_target(tag, inspect=True) == "/usr/local/bin/agentbox-guest-init"


def test_inspect_refuses_other_entrypoints(image_with_entrypoint) -> None:  # type: ignore[no-untyped-def]
    tag = image_with_entrypoint("/bin/sh")
    with pytest.raises(InputError, match=f"selected image '{tag}' first entrypoint element '/bin/sh' does "
                                         "not point to agentbox-guest-init; --guest-init can only override"):
        guest_init_target(tag, inspect=True)


def test_inspect_without_entrypoint_or_image(image_with_entrypoint) -> None:  # type: ignore[no-untyped-def]
    tag = image_with_entrypoint(None)
    with pytest.raises(InputError, match=f"selected image '{tag}' does not define a first entrypoint element"):
        guest_init_target(tag, inspect=True)
    with pytest.raises(InputError) as info:
        guest_init_target("localhost/agentbox-no-such-image:none", inspect=True)
    assert error_chain(info.value).startswith(
        "selected image 'localhost/agentbox-no-such-image:none' must be local and inspectable for "
        "--guest-init: failed to inspect selected image entrypoint for libkrun guest-init override: ")
