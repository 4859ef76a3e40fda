"""libkrun mode (``agentbox libkrun``: Podman with the krun handler) beyond the shared items.

The items shared with the microvm checklist run on krun-podman too (``krun_podman_too``);
these are libkrun mode's own: a published port reaching a server in the guest (reference
6.5), and the container labels and annotations the live-disk probe reads (5.3)."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request

import pytest

from agentbox_harness.wait import retry
from agentbox_runtime.vmm.krun_guest import libkrun_disk_serial

pytestmark = pytest.mark.vm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_published_port_reaches_a_server_in_the_guest(krun_task_factory):
    port = free_port()
    task = krun_task_factory("web", publish=[f"127.0.0.1:{port}:8000"])
    task.succeed("mkdir -p /tmp/www && echo served-by-the-guest > /tmp/www/index.html && "
                 "cd /tmp/www && setsid -f python3 -m http.server 8000 >/dev/null 2>&1", timeout=30)
    task.wait_until_succeeds(["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 8000), 2)"],
                             timeout=60)
    bodies: list[str] = []

    def served(_last_try: bool) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=3) as resp:
                bodies.append(resp.read().decode())
            return True
        except OSError:
            return False

    retry(served, timeout=60, interval=0.5)
    body = bodies[-1]
    assert body.strip() == "served-by-the-guest"


def test_the_task_carries_the_krun_annotations_the_live_disk_probe_reads(krun_task, workspace):
    name = krun_task.container
    fmt = "{{json .Config.Annotations}}"
    annotations = json.loads(subprocess.run(["podman", "inspect", "--format", fmt, name], capture_output=True,
                                            text=True, timeout=60, check=True).stdout)
    state_root = workspace.state.state_root
    assert annotations["run.oci.handler"] == "krun"
    assert annotations["krun.disk.0.path"] == str(state_root / "libkrun-nix.raw")
    assert annotations["krun.disk.1.path"] == str(state_root / "libkrun-containers.raw")
    assert {annotations["krun.disk.0.id"], annotations["krun.disk.1.id"]} == {"agentbox-nix", "agentbox-containers"}
    # libkrun names a disk by its image file (st_dev, st_rdev, st_ino), never by krun.disk.N.id
    assert krun_task.succeed("for d in vda vdb; do echo $(cat /sys/block/$d/serial); done", timeout=30).split() == \
        [libkrun_disk_serial(annotations[f"krun.disk.{i}.path"]) for i in (0, 1)]
