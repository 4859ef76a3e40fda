"""The reusable image contract against images it must reject: two images derived in the test from
the guest image (one lacks tools, one makes its dev user root), run through the contract's test
class in container mode in a fresh pytester project, each failure named exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0 or shutil.which("buildah") is None,
                                                     reason="derives images with buildah as root")]


def _derive(base: str, tag: str, edit: Callable[[Path], None]) -> None:
    """``tag``: ``base`` with ``edit`` applied to its mounted root (no container runs)."""
    ctr = subprocess.run(["buildah", "from", "--pull-never", base], capture_output=True, text=True, check=True,
                         timeout=300).stdout.strip()
    try:
        root = Path(subprocess.run(["buildah", "mount", ctr], capture_output=True, text=True, check=True,
                                   timeout=120).stdout.strip())
        edit(root)
        subprocess.run(["buildah", "commit", "-q", ctr, tag], capture_output=True, check=True, timeout=600)
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True, timeout=120)


def _without_tools(root: Path) -> None:
    for tool in ("usr/bin/jq", "usr/bin/rg"):
        (root / tool).unlink()


def _dev_is_root(root: Path) -> None:
    passwd = root / "etc" / "passwd"
    passwd.write_text(passwd.read_text().replace("dev:x:1000:1000:", "dev:x:0:0:"))


@pytest.fixture(scope="module")
def derived(agentbox_session) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    base = agentbox_session.image()
    tags = {"no-tools": "localhost/agentbox-contract-no-tools:test", "root-user": "localhost/agentbox-contract-root:test"}
    try:
        _derive(base, tags["no-tools"], _without_tools)
        _derive(base, tags["root-user"], _dev_is_root)
        yield tags
    finally:
        subprocess.run(["podman", "rmi", "-f", *tags.values()], capture_output=True, timeout=300)


def test_the_contract_names_what_each_derived_image_breaks(pytester: pytest.Pytester, derived: dict[str, str]) -> None:
    pytester.makepyfile(test_their_image=f'''
        import pytest
        from agentbox_harness.image_contract import ImageContractTests

        @pytest.mark.parametrize("agentbox_image", {sorted(derived.values())!r}, indirect=True)
        class TestTheirImage(ImageContractTests):
            pass
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "container_mode", timeout=1800)
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    assert "image contract: 1 failure(s)" in out and "- tools: missing from PATH: rg, jq" in out, out[-4000:]
    assert "image contract: 6 failure(s)" in out, out[-4000:]
    for line in ("- user: the shell runs as (no passwd entry) (uid 1000, gid 1000); expected dev (uid 1000, gid 1000)",
                 "- user: the image's passwd has dev with uid 0, gid 0, home /home/dev; "
                 "expected uid 1000, gid 1000, home /home/dev",
                 "- xdg: XDG_CONFIG_HOME is /home/dev/.config owned by uid 1000; expected a directory under /home/dev "
                 "owned by dev"):
        assert line in out, out[-4000:]
