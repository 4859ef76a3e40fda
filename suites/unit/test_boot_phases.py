"""Boot phases from the guest's own stamps on the kernel console."""

from __future__ import annotations

from agentbox_runtime.vmm.boot_phases import durations, stamps

CONSOLE = """SeaBIOS noise
agentbox-phase kernel 1.50
[    1.6] some kernel line
agentbox-phase modules 3.25
agentbox-phase root 3.30
agentbox-vminit: hello
agentbox-phase init 4.80
"""


def test_stamps_are_read_from_noisy_console_text() -> None:
    assert stamps(CONSOLE + "agentbox-phase broken x\nagentbox-phase\n") == {
        "kernel": 1.5, "modules": 3.25, "root": 3.3, "init": 4.8}


def test_durations_follow_boot_order_and_end_at_the_agent() -> None:
    assert durations(CONSOLE, 7.0) == {"kernel_s": 1.5, "modules_s": 1.75, "root_s": 0.05, "init_s": 1.5,
                                       "command_s": 2.2, "guest_ready_uptime_s": 7.0}


def test_missing_stamps_give_only_what_was_seen() -> None:
    assert durations("agentbox-phase init 2.0\n", None) == {"init_s": 2.0}
    assert durations("", 3.0) == {}
