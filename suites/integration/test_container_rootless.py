"""Rootless container mode: the merged /nix lives in Podman's rootless namespace.

Runs the overlay code as a throw-away non-root user created by the test:
the image mount must fall back to ``podman unshare``, fuse-overlayfs must
mount inside that namespace (invisible to the host's), a rootless task must
see the merged ``/nix`` there, and the unshare unmount must remove it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbox_runtime.container import host_conf

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("podman") is None,
    reason="creating a rootless test user needs root, useradd and podman")

SCRIPT = """
import os, subprocess
from pathlib import Path
from agentbox_runtime.container.overlay import is_mounted, mount_image, mount_overlay, unmount_image, unmount_overlay
from agentbox_runtime.podman import Podman
from agentbox_runtime.container.state_file import MountMode
p = Podman()
root = Path({root!r})
up, wk, mg = (root / n for n in ("nix-upper", "nix-work", "nix-merged"))
for d in (up, wk, mg):
    d.mkdir(parents=True, exist_ok=True)
m = mount_image(p, {image!r})
print("mode", m.mode.value)
mount_overlay(p, m.mode, m.lowerdir, up, wk, mg)
print("unshare-mounted", is_mounted(p, mg, MountMode.UNSHARE))
print("host-mounted", is_mounted(p, mg, MountMode.DIRECT))
r = p.capture(["run", "--rm", "--network", "none", "--userns", "keep-id", "--volume", f"{{mg}}:/nix:ro",
               {image!r}, "sh", "-c", "test -d /nix/store && id -u && touch /nix/x 2>/dev/null || echo ro"])
print("task", r.returncode, r.stdout.split(), r.stderr.strip()[-300:])
unmount_overlay(p, mg, MountMode.UNSHARE)
print("after-unmount", is_mounted(p, mg, MountMode.UNSHARE))
unmount_image(p, {image!r})
"""


@pytest.fixture
def rootless_user(tmp_path: Path) -> Iterator[str]:
    name = f"abx{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-m", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        _kill_processes_of(name)  # e.g. rootless podman's pause process, by pid
        subprocess.run(["userdel", "-r", name], capture_output=True)


def _kill_processes_of(user: str) -> None:
    import pwd
    import signal
    uid = pwd.getpwnam(user).pw_uid
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if proc.stat().st_uid == uid:
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue


def test_rootless_overlay_lives_in_the_unshare_namespace(rootless_user: str, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    image = os.environ.get("AGENTBOX_TEST_IMAGE") or _root_image()
    home = Path(f"/home/{rootless_user}")
    conf = host_conf.ensure(home / "containers.conf")
    shutil.chown(conf, rootless_user, rootless_user)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CONTAINERS_CONF": str(conf),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    def as_user(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", rootless_user, "--", *argv], env=env, cwd=home,
                              capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]
    probe = as_user("podman", "unshare", "true")
    if probe.returncode != 0:
        pytest.skip(f"rootless podman refused here: {probe.stderr.strip()[-300:]}")
    fuse = as_user("sh", "-c", "test -r /dev/fuse && test -w /dev/fuse")
    if fuse.returncode != 0:
        mode = oct(os.stat("/dev/fuse").st_mode & 0o777)
        pytest.skip(f"/dev/fuse is mode {mode} here, so a non-root user cannot mount "
                    "fuse-overlayfs (rootless container mode needs it readable and writable)")
    saved = subprocess.run(["podman", "save", image], capture_output=True, check=True).stdout
    load = as_user("podman", "load", input=saved.decode("latin-1"), encoding="latin-1")
    assert load.returncode == 0, load.stderr
    root = home / "state"
    script = textwrap.dedent(SCRIPT.format(root=str(root), image=image))
    res = as_user(sys_python(), "-c", script)
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    assert res.returncode == 0, res.stdout + res.stderr
    assert lines["mode"] == "unshare"
    assert lines["unshare-mounted"] == "True"
    assert lines["host-mounted"] == "False"
    assert lines["task"].startswith("0 ["), lines["task"]
    assert "'ro'" in lines["task"] and f"'{os.getuid()}'" not in lines["task"]
    assert lines["after-unmount"] == "False"


def sys_python() -> str:
    """The interpreter running the tests (the venv's python)."""
    import sys
    return sys.executable


def _root_image() -> str:
    if subprocess.run(["podman", "image", "exists", "localhost/agentbox:latest"]).returncode == 0:
        return "localhost/agentbox:latest"
    from container_test_image import build_test_image
    return build_test_image()
