"""pytest11 entry point ``agentbox``: options, markers and fixtures."""

from __future__ import annotations

import pytest

MARKERS = {
    "vm": "boots a real guest (qemu, libkrun or krun-podman backend)",
    "needs_kvm": "needs a /dev/kvm that boots guests",
    "needs_libkrun": "needs libkrun.so and libkrunfw (or crun with +LIBKRUN)",
    "needs_root": "needs root on the host",
    "destructive": "changes host state outside the per-test state root",
    "slow": "takes minutes (image build, several boots)",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("agentbox", "agentbox microVM harness")
    group.addoption("--agentbox-backend", default="auto",
                    choices=("auto", "qemu", "krun-podman", "krun-direct", "container"),
                    help="backend for VM fixtures (default: best available)")
    group.addoption("--agentbox-image", default=None, help="guest image reference")
    group.addoption("--agentbox-kernel", default=None, help="kernel for the qemu backend")
    group.addoption("--agentbox-state-dir", default=None,
                    help="state root (default: isolated per test under the pytest tmp dir)")
    group.addoption("--preserve-debug", action="store_true",
                    help="keep VMs, disks, task rootfs and logs; print commands to inspect them")
    group.addoption("--agentbox-strict", action="store_true",
                    help="a missing capability fails the test instead of skipping it")
    group.addoption("--agentbox-timeout-scale", type=float, default=None,
                    help="multiply every wait timeout (default chosen from the accelerator)")


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
