"""``agentbox attach`` and ``Machine.shell()`` on real guests keep typeahead and follow the host
terminal's size (issue 26), on each microvm backend (krun-direct through the libkrun stand-in).

The attach client runs as a user would run it, in pexpect, against the guest a test holds
(``microvm.guest_id``, the record ``agentbox ps`` lists): two commands are typed before any
prompt, then the host side is resized twice (:mod:`suites.attach_terminal`). The harness's
relayed shell (``agent_shell``, what ``shell()`` is on krun-direct and krun-podman) then follows
``setwinsize`` on the same guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentbox_harness.backends import agent_shell
from suites.attach_terminal import FIRST_SIZE, attach_session, type_ahead_and_resize

pytestmark = [pytest.mark.vm, pytest.mark.slow]
pytest.importorskip("pexpect")


@pytest.fixture
def agentbox_backend(vm_backend: str) -> str:
    """Each microvm backend in turn (overrides the session's ``--agentbox-backend``)."""
    return vm_backend


def test_attach_and_the_relayed_shell_keep_typeahead_and_follow_resizes(microvm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert microvm.capabilities.attach and microvm.guest_id
    attach_session(microvm.guest_id, tmp_path / "session.log", timeout=microvm.scaled(120))
    # shell() through the agent (krun-direct's shell(); qemu's is the hvc0 console, so ask for the relay)
    shell = agent_shell(microvm, microvm.agent, microvm.scaled(120))
    try:
        shell.setwinsize(*FIRST_SIZE)  # the relayed pty starts at 24x80
        type_ahead_and_resize(shell)
    finally:
        shell.close()
