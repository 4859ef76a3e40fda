"""An image built for another user (``agentbox image build --user agent --uid 2000 --gid 2000
--workdir /work``) keeps the image contract for that user, in a guest and in container mode, and
the CLI's shells start as it, in its workdir.

The image is a real build: the cached base plus the guest_init layer, which renames and renumbers
the base's dev account. The contract runs through the reusable test class in a fresh pytester
project, exactly as a user's project would point it at their image."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbox_guest_init.image_user import ImageUser
from agentbox_runtime import guest_registry
from agentbox_runtime.images.commit import image_user

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="builds and runs images as root")]

TAG = "localhost/agentbox-image-user:test"
AGENT = ImageUser(user="agent", uid=2000, gid=2000, workdir="/work")


@pytest.fixture(scope="module")
def agent_image(agentbox_session) -> Iterator[str]:  # type: ignore[no-untyped-def]
    agentbox_session.image()  # the stock image first: its base is cached, so this build is one layer
    proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "image", "build", "--tag", TAG,
                           "--user", AGENT.user, "--uid", str(AGENT.uid), "--gid", str(AGENT.gid),
                           "--workdir", AGENT.workdir], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("user agent 2000:2000, workdir /work)"), proc.stdout
    try:
        yield TAG
    finally:
        subprocess.run(["podman", "rmi", "-f", TAG], capture_output=True, timeout=300)


def test_the_image_carries_its_user_in_labels(agent_image: str) -> None:
    assert image_user(agent_image) == AGENT
    workdir = subprocess.run(["podman", "image", "inspect", "--format", "{{.Config.WorkingDir}}", agent_image],
                             capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert workdir == "/work"


INNER = '''
import pytest
from agentbox_guest_init.image_user import ImageUser
from agentbox_harness.image_contract import ImageContract, ImageContractTests

AGENT = ImageContract.for_image_user(ImageUser(user="agent", uid=2000, gid=2000, workdir="/work"))


@pytest.mark.parametrize("agentbox_image", [{image!r}], indirect=True)
class TestTheirImage(ImageContractTests):
    contract = AGENT


@pytest.mark.parametrize("agentbox_image", [{image!r}], indirect=True)
class TestTheStockContractRejectsIt(ImageContractTests):
    pass


@pytest.mark.parametrize("agentbox_image", [{image!r}], indirect=True)
def test_krun_podman(agentbox_image, krun_task, workspace):
    AGENT.check(krun_task, workspace)
'''


@pytest.mark.parametrize("selection", [
    pytest.param(("qemu", "TestTheirImage or (TestTheStockContractRejectsIt and container)", 2, 1), id="qemu"),
    pytest.param(("krun-direct", "TestTheirImage and guest", 1, 0), id="krun-direct"),
    pytest.param(("qemu", "krun_podman", 1, 0), id="krun-podman"),
])
def test_the_contract_holds_for_the_image_user_on_every_backend(
        pytester: pytest.Pytester, agent_image: str, selection: tuple[str, str, int, int],
        monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    backend, keyword, passed, failed = selection
    if backend == "krun-direct":
        monkeypatch.setenv("AGENTBOX_LIBKRUN_LIBRARY", str(request.getfixturevalue("libkrun_standin")))
    pytester.makepyfile(test_their_image=INNER.format(image=agent_image))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--agentbox-backend", backend, "-k", keyword,
                                           timeout=1800)
    out = result.stdout.str()
    result.assert_outcomes(passed=passed, failed=failed)
    if failed:
        assert "image contract: 9 failure(s)" in out, out[-4000:]
        for line in ("- user: the shell runs as agent (uid 2000, gid 2000); expected dev (uid 1000, gid 1000)",
                     "- user: the image's passwd has no user dev",
                     "- home: $HOME is /home/agent; expected /home/dev",
                     "- workdir: a shell starts in /work; expected /workspace"):
            assert line in out, out[-4000:]


def test_the_container_cli_shell_starts_as_the_image_user_in_its_workdir(agent_image: str, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    os.chown(project, AGENT.uid, AGENT.gid)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "HOME": str(tmp_path / "home")}
    # no command: the login shell (fish -l), which drops to the image user, reads the script from stdin
    proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "container", "--image", agent_image],
                          input="id -un; pwd; echo $HOME; touch made-here\n", capture_output=True, text=True,
                          timeout=900, cwd=project, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["agent", "/work", "/home/agent"], proc.stdout
    st = (project / "made-here").stat()
    assert (st.st_uid, st.st_gid) == (AGENT.uid, AGENT.gid)


@pytest.mark.parametrize("agentbox_image", [TAG], indirect=True)
def test_a_running_container_task_names_the_image_user_attach_uses(agent_image: str, agentbox_image: str,
                                                                   container_task) -> None:  # type: ignore[no-untyped-def]
    """``agentbox attach`` into a container-mode task reads the user from the container's labels."""
    container = guest_registry.find(container_task.guest_id).container
    assert container and image_user(container, kind="container") == AGENT
    assert container_task.succeed("id -un; pwd", timeout=60).split() == ["agent", "/work"]
