"""Host -> guest TCP forwards added to a running qemu guest, on 127.0.0.1 only.

qemu's user-mode netdev (:data:`agentbox_runtime.vmm.qemu.NETDEV_ID`) forwards a host port to a
guest port with a ``hostfwd`` rule. :func:`add` adds one while the guest runs: the monitor
command ``hostfwd_add <netdev> tcp:127.0.0.1:<host>-:<guest>``, sent over QMP as
``human-monitor-command``. That command succeeds at the QMP level even when the rule is refused
(a port in use, say): the monitor's output is then the error, so any output is a failure.

The guest side of the rule has no address, so qemu connects to the guest's DHCP address
(10.0.2.15): a guest server must listen there or on 0.0.0.0, not on its 127.0.0.1.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from agentbox_runtime.errors import AgentboxError, InputError
from agentbox_runtime.vmm.qemu import NETDEV_ID

HOST_ADDR = "127.0.0.1"
"""Forwards listen here only: never on 0.0.0.0, where another host could reach the guest."""
PICK_TRIES = 3
"""How often a picked free port is tried again when another process took it first."""

Qmp = Callable[..., Any]
"""A QMP runner: ``qmp(command, arguments)`` returns the command's result (``QemuHandle.qmp``)."""


class HostfwdError(AgentboxError):
    """qemu refused the forward; the message names the ports and what qemu said."""


def check_port(port: int, what: str) -> int:
    """``port`` when it is a TCP port number (1-65535); otherwise one clear :class:`InputError`."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError(f"{what} {port!r} is not accepted: give a TCP port number from 1 to 65535")
    return port


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind((HOST_ADDR, 0))
        return int(s.getsockname()[1])


def add(qmp: Qmp, guest_port: int, host_port: int | None = None, *, netdev: str = NETDEV_ID) -> int:
    """Forward ``127.0.0.1:host_port`` on the host to ``guest_port`` in the guest; the host port.

    ``host_port`` None picks a free one (tried again, up to :data:`PICK_TRIES` times, if another
    process takes it between the pick and qemu's bind). Raises :class:`HostfwdError` when qemu
    refuses the rule, naming the ports and qemu's words."""
    check_port(guest_port, "guest port")
    if host_port is not None:
        check_port(host_port, "host port")
    said = ""
    port = 0
    for _ in range(1 if host_port is not None else PICK_TRIES):
        port = host_port if host_port is not None else free_port()
        rule = f"tcp:{HOST_ADDR}:{port}-:{guest_port}"
        said = str(qmp("human-monitor-command", {"command-line": f"hostfwd_add {netdev} {rule}"}) or "").strip()
        if not said:
            return port
    raise HostfwdError(f"qemu did not forward {HOST_ADDR}:{port} to guest port {guest_port}: "
                       f"{' '.join(said.split())}")
