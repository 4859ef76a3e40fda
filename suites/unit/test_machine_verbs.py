"""The port, crash and console verbs without a guest: their checks, waits and one-line errors.

The machine here runs its commands on the host (the host's own ``/proc/net/tcp`` is real), and
``hostfwd`` talks to a real qemu that boots nothing (``-S``). The same verbs on real guests are in
``suites/vm/test_machine_verbs_vm.py``."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentbox_harness import ports
from agentbox_harness.console import Console, ConsoleError
from agentbox_harness.machine import Machine, MachineError, Result
from agentbox_runtime.errors import InputError
from agentbox_runtime.retry import retry
from agentbox_runtime.vmm import hostfwd, qmp
from agentbox_runtime.vmm.host import qemu_binary


@dataclass
class HostDouble(Machine):
    """Commands run on the host; ``crash`` only records that it was asked."""

    log: Path | None = None
    crashes: int = 0

    def _start(self) -> None:
        pass

    def _stop(self, timeout: float) -> None:
        pass

    @property
    def console_log(self) -> Path | None:
        return self.log

    def _crash(self) -> None:
        self.crashes += 1

    def _execute(self, argv: list[str], *, user: str | None, env: dict[str, str] | None, cwd: str | None,
                 timeout: float, stdin: bytes | None) -> Result:
        started = time.monotonic()
        p = subprocess.run(argv, input=stdin or b"", capture_output=True, timeout=timeout, cwd=cwd, check=False)
        return Result(" ".join(argv), p.returncode, p.stdout.decode(), p.stderr.decode(), time.monotonic() - started)


def listener(host: str = "127.0.0.1", family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family)
    s.bind((host, 0))
    s.listen()
    return s


def test_the_kernels_listen_table_is_read_as_addresses_and_ports() -> None:
    with listener() as s:
        port = s.getsockname()[1]
        table = Path("/proc/net/tcp").read_text()
        assert ("127.0.0.1", port) in ports.listening(table)
    assert ("127.0.0.1", port) not in ports.listening(Path("/proc/net/tcp").read_text())


@pytest.mark.skipif(not Path("/proc/net/tcp6").exists(), reason="no IPv6 on this host")
def test_ipv6_and_wildcard_listeners_serve_the_addresses_a_client_would_reach() -> None:
    with listener("::1", socket.AF_INET6) as s:
        port = s.getsockname()[1]
        found = ports.listening(Path("/proc/net/tcp6").read_text())
        assert ("::1", port) in found
        assert ports.serves(found, "::1", port) and not ports.serves(found, "127.0.0.1", port)
    wildcard = [("::", 8080)]
    assert ports.serves(wildcard, "127.0.0.1", 8080) and ports.serves(wildcard, "::1", 8080)
    assert not ports.serves([("10.0.2.15", 8080)], "127.0.0.1", 8080)
    assert ports.serves([("0.0.0.0", 8080)], "localhost", 8080)


def test_a_bad_address_is_one_clear_line() -> None:
    with pytest.raises(ValueError, match="address 'nowhere' is not accepted: give an IPv4 or IPv6 address"):
        ports.normalize("nowhere")


def test_wait_for_open_and_closed_port_follow_a_real_listener() -> None:
    m = HostDouble(name="h", backend="qemu", default_timeout=10)
    s = listener()
    port = s.getsockname()[1]
    m.wait_for_open_port(port)
    s.close()
    m.wait_for_closed_port(port)


def test_a_port_that_never_opens_fails_listing_the_listening_sockets() -> None:
    m = HostDouble(name="h", backend="qemu", default_timeout=1.5)
    with listener() as other, socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        free, listening = unused.getsockname()[1], other.getsockname()[1]
        with pytest.raises(MachineError) as err:
            m.wait_for_open_port(free)
    first = str(err.value).splitlines()[0]
    assert f"TCP port {free} on 127.0.0.1 is not open in the guest" in first
    assert f"127.0.0.1:{listening}" in first  # the last listening sockets seen


@pytest.mark.parametrize("bad", [0, 65536, "80", True])
def test_a_bad_port_is_one_clear_line(bad: Any) -> None:
    m = HostDouble(name="h", backend="qemu")
    with pytest.raises(InputError, match=f"port {bad!r} is not accepted: give a TCP port number from 1 to 65535"):
        m.forward_port(bad)


def test_a_verb_the_backend_lacks_names_the_backend_and_the_capability() -> None:
    m = HostDouble(name="h", backend="krun-direct")
    with pytest.raises(MachineError) as err:
        m.forward_port(8080)
    assert str(err.value) == ("h: forward_port is not available on the krun-direct backend (it has no "
                              "'port_forward' capability; see agentbox_runtime.backend_caps)")
    c = HostDouble(name="c", backend="container")
    with pytest.raises(MachineError, match="wait_for_console_text is not available on the container backend "
                                           r"\(it has no 'console' capability"):
        c.wait_for_console_text("x")


def test_after_crash_every_verb_says_the_guest_is_gone_until_a_new_start() -> None:
    m = HostDouble(name="h", backend="qemu")
    m.crash()
    m.crash()  # a second crash is a no-op, not a second kill
    assert m.crashes == 1
    with pytest.raises(MachineError) as err:
        m.succeed("true")
    assert str(err.value) == "h: the guest is gone (crashed by crash()); 'succeed' cannot run: restart() boots it again"
    assert "\n" not in str(err.value)
    with pytest.raises(MachineError, match="the guest is gone"):
        m.wait_for_open_port(80)
    m.shutdown()  # the teardown still runs
    m.start()
    assert m.succeed("echo back").strip() == "back"


def test_console_text_is_consumed_by_each_wait_as_the_nixos_driver_does(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"boot\r\nmarker one\r\nmarker two\r\n")  # a serial console's line ends
    m = HostDouble(name="h", backend="qemu", log=log, default_timeout=1.5)
    assert m.wait_for_console_text(r"marker \w+") == "marker one"
    assert m.wait_for_console_text(r"marker \w+") == "marker two"
    with pytest.raises(MachineError) as err:
        m.wait_for_console_text(r"marker \w+")  # both were consumed
    assert "waiting for 'marker \\\\w+' in new console output; console tail:" in str(err.value)
    assert "marker two" in str(err.value)  # the tail shows what was seen
    assert m.wait_until_console_matches(r"^marker one$") == "marker one"  # the whole log, consumes nothing
    with log.open("a") as f:
        f.write("marker three\n")
    assert m.wait_for_console_text(r"marker \w+") == "marker three"  # new output after the last match


def test_a_kernel_panic_ends_a_console_wait_at_once(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("boot\nKernel panic - not syncing: test\n")
    console = Console("h", log, default_timeout=60)
    started = time.monotonic()
    with pytest.raises(ConsoleError, match="console shows 'Kernel panic'"):
        console.wait_for_console_text("never")
    assert time.monotonic() - started < 30


@pytest.fixture
def qemu_netdev() -> Iterator[Path]:
    """A qemu that boots nothing, with the guest's user-mode netdev and QMP."""
    if shutil.which(qemu_binary()) is None:
        pytest.skip(f"needs {qemu_binary()}")
    d = Path(tempfile.mkdtemp(prefix="hostfwd-"))
    sock = d / "qmp.sock"
    proc = subprocess.Popen([qemu_binary(), "-S", "-nodefaults", "-no-user-config", "-display", "none",
                             "-netdev", f"user,id={hostfwd.NETDEV_ID}",
                             "-chardev", f"socket,id=qmp,path={sock},server=on,wait=off",
                             "-mon", "chardev=qmp,mode=control"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        retry(lambda _last: sock.exists(), timeout=30, interval=0.05)
        yield sock
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_hostfwd_listens_on_127_0_0_1_only_and_refusals_carry_qemus_words(qemu_netdev: Path) -> None:
    def run(command: str, arguments: dict[str, Any] | None = None) -> Any:
        return qmp.execute(qemu_netdev, command, arguments)

    port = hostfwd.add(run, 8080)
    found = ports.listening(Path("/proc/net/tcp").read_text())
    assert ("127.0.0.1", port) in found
    assert ("0.0.0.0", port) not in found
    assert hostfwd.add(run, 8081) != port  # a second pick is another free port
    with listener() as taken:
        busy = taken.getsockname()[1]
        with pytest.raises(hostfwd.HostfwdError) as err:
            hostfwd.add(run, 8082, busy)
    assert str(err.value).startswith(f"qemu did not forward 127.0.0.1:{busy} to guest port 8082: ")
    assert "\n" not in str(err.value)
