"""Container mode against real rootful Podman, fuse-overlayfs and nix-daemon.

Each test gets its own workspace, state root and harness run label; teardown
removes every container with that label, the sidecar stack and the FUSE
mounts, also when the test failed.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentbox_guest_init.contract import LABEL_HARNESS_RUN, LABEL_ROLE, LABEL_SIDECAR, NIX_REMOTE_VALUE
from agentbox_runtime.container import host_conf
from agentbox_runtime.container.lifecycle import run_task, start_sidecar_only
from agentbox_runtime.container.machine_transport import (
    ContainerTransport, ExecTimeout, detached_argv, start_task, stop_task,
)
from agentbox_runtime.container.names import SIDECAR_PREFIX
from agentbox_runtime.container.overlay import mountinfo_has
from agentbox_runtime.container.podman_api import container_running
from agentbox_runtime.container.sidecar import Sidecar, SidecarRequest, teardown_stack
from agentbox_runtime.podman import Podman
from container_test_image import build_test_image

pytestmark = pytest.mark.skipif(
    shutil.which("podman") is None or shutil.which("fuse-overlayfs") is None
    or shutil.which("buildah") is None,
    reason="container mode needs podman, buildah and fuse-overlayfs on PATH")


@pytest.fixture(scope="module", autouse=True)
def _host_podman_conf() -> Iterator[None]:
    """Point every podman call at the harness containers.conf (runc, ulimits)."""
    old = os.environ.get(host_conf.ENV)
    os.environ[host_conf.ENV] = str(host_conf.ensure())
    yield
    if old is None:
        os.environ.pop(host_conf.ENV, None)
    else:
        os.environ[host_conf.ENV] = old


@pytest.fixture(scope="module")
def image(_host_podman_conf: None) -> str:
    """AGENTBOX_TEST_IMAGE, else localhost/agentbox:latest if built, else a host-binary image."""
    explicit = os.environ.get("AGENTBOX_TEST_IMAGE")
    if explicit:
        return explicit
    if subprocess.run(["podman", "image", "exists", "localhost/agentbox:latest"]).returncode == 0:
        return "localhost/agentbox:latest"
    return build_test_image()


@dataclass
class Env:
    podman: Podman
    req: SidecarRequest
    workspace: Path
    run_label: str

    def task_argv(self, sidecar: Sidecar, name: str, script: str) -> list[str]:
        """A task like reference 8.2 (merged /nix read-only, daemon socket, labels)."""
        return ["run", "--rm", "-i", "--name", name,
                "--volume", f"{self.workspace}:/workspace", "--workdir", "/workspace",
                "--volume", f"{sidecar.merged}:/nix:ro", "--env", f"NIX_REMOTE={NIX_REMOTE_VALUE}",
                "--label", f"{LABEL_ROLE}=task", "--label", f"{LABEL_SIDECAR}={sidecar.name}",
                "--label", f"{LABEL_HARNESS_RUN}={self.run_label}",
                self.req.image, "bash", "-c", script]

    def run(self, script: str, stderr: io.StringIO | None = None) -> int:
        name = f"{self.req.slug}-{uuid.uuid4().hex[:16]}"
        return run_task(self.podman, self.req, name,
                        lambda sc: self.task_argv(sc, name, script), stderr=stderr)

    def sidecars(self) -> list[str]:
        out = self.podman.output(["ps", "-a", "--filter", f"name={SIDECAR_PREFIX}{self.req.slug}-",
                                  "--format", "{{.Names}}"], "ps")
        return out.split()

    def merged_mounted(self) -> bool:
        return mountinfo_has(Path("/proc/self/mountinfo").read_text(), str(self.req.merged))


@pytest.fixture
def env(tmp_path: Path, image: str) -> Iterator[Env]:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    slug = f"ct{uuid.uuid4().hex[:8]}"
    label = f"pytest-{uuid.uuid4().hex[:12]}"
    podman = Podman()
    req = SidecarRequest(image=image, canonical_cwd=str(workspace), slug=slug,
                         state_root=tmp_path / "state", run_label=label)
    e = Env(podman, req, workspace, label)
    try:
        yield e
    finally:
        ids = podman.capture(["ps", "-aq", "--filter", f"label={LABEL_HARNESS_RUN}={label}"])
        if ids.stdout.split():
            podman.capture(["rm", "-f", "-t", "0", *ids.stdout.split()])
        teardown_stack(podman, req)
        assert not e.merged_mounted(), "teardown left the merged /nix mounted"


def test_task_sees_read_only_nix_and_adds_to_the_store_through_the_daemon(env: Env) -> None:
    script = ("set -e; echo hello-from-task > /tmp/payload; "
              "if touch /nix/should-fail 2>/dev/null; then echo writable > /workspace/ro; fi; "
              "test -S /nix/var/nix/daemon-socket/socket; "
              "nix-store --add /tmp/payload > /workspace/path")
    assert env.run(script) == 0
    assert not (env.workspace / "ro").exists(), "/nix was writable inside the task"
    store_path = (env.workspace / "path").read_text().strip()
    assert store_path.startswith("/nix/store/") and store_path.endswith("-payload")
    # a second task (fresh sidecar after the idle cleanup) sees the path in the store
    assert env.run(f"cat {store_path} > /workspace/seen; nix-store --verify-path {store_path}") == 0
    assert (env.workspace / "seen").read_text() == "hello-from-task\n"
    # the write persisted in nix-upper, outside any container
    assert (env.req.upper / store_path.removeprefix("/nix/")).read_text() == "hello-from-task\n"


def _wait_for(path: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout_s}s")
        time.sleep(0.1)


def test_concurrent_tasks_share_one_sidecar_that_outlives_the_first(env: Env) -> None:
    results: dict[str, int] = {}

    def task(tag: str) -> None:
        script = (f"touch /workspace/{tag}.started; "
                  f"while [ ! -e /workspace/{tag}.release ]; do sleep 0.1; done; "
                  f"nix-store --add /workspace/{tag}.started > /workspace/{tag}.path")
        results[tag] = env.run(script)

    threads = {tag: threading.Thread(target=task, args=(tag,)) for tag in ("a", "b")}
    try:
        threads["a"].start()
        _wait_for(env.workspace / "a.started")
        threads["b"].start()
        _wait_for(env.workspace / "b.started")
        assert len(env.sidecars()) == 1
        sidecar = env.sidecars()[0]
        tasks = env.podman.output(["ps", "--filter", f"label={LABEL_SIDECAR}={sidecar}",
                                   "--format", "{{.ID}}"], "ps").split()
        assert len(tasks) == 2
        (env.workspace / "a.release").touch()
        threads["a"].join(timeout=120)
        assert results.get("a") == 0
        # b still runs: the sidecar and the merged mount stay
        assert container_running(sidecar)
        assert env.merged_mounted()
    finally:
        (env.workspace / "a.release").touch()
        (env.workspace / "b.release").touch()
        for t in threads.values():
            if t.is_alive() or t.ident is not None:
                t.join(timeout=120)
    assert results.get("b") == 0
    assert (env.workspace / "b.path").read_text().startswith("/nix/store/")
    # the last task is gone: so are the sidecar and its FUSE mount
    assert env.sidecars() == []
    assert not env.merged_mounted()


def test_corrupted_state_file_is_rebuilt(env: Env) -> None:
    first = start_sidecar_only(env.podman, env.req)
    env.req.state_file.write_text("image=only-this\nmount_mode=sideways\n")
    err = io.StringIO()
    assert env.run("nix-store --add /etc/passwd > /workspace/p", stderr=err) == 0
    assert err.getvalue().startswith(
        f"agentbox: ignored stale sidecar state '{env.req.state_file}'; recreating sidecar stack "
        f"(unsupported mount_mode 'sideways' in '{env.req.state_file}')")
    assert (env.workspace / "p").read_text().startswith("/nix/store/")
    again = start_sidecar_only(env.podman, env.req)
    assert again.name == first.name
    text = env.req.state_file.read_text()
    assert f"sidecar_name={first.name}\n" in text and "mount_mode=direct\n" in text
    # the lost state held the first stack's image-mount reference: release it here
    # (the runtime cannot: without state it cannot know the reference is its own)
    env.podman.output(["image", "unmount", env.req.image], "podman image unmount")


def test_killed_sidecar_is_detected_and_replaced(env: Env) -> None:
    sidecar = start_sidecar_only(env.podman, env.req)
    old_id = env.podman.output(["inspect", "--format", "{{.Id}}", sidecar.name], "inspect").strip()
    env.podman.output(["kill", sidecar.name], "kill")
    assert not container_running(sidecar.name)
    assert env.run("nix-store --add /etc/group > /workspace/p") == 0
    assert (env.workspace / "p").read_text().startswith("/nix/store/")
    replacement = start_sidecar_only(env.podman, env.req)
    assert replacement.name == sidecar.name and not replacement.reused
    new_id = env.podman.output(["inspect", "--format", "{{.Id}}", sidecar.name], "inspect").strip()
    assert new_id != old_id


def test_sidecar_only_start_is_reused_while_healthy(env: Env) -> None:
    first = start_sidecar_only(env.podman, env.req)
    second = start_sidecar_only(env.podman, env.req)
    assert (first.reused, second.reused) == (False, True)
    assert second.name == first.name and second.proxy_port == first.proxy_port
    assert env.merged_mounted()


def test_machine_transport_runs_commands_in_a_detached_task(env: Env) -> None:
    name = f"{env.req.slug}-{uuid.uuid4().hex[:16]}"
    sidecar = start_task(env.podman, env.req,
                         lambda sc: detached_argv(env.task_argv(sc, name, "true"), env.req.image))
    try:
        box = ContainerTransport(name, env.podman, env={"BASE": "b"})
        res = box.execute("echo $BASE $EXTRA; pwd; id -u; echo oops >&2; exit 3",
                          env={"EXTRA": "x"}, cwd="/nix", user="1000")
        assert (res.status, res.stdout, res.stderr) == (3, "b x\n/nix\n1000\n", "oops\n")
        assert box.execute(["cat"], stdin=b"fed via stdin").stdout == "fed via stdin"
        added = box.execute("echo t > /tmp/t && nix-store --add /tmp/t")
        assert added.status == 0 and added.stdout.startswith("/nix/store/"), added
        with pytest.raises(ExecTimeout) as err:
            box.execute("echo started; sleep 30", timeout=2)
        assert "started" in err.value.stdout
        assert container_running(sidecar.name)
    finally:
        removed = stop_task(env.podman, env.req, sidecar, name)
    assert removed and env.sidecars() == [] and not env.merged_mounted()
