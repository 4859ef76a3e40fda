"""Host runtime of agentbox: state, disks, Podman task specs, VMM drivers, CLI.

Nothing in this package imports pytest; the ``agentbox_harness`` plugin builds
on it, and it builds on the ``agentbox_guest_init.contract`` names.
"""
