"""The nix-daemon sidecar stack: prepare or reuse, and idle cleanup (reference 8.3-8.6).

One sidecar per (workspace, image): a container running nix-daemon
read-write on the merged ``/nix`` overlay, publishing a socat proxy on port
19876. Tasks mount the same overlay read-only and reach the daemon through
its socket at ``/nix/var/nix/daemon-socket/socket``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from agentbox_guest_init.contract import LABEL_HARNESS_RUN, LABEL_ROLE, LABEL_SIDECAR
from agentbox_runtime.container import health, podman_api
from agentbox_runtime.container.names import (
    NIX_MERGED, NIX_UPPER, NIX_WORK, PROXY_PORT, ROLE_TASK, SIDECAR_ENTRYPOINT, STATE_FILE,
    sidecar_name,
)
from agentbox_runtime.container.overlay import (
    is_mounted, mount_image, mount_overlay, require_fuse_overlayfs, unmount_image,
    unmount_overlay, unmount_overlay_everywhere,
)
from agentbox_runtime.container.state_file import (
    MountMode, SidecarState, load_state, remove_state, write_state,
)
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.podman import Podman


@dataclass(frozen=True)
class SidecarRequest:
    """What a sidecar is prepared for.

    ``state_root`` is the per-workspace state root; ``run_label`` (harness
    runs only) becomes ``--label io.agentbox.harness.run=<id>``.
    """

    image: str
    canonical_cwd: str
    slug: str
    state_root: Path
    run_label: str | None = None

    @property
    def upper(self) -> Path:
        return self.state_root / NIX_UPPER

    @property
    def work(self) -> Path:
        return self.state_root / NIX_WORK

    @property
    def merged(self) -> Path:
        return self.state_root / NIX_MERGED

    @property
    def state_file(self) -> Path:
        return self.state_root / STATE_FILE


@dataclass(frozen=True)
class Sidecar:
    """A prepared sidecar: what tasks need to use it and cleanup needs to end it."""

    name: str
    merged: Path
    proxy_port: int
    mount_mode: MountMode
    image_id: str
    reused: bool


def image_id(image: str) -> str:
    """The id of local image ``image`` (``podman image inspect``), never empty."""
    attrs = podman_api.image_inspect(image)
    if attrs is None:
        raise AgentboxError(f"podman image inspect failed for '{image}': no such local image")
    iid = str(attrs.get("Id") or "").strip()
    if not iid:
        raise AgentboxError(f"podman image inspect returned an empty image ID for '{image}'")
    return iid


def running_tasks(name: str) -> list[str]:
    """IDs of running task containers labelled for sidecar ``name``."""
    try:
        found = podman_api.containers({LABEL_ROLE: ROLE_TASK, LABEL_SIDECAR: name}, all_states=False)
    except AgentboxError as exc:
        raise AgentboxError(f"failed to list task containers of sidecar '{name}': {exc}") from None
    return [c.id for c in found]


def remove_container(name: str) -> None:
    """``podman rm -f -t 0 <name>`` (through the API), errors ignored.

    ``-t 0``: the sidecar's PID 1 (``tail -f /dev/null``) ignores SIGTERM,
    so Podman's default stop would wait 10 s for nothing before killing it.
    """
    with contextlib.suppress(AgentboxError):
        podman_api.remove_container(name)


def sidecar_run_argv(name: str, merged: Path, image: str, run_label: str | None = None) -> list[str]:
    """The ``podman run`` arguments that start the sidecar (reference 8.3)."""
    label = ["--label", f"{LABEL_HARNESS_RUN}={run_label}"] if run_label else []
    return ["run", "-d", "--name", name, "--user", "0:0", "--volume", f"{merged}:/nix",
            "--publish", str(PROXY_PORT), "--entrypoint", SIDECAR_ENTRYPOINT, *label, image]


def proxy_port(name: str, stderr: TextIO) -> int:
    """The host port published for the proxy (as ``podman port``), else 19876 with a warning."""
    try:
        ports = podman_api.published_ports(name, PROXY_PORT)
    except AgentboxError as exc:
        ports, why = [], str(exc)
    else:
        why = f"sidecar '{name}' publishes no host port for {PROXY_PORT}/tcp"
    if not ports:
        print(f"agentbox: warning: failed to resolve sidecar proxy port: {why}", file=stderr)
        return PROXY_PORT
    return ports[0][1]


def _ensure_dirs(req: SidecarRequest) -> None:
    """The overlay dirs, private (0700) except ``nix-upper``: it is the root of the merged ``/nix``,
    whose mode the container's users see, so it is 0755 like any ``/nix`` (the 0700 state root
    around it keeps other host users out). An older 0700 upper dir is opened up."""
    for path in (req.state_root, req.upper, req.work, req.merged):
        if path.is_symlink():
            raise AgentboxError(f"refusing symlink in managed state path '{path}'")
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.stat(req.upper).st_uid == os.geteuid():
        os.chmod(req.upper, 0o755)


def _lowerdir_present(podman: Podman, state: SidecarState) -> bool:
    paths = (f"{state.image_mount_path}/nix", f"{state.image_mount_path}/store")
    if state.mount_mode is MountMode.DIRECT:
        return any(os.path.isdir(p) for p in paths)
    proc = podman.capture(["unshare", "sh", "-c", f"test -d '{paths[0]}' || test -d '{paths[1]}'"])
    return proc.returncode == 0


def _try_reuse(podman: Podman, req: SidecarRequest, state: SidecarState, name: str,
               probe: bool) -> bool:
    if podman_api.container_running(name) and running_tasks(name):
        return True  # protected reuse: never disturb live tasks
    if not (_lowerdir_present(podman, state) and is_mounted(podman, req.merged, state.mount_mode)
            and podman_api.container_running(name)):
        return False
    if not probe:
        return True
    port = proxy_port(name, sys.stderr)
    return health.wait_healthy(podman, name, str(req.merged), req.image, port, req.run_label,
                               attempts=3).ok


def _clean_previous(podman: Podman, req: SidecarRequest, state: SidecarState | None,
                    name: str) -> None:
    if state is not None:
        remove_container(state.sidecar_name)
        unmount_overlay(podman, req.merged, state.mount_mode)
        unmount_image(podman, state.image)
    else:
        remove_container(name)
        unmount_overlay_everywhere(podman, req.merged)


def prepare_sidecar(podman: Podman, req: SidecarRequest, probe: bool = True,
                    stderr: TextIO | None = None) -> Sidecar:
    """Start the sidecar stack for ``req``, or reuse the one that is there.

    Reuse is *protected* (no checks) while task containers labelled for the
    sidecar run, otherwise *health-gated*: image mount, merged mount, running
    sidecar and (with ``probe``) one socket probe must all be fine. Anything
    else tears the old stack down and builds a new one; with ``probe`` a new
    sidecar must pass the bounded socket probe or it is removed again and
    the reference error with logs and state is raised.
    """
    err = stderr if stderr is not None else sys.stderr
    require_fuse_overlayfs()
    _ensure_dirs(req)
    iid = image_id(req.image)
    name = sidecar_name(req.slug, req.canonical_cwd, iid)
    state = load_state(req.state_file, err)
    if state is not None and state.matches(req.image, iid, name):
        if state.native_config:
            if _try_reuse(podman, req, state, name, probe):
                return Sidecar(name, req.merged, proxy_port(name, err),
                               state.mount_mode, iid, reused=True)
        elif running_tasks(name):
            raise AgentboxError(
                f"nix-daemon sidecar '{name}' was started by a legacy non-container "
                "configuration and matching task containers are still active; wait for those "
                "tasks to exit before recreating the container-mode sidecar")
    _clean_previous(podman, req, state, name)
    remove_state(req.state_file)
    mounted = mount_image(podman, req.image)
    try:
        mount_overlay(podman, mounted.mode, mounted.lowerdir, req.upper, req.work, req.merged)
    except AgentboxError:
        unmount_image(podman, req.image)
        raise
    started = podman.capture(sidecar_run_argv(name, req.merged, req.image, req.run_label))
    if started.returncode:
        _teardown_after_failure(podman, req, name, mounted.mode)
        lines = [line.strip() for line in (started.stderr or "").strip().splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        said = " | ".join(errors[-2:] or lines[-3:])
        raise AgentboxError(
            f"nix-daemon sidecar '{name}' failed to start: podman run exited {started.returncode}: "
            f"{said or '(no output)'}; if the image is at fault, ensure '{req.image}' contains sidecar "
            f"entrypoint '{SIDECAR_ENTRYPOINT}'")
    port = proxy_port(name, err)
    if probe:
        last = health.wait_healthy(podman, name, str(req.merged), req.image, port, req.run_label)
        if not last.ok:
            diagnostics = health.collect_diagnostics(name)
            cleanup_error = _teardown_after_failure(podman, req, name, mounted.mode)
            raise AgentboxError(health.render_failure(
                name, str(req.merged), last, cleanup_error, *diagnostics))
    write_state(req.state_file, SidecarState(
        image=req.image, image_id=iid, image_mount_path=mounted.path, sidecar_name=name,
        mount_mode=mounted.mode, proxy_port=port))
    return Sidecar(name, req.merged, port, mounted.mode, iid, reused=False)


def _teardown_after_failure(podman: Podman, req: SidecarRequest, name: str,
                            mode: MountMode) -> str | None:
    """Undo a stack this call built; the cleanup error text, or None."""
    remove_container(name)
    try:
        unmount_overlay(podman, req.merged, mode)
    except AgentboxError as exc:
        return str(exc)
    unmount_image(podman, req.image)
    return None


def cleanup_idle_sidecar(podman: Podman, sidecar: Sidecar) -> bool:
    """Remove ``sidecar`` and unmount its merged ``/nix`` unless tasks still use it.

    Returns True when it was removed. ``nix-upper`` (the writes) is kept.
    """
    if running_tasks(sidecar.name):
        return False
    remove_container(sidecar.name)
    unmount_overlay(podman, sidecar.merged, sidecar.mount_mode)
    return True


def teardown_stack(podman: Podman, req: SidecarRequest) -> None:
    """Remove everything of the stack for ``req`` except ``nix-upper``.

    For harness cleanup: the recorded sidecar, the merged mount (both
    namespaces), the image mount and the state file. Errors other than a
    mount that stays are ignored.
    """
    state = load_state(req.state_file, io.StringIO())
    if state is not None:
        remove_container(state.sidecar_name)
    unmount_overlay_everywhere(podman, req.merged)
    if state is not None:
        unmount_image(podman, state.image)
    remove_state(req.state_file)
