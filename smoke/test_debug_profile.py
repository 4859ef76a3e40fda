"""``agentbox --debug`` and ``--profile`` on a real guest (reference 9.1 and 11): ``agentbox microvm``
with the session's VM backend (``--vmm qemu``, or ``--vmm libkrun`` for krun-direct), run as a
user runs it, in a project dir of its own and a state dir of the module's.

- ``--debug --profile``: the host profile names every host phase of 9.1 in order, with the storage
  mode; the guest's ``microvm enter`` profile names the enter steps of 7.14 in order; the
  command's own output and exit status are untouched;
- either flag alone: no report (reports print only with both), yet the flag reached the guest
  (on qemu the guest's ``/run/agentbox/launch.conf`` carries ``AGENTBOX_GUEST_PROFILE=1`` /
  ``AGENTBOX_GUEST_DEBUG=1``; libkrun keeps no such file), and the
  shell's environment carries neither (enter clears them before the exec)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

RUN_TIMEOUT_S = 900
VMM = {"qemu": "qemu", "krun-direct": "libkrun"}
HOST_PHASES = ("image_reference_resolution", "image_cache_ensure", "storage_backend_selection",
               "task_rootfs_materialization", "guest_init_resolution", "persistent_disk_preparation",
               "launch_config_build", "helper_session", "task_rootfs_unmount", "task_state_cleanup")
"""Reference 9.1's host profile labels, in order (the unmount row only where the rootfs is a fuse mount)."""
GUEST_STEPS = ("read-env", "mount-workspace", "resolve-identity", "derive-shell-env", "export-shell-env",
               "materialize-home", "materialize-allocator-preload", "restrict-dmesg", "start-nix-prep",
               "start-podman-prep", "export-nix-remote")
"""Reference 7.14's ``microvm enter`` steps, in order (this rebuild adds rows between them)."""
ROW = re.compile(r"^  ([a-z_-]+): (\d+\.\d{3}ms|btrfs-snapshot|reflink|fuse-overlay)$")
"""A report row: a label and its time in ms (3 decimals), or the host's storage mode."""
GUEST_LAUNCH_CONF = {"qemu": "/run/agentbox/launch.conf"}
"""Where the guest reads its launch config, by VMM. libkrun hands the env to the process itself
(``krun_set_exec``): there is no file in the guest to read it back from."""
PROBE = "echo probe-out; env | grep -c '^AGENTBOX_GUEST_' || true; exit 7"


@pytest.fixture(scope="module")
def vmm(agentbox_session) -> str:  # type: ignore[no-untyped-def]
    backend = agentbox_session.backend
    if backend not in VMM:
        pytest.skip(f"--debug/--profile of `agentbox microvm` need a microvm backend; this session uses {backend}")
    return VMM[backend]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory, vmm: str) -> dict[str, str]:
    """The caller's environment with a state dir of the module's (the image is ingested once)."""
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path_factory.mktemp("debug-profile-state"))}


@pytest.fixture
def project(workspace) -> Path:  # type: ignore[no-untyped-def]
    """The project dir the CLI runs in: the ``workspace`` fixture's (owned by the image user's ids)."""
    return Path(workspace.path)


def agentbox(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", *args], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def report(text: str, header: str) -> list[str]:
    """The row labels of the report under ``header`` in ``text`` (the lines after it that are rows;
    the storage mode is a row too)."""
    lines = text.splitlines()
    assert lines.count(header) == 1, f"expected one {header!r} report:\n{text[-4000:]}"
    labels = []
    for line in lines[lines.index(header) + 1:]:
        row = ROW.match(line)
        if not row:
            break
        labels.append(row.group(1))
    return labels


def in_order(wanted: tuple[str, ...], got: list[str]) -> bool:
    """Whether ``wanted`` appears in ``got`` as a subsequence (in order, other rows between)."""
    rest = iter(got)
    return all(label in rest for label in wanted)


def test_debug_and_profile_print_both_reports(cli_env: dict[str, str], project: Path, vmm: str) -> None:
    proc = agentbox(cli_env, project, "microvm", "--vmm", vmm, "--debug", "--profile", "--", "sh", "-c", PROBE)
    both = proc.stdout + proc.stderr  # the guest's stderr reaches the caller through the console
    assert proc.returncode == 7, both[-4000:]
    out = proc.stdout.splitlines()
    assert "probe-out" in out, both[-4000:]
    assert out[out.index("probe-out") + 1] == "0", "the shell must not see AGENTBOX_GUEST_* (enter clears them)"

    host = report(proc.stderr, "agentbox microvm host profile")
    assert host[0] == "storage_mode" and host[-1] == "total_profiled_host_runtime", host
    unmounted = [p for p in HOST_PHASES if p != "task_rootfs_unmount"]
    assert host[1:-1] in (list(HOST_PHASES), unmounted), f"host rows {host}; expected {HOST_PHASES} in this order"

    guest = report(both, "agentbox-guest-init profile: microvm enter")
    assert in_order(GUEST_STEPS, guest), f"guest steps {guest}; expected {GUEST_STEPS} in this order"
    assert guest[-1] == "total", guest


@pytest.mark.parametrize("flag,env_name", [("--profile", "AGENTBOX_GUEST_PROFILE"), ("--debug", "AGENTBOX_GUEST_DEBUG")])
def test_either_flag_alone_reaches_the_guest_and_prints_no_report(cli_env: dict[str, str], project: Path, vmm: str,
                                                                   flag: str, env_name: str) -> None:
    conf = GUEST_LAUNCH_CONF.get(vmm)
    hexed = f"{env_name}=1".encode().hex()  # the launch config holds each value hex-encoded
    probe = f"grep -c '^env\\.[0-9]*={hexed}$' {conf}; {PROBE}" if conf else PROBE
    proc = agentbox(cli_env, project, "microvm", "--vmm", vmm, flag, "--root", "--", "sh", "-c", probe)
    both = proc.stdout + proc.stderr
    assert proc.returncode == 7, both[-4000:]
    out = proc.stdout.splitlines()
    if conf:
        assert out[out.index("probe-out") - 1] == "1", f"{env_name}=1 is not in the guest's {conf}:\n{both[-4000:]}"
    assert out[out.index("probe-out") + 1] == "0", "the shell must not see AGENTBOX_GUEST_* (enter clears them)"
    assert "agentbox microvm host profile" not in both and "agentbox-guest-init profile" not in both, both[-4000:]
