"""One QMP command at a time over qemu's monitor socket, through the maintained ``qemu.qmp`` library.

``qemu.qmp`` (the QEMU project's own client) does the protocol: the greeting, ``qmp_capabilities``
negotiation, events interleaved with replies, and parsing every reply. :func:`execute` connects,
runs one command and returns its ``return`` value; an ``error`` reply, a refused or closed socket
or no reply within ``timeout`` is a :class:`QmpError` that says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from agentbox_runtime.errors import AgentboxError

logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # its failures reach the caller as a QmpError


class QmpError(AgentboxError, OSError):
    """The QMP exchange failed (an ``OSError`` too, so a caller falling back to a signal can catch it)."""


async def _execute(path: Path, command: str, arguments: Mapping[str, object] | None, timeout: float) -> Any:
    client = QMPClient("agentbox")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        try:
            await asyncio.wait_for(client.connect(str(path)), timeout)
        except ConnectError as exc:
            raise QmpError(f"cannot connect to QMP at {path}: {exc.exc if exc.exc is not None else exc}") from None
        return await asyncio.wait_for(client.execute(command, arguments), max(0.0, deadline - loop.time()))
    except ExecuteError as exc:
        raise QmpError(f"QMP {command} failed: {exc.error_class}: {exc}") from None
    except ExecInterruptedError:
        raise QmpError(f"qemu closed the QMP socket before answering {command}") from None
    except TimeoutError:
        raise QmpError(f"no QMP reply to {command} from {path} within {timeout:g}s") from None
    except (QMPError, OSError, EOFError) as exc:
        if isinstance(exc, QmpError):
            raise
        raise QmpError(f"QMP {command} at {path} failed: {exc}") from None
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):  # qemu closes the socket after `quit`
            await client.disconnect()


def execute(path: Path, command: str, arguments: Mapping[str, object] | None = None, *,
            timeout: float = 5.0) -> Any:
    """Run ``command`` (with ``arguments``) on the QMP socket at ``path``; its ``return`` value.
    Raises :class:`QmpError` on an ``error`` reply (naming its class), a refused or closed socket,
    or no reply within ``timeout`` seconds."""
    return asyncio.run(_execute(path, command, arguments, timeout))
