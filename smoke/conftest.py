"""The operator checklists as executable suites (``./harness smoke`` runs them).

Every test uses the public fixtures only. At the end, a summary table lists
the backend, the accelerator and the outcome of every checklist item.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from agentbox_harness.machine import BOOTS

HOST_REPLY = "reached-the-host\n"


class _Reply(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # the http.server API names it
        body = HOST_REPLY.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class HostHttp:
    """HTTP servers on this host for outbound checks, each answering every GET with :attr:`reply`."""

    reply = HOST_REPLY

    def __init__(self) -> None:
        self.servers: list[http.server.ThreadingHTTPServer] = []

    def serve(self, address: str) -> int:
        """Start a server bound to ``address`` on a free port; the port."""
        server = http.server.ThreadingHTTPServer((address, 0), _Reply)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return int(server.server_address[1])

    @staticmethod
    def outward_ip_or_none() -> str | None:
        """This host's address on its default route (only the route lookup happens; no packet is
        sent); None when it has no default route."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(("192.0.2.1", 9))  # TEST-NET-1
                return str(s.getsockname()[0])
            except OSError:
                return None

    @classmethod
    def outward_ip(cls) -> str:
        """:meth:`outward_ip_or_none`, skipping the test when the host has no default route."""
        ip = cls.outward_ip_or_none()
        if ip is None:
            pytest.skip("this host has no default route: no outward address for a guest to reach")
        return ip

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def host_http() -> Iterator[HostHttp]:
    """:class:`HostHttp`: ``host_http.serve(address)`` starts a server and returns its port; all stop
    afterwards."""
    servers = HostHttp()
    yield servers
    servers.close()


RESULTS: list[tuple[str, str, float]] = []
SETUP: dict[str, float] = {}
STARTED = time.monotonic()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "setup":
        SETUP[report.nodeid] = report.duration  # boots happen here: the summary shows them
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        RESULTS.append((report.nodeid, report.outcome, report.duration))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    smoke = [r for r in RESULTS if r[0].startswith("smoke/")]
    if not smoke:
        return
    from agentbox_harness.session import harness

    h = harness(config)
    tr = terminalreporter
    tr.section("agentbox smoke summary")
    tr.write_line(f"backend: {h.backend}   accelerator: {h.accelerator}   timeout scale: {h.timeout_scale}")
    width = max(len(n) for n, _, _ in smoke)
    tr.write_line(f"{'item':<{width}}  {'outcome':<8} {'setup':>7} {'call':>7}")
    for nodeid, outcome, duration in smoke:
        tr.write_line(f"{nodeid:<{width}}  {outcome:<8} {SETUP.get(nodeid, 0.0):6.1f}s {duration:6.1f}s")
    counts = {o: sum(1 for _, oo, _ in smoke if oo == o) for o in ("passed", "skipped", "failed")}
    boots = "" if hasattr(config, "workerinput") or config.getoption("numprocesses", None) else \
        f", {BOOTS['started']} guest boots ({BOOTS['restore']} restored, {BOOTS['cold']} cold)"
    tr.write_line(f"total: {counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed "
                  f"in {time.monotonic() - STARTED:.0f}s{boots}")
