"""The port, crash and console verbs on a real guest of every backend (issue 26).

One machine per backend covers them all, in the order a user would meet them: a guest serves HTTP
(the image's ``python3 -m http.server``), ``wait_for_open_port`` sees it from inside the guest,
``forward_port`` makes it reachable from the host's 127.0.0.1 and the host fetches a page (qemu: a
hostfwd added over QMP while the guest runs; krun-podman and container: the port published at
start), the server stops and ``wait_for_closed_port`` sees that; the guest writes to its kernel log
and ``wait_for_console_text`` finds it on the console; ``crash`` kills the VMM (or the task) and the
next verb fails in one line. A backend without a capability must refuse the verb in one line
naming it (krun-direct has no port forward, the Podman backends no kernel console).
"""

from __future__ import annotations

import os
import subprocess
import urllib.request

import pytest

from agentbox_harness.machine import Machine, MachineError
from agentbox_runtime.backend_caps import BACKEND_NAMES, caps
from agentbox_runtime.retry import retry

pytestmark = [pytest.mark.vm, pytest.mark.slow]

GUEST_PORT = 8000
SERVE = (f"mkdir -p /tmp/www && echo served-by-the-guest > /tmp/www/index.html && cd /tmp/www && "
         f"setsid -f python3 -m http.server {GUEST_PORT} >/tmp/www.log 2>&1")


def fetch(port: int) -> str:
    """The guest's page through the host's 127.0.0.1:``port`` (retried: a forward's first
    connection can race the guest's accept)."""
    bodies: list[str] = []

    def served(_last_try: bool) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=5) as resp:
                bodies.append(resp.read().decode())
            return True
        except OSError:
            return False

    retry(served, timeout=60, interval=0.5)
    return bodies[-1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def task_running(name: str) -> bool:
    out = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", name], capture_output=True,
                         text=True, timeout=60, check=False)
    return out.returncode == 0 and out.stdout.strip() == "true"


def check_ports(m: Machine) -> None:
    m.succeed(SERVE, timeout=30)
    m.wait_for_open_port(GUEST_PORT, timeout=60)
    if m.capabilities.port_forward:
        host_port = m.forward_port(GUEST_PORT)
        assert fetch(host_port).strip() == "served-by-the-guest"
    else:
        with pytest.raises(MachineError, match=f"forward_port is not available on the {m.backend} backend "
                                               r"\(it has no 'port_forward' capability"):
            m.forward_port(GUEST_PORT)
    m.succeed(f"pkill -f 'http[.]server {GUEST_PORT}'", user="root")  # [.]: not this sh -c itself
    m.wait_for_closed_port(GUEST_PORT, timeout=60)
    with pytest.raises(MachineError, match=f"TCP port {GUEST_PORT} on 127.0.0.1 is not open in the guest"):
        m.wait_for_open_port(GUEST_PORT, timeout=3)


def check_console(m: Machine) -> None:
    if not m.capabilities.console:
        with pytest.raises(MachineError, match=f"wait_for_console_text is not available on the {m.backend} "
                                               r"backend \(it has no 'console' capability"):
            m.wait_for_console_text("anything")
        return
    # level 2 (crit): above the guest's quiet loglevel=3, so the kernel prints it on its console
    m.succeed("echo '<2>agentbox-verbs-probe first' > /dev/kmsg && echo '<2>agentbox-verbs-probe second' > /dev/kmsg",
              user="root")
    assert m.wait_for_console_text(r"agentbox-verbs-probe \w+", timeout=60) == "agentbox-verbs-probe first"
    assert m.wait_for_console_text(r"agentbox-verbs-probe \w+", timeout=60) == "agentbox-verbs-probe second"
    # the whole log, across lines (the serial console's \r\n reads as \n)
    assert m.wait_until_console_matches(r"probe first\s+^.*probe second$", timeout=10)


def check_crash(m: Machine) -> None:
    pid = m.vmm_pid
    task = getattr(m, "container", "") or getattr(m, "_name", "")
    m.crash()
    with pytest.raises(MachineError) as err:
        m.succeed("true")
    assert str(err.value) == (f"{m.name}: the guest is gone (crashed by crash()); 'succeed' cannot run: "
                              "restart() boots it again")
    if pid is not None:
        assert not alive(pid), f"VMM {pid} still runs after crash()"
    else:
        assert task and not task_running(task), f"task {task} still runs after crash()"
    assert m.preserve_live() is None  # --preserve-debug keeps no crashed guest running
    m.shutdown()  # what the teardown does: no request to the guest, only clean-up
    notes = " ".join(getattr(m, "stop_notes", []))
    assert "poweroff" not in notes and "graceful" not in notes, notes


@pytest.fixture(params=BACKEND_NAMES)
def agentbox_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each backend in turn; krun-direct through the libkrun stand-in, chosen on purpose (as the
    ``vm_backend`` fixture of ``suites/conftest.py`` does)."""
    if request.param == "krun-direct":
        monkeypatch.setenv("AGENTBOX_LIBKRUN_LIBRARY", str(request.getfixturevalue("libkrun_standin")))
        monkeypatch.setenv("AGENTBOX_ALLOW_STANDINS", "1")
    return str(request.param)


def test_ports_console_and_crash_on_a_real_guest(agentbox_backend: str, machine_factory) -> None:  # type: ignore[no-untyped-def]
    publish = (f"127.0.0.1::{GUEST_PORT}",) if caps(agentbox_backend).publish else ()
    m = machine_factory("verbs", **({"publish": publish} if publish else {}))
    check_ports(m)
    check_console(m)
    check_crash(m)
