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
def agentbox_backend(request: pytest.FixtureRequest) -> str:
    """A test's ``agentbox_backend`` parameter, else each microvm backend in turn (``vm_backend``)."""
    return getattr(request, "param", None) or str(request.getfixturevalue("vm_backend"))


def test_attach_and_the_relayed_shell_keep_typeahead_and_follow_resizes(vm_backend: str, microvm,  # type: ignore[no-untyped-def]
                                                                        tmp_path: Path) -> None:
    assert microvm.capabilities.attach and microvm.guest_id
    attach_session(microvm.guest_id, tmp_path / "session.log", timeout=microvm.scaled(120))
    # shell() through the agent (krun-direct's shell(); qemu's is the hvc0 console, so ask for the relay)
    shell_follows_resizes(agent_shell(microvm, microvm.agent, microvm.scaled(120)))


@pytest.mark.parametrize("agentbox_backend", ["krun-podman"], indirect=True)
def test_krun_podman_attach_and_shell_keep_typeahead_and_follow_resizes(guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """krun-podman: attach over the published, token-authenticated 127.0.0.1 port; shell() is the relay."""
    assert guest.capabilities.attach and guest.guest_id
    attach_session(guest.guest_id, tmp_path / "session.log", timeout=guest.scaled(120))
    shell_follows_resizes(guest.shell())


def shell_follows_resizes(shell) -> None:  # type: ignore[no-untyped-def]
    """A relayed shell (its prompt consumed) at FIRST_SIZE, through the typeahead-and-resize session."""
    try:
        shell.setwinsize(*FIRST_SIZE)  # the relayed pty starts at 24x80
        type_ahead_and_resize(shell)
    finally:
        shell.close()
