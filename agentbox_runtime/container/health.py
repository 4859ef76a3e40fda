"""The sidecar socket health probe (reference 8.5).

A probe container connects to the sidecar's published proxy port
(``TCP:host.containers.internal:<port>``) through a socat Unix socket and
runs ``nix store ping`` against it, so a healthy result proves the whole
path: published port, socat proxy, daemon socket and nix-daemon. Bounded:
``attempts`` tries, ``interval_s`` apart, each Podman call with a timeout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from agentbox_guest_init.contract import LABEL_HARNESS_RUN, NIX_DAEMON_SOCKET
from agentbox_runtime.container import podman_api
from agentbox_runtime.container.names import PROXY_PORT
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.podman import Podman

DEFAULT_ATTEMPTS = 30
DEFAULT_INTERVAL_S = 0.2

_PROBE_SCRIPT = """\
set -u
sock="$(mktemp -u /tmp/agentbox-nix-health.XXXXXX).sock"
socat UNIX-LISTEN:"$sock",fork TCP:host.containers.internal:{port} &
pid=$!
i=0
while [ ! -S "$sock" ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -S "$sock" ]; then echo "socat did not create $sock within 5s" >&2; kill "$pid"; exit 1; fi
nix --extra-experimental-features nix-command store ping --store "unix://$sock"
rc=$?
kill "$pid" 2>/dev/null
exit "$rc"
"""


@dataclass(frozen=True)
class ProbeAttempt:
    """What one probe attempt saw."""

    socket_exists: bool
    port_listening: bool
    ok: bool
    output: str


def probe_script(port: int) -> str:
    """The shell script the probe container runs for host port ``port``."""
    return _PROBE_SCRIPT.format(port=port)


def probe_argv(image: str, port: int, run_label: str | None = None,
               rootless: bool | None = None) -> list[str]:
    """``podman run`` arguments of one probe container.

    ``--userns keep-id`` (reference) is used only with rootless Podman:
    rootful Podman refuses it ("keep-id is only supported in rootless mode").
    """
    rootless = os.geteuid() != 0 if rootless is None else rootless
    argv = ["run", "--rm"]
    if rootless:
        argv += ["--userns", "keep-id"]
    if run_label:
        argv += ["--label", f"{LABEL_HARNESS_RUN}={run_label}"]
    return [*argv, image, "bash", "-lc", probe_script(port)]


def port_listening(podman: Podman, sidecar: str) -> bool:
    """Whether the proxy listens on ``PROXY_PORT`` inside the sidecar."""
    proc = podman.capture(["exec", sidecar, "bash", "-c",
                           f"echo >/dev/tcp/127.0.0.1/{PROXY_PORT}"])
    return proc.returncode == 0


def probe_once(podman: Podman, sidecar: str, merged: str, image: str, port: int,
               run_label: str | None = None) -> ProbeAttempt:
    """Run one probe attempt against the sidecar's published ``port``."""
    socket_path = os.path.join(merged, NIX_DAEMON_SOCKET.removeprefix("/nix/"))
    exists = os.path.exists(socket_path)
    listening = port_listening(podman, sidecar)
    proc = podman.capture(probe_argv(image, port, run_label))
    text = (proc.stdout + proc.stderr).strip()
    return ProbeAttempt(exists, listening, proc.returncode == 0,
                        text or f"exit status {proc.returncode}")


def wait_healthy(podman: Podman, sidecar: str, merged: str, image: str, port: int,
                 run_label: str | None = None, attempts: int = DEFAULT_ATTEMPTS,
                 interval_s: float = DEFAULT_INTERVAL_S) -> ProbeAttempt:
    """Probe until healthy or ``attempts`` are used; return the last attempt."""
    last = ProbeAttempt(False, False, False, "no probe attempt ran")
    for i in range(attempts):
        last = probe_once(podman, sidecar, merged, image, port, run_label)
        if last.ok:
            return last
        if i + 1 < attempts:
            time.sleep(interval_s)
    return last


def state_line(state: Mapping[str, object]) -> str:
    """``running=... status=... exit_code=... error=... oom_killed=...`` of an inspected ``State``
    (the words ``podman inspect --format`` prints: ``true``/``false`` for booleans)."""
    def word(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value if value is not None else "")
    return " ".join(f"{key}={word(state.get(field))}" for key, field in (
        ("running", "Running"), ("status", "Status"), ("exit_code", "ExitCode"), ("error", "Error"),
        ("oom_killed", "OOMKilled")))


def collect_diagnostics(sidecar: str) -> tuple[int, str, str]:
    """(logs status: 0 when read, last 120 log lines or why not, state line or why not) of ``sidecar``.

    Call it before the sidecar is removed; the result feeds
    :func:`render_failure`.
    """
    try:
        logs_status, logs = 0, podman_api.logs(sidecar, tail=120).rstrip()
    except AgentboxError as exc:
        logs_status, logs = 1, str(exc)
    try:
        attrs = podman_api.container_inspect(sidecar)
        state = state_line(attrs.get("State") or {}) if attrs else f"no container '{sidecar}'"
    except AgentboxError as exc:
        state = str(exc)
    return logs_status, logs, state


def render_failure(sidecar: str, merged: str, last: ProbeAttempt, cleanup_error: str | None,
                   logs_status: int, logs: str, state: str) -> str:
    """The reference error text for a sidecar that never became connectable.

    ``cleanup_error`` is ``None`` when the automatic cleanup succeeded; the
    log and state parts come from :func:`collect_diagnostics`.
    """
    if cleanup_error is None:
        summary = "removed the sidecar and unmounted the merged /nix"
        tail = (f" Automatic cleanup completed; retrying should not require manual "
                f"'{merged}' removal.")
    else:
        summary = f"automatic cleanup failed ({cleanup_error})"
        tail = (f" The merged mount '{merged}' could not be cleaned automatically; remove it "
                "before retrying.")
    text = (f"nix-daemon proxy for socket '{NIX_DAEMON_SOCKET}' was not connectable after "
            f"startup for sidecar '{sidecar}'; {summary}.{tail}")
    if logs_status == 0:
        text += f"\nrecent sidecar logs:\n{logs}"
    else:
        text += (f"\nsidecar logs unavailable ({logs}); this usually means the sidecar "
                 "terminated before logs could be collected.")
    yes = {True: "yes", False: "no"}
    return (text + f"\nsidecar state: {state}\nsocket probe failure: {last.output}"
            f"\nhost socket path exists: {yes[last.socket_exists]}"
            f"\nproxy port {PROXY_PORT} listening: {yes[last.port_listening]}")
