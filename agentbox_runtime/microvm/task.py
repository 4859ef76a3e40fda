"""One microvm task, end to end (reference 9.1): the API the CLI and the pytest plugin share.

``MicrovmTask`` is a context manager: entering runs the phases (image
reference, cache, storage selection, rootfs materialization, guest-init
resolution, persistent disks, launch config) and starts the VM; each phase
failure carries its reference context. Closing always unmounts and removes
the task rootfs and task dir, unless ``preserve_debug`` keeps them and prints
where they are.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.image_user import DEFAULT_IMAGE_USER, ImageUser
from agentbox_guest_init.image_user import load as load_image_user
from agentbox_guest_init.launch_config import LaunchConfig, LaunchDisk, encode
from agentbox_runtime import disks
from agentbox_runtime.errors import AgentboxError, InputError, error_chain
from agentbox_runtime.microvm import storage
from agentbox_runtime.microvm.image_cache import ImageCache, remove_tree, resolve_reference, validate_rootfs
from agentbox_runtime.microvm.task_reaper import forget, record
from agentbox_runtime.guest_resources import MICROVM_DEFAULT_MIB, default_cpus
from agentbox_runtime.state import StateLayout, task_container_name
from agentbox_runtime.vmm.base import VmHandle, VmSpec
from agentbox_runtime.vmm.shutdown import Request, StopReport
from agentbox_runtime.vmm.choice import choose_vmm
from agentbox_runtime.vmm.libkrun import LibkrunDriver
from agentbox_runtime.vmm.qemu import QemuDriver
from agentbox_runtime.vmm.snapshot import SnapshotDriver

log = logging.getLogger("agentbox")



@dataclass(frozen=True)
class MicrovmOptions:
    """What to run (built by :mod:`agentbox_runtime.backends.microvm_backend`). ``command`` defaults
    to ``fish -l``; ``memory_mib`` to 4096."""

    workspace: Path
    image: str | None = None
    storage: str = "auto"
    vmm: str = "auto"
    memory_mib: int | None = None
    cpus: int | None = None
    guest_init: Path | None = None
    preserve_debug: bool = False
    command: tuple[str, ...] = ()
    root: bool = False
    profile: bool = False
    debug: bool = False
    kernel: Path | None = None
    initrd: Path | None = None
    interactive: bool = True
    run_label: str | None = None
    extra_env: tuple[str, ...] = ()
    state: StateLayout | None = None
    accel: str = "auto"
    image_cache: Path | None = None  # default: the per-user cache of the state layout
    boot: str = "cold"
    """``cold``, or ``restore``: qemu restores the guest from a snapshot template
    (:mod:`agentbox_runtime.vmm.snapshot`) when nothing the template cannot hold is asked for (a
    kernel, initrd or guest-init override, a terminal); every other task boots cold."""


def host_ids(workspace: Path, image: ImageUser = DEFAULT_IMAGE_USER) -> tuple[int, int]:
    """The dev user's uid/gid so that workspace files map to a host user.

    The host user's ids; when the host user is root (the guest shell is never
    root), the workspace directory's owner if that is not root, else the image
    user's ids (1000:1000 in the stock image)."""
    uid, gid = os.getuid(), os.getgid()
    if uid != 0:
        return uid, gid
    st = workspace.stat()
    if st.st_uid != 0:
        return st.st_uid, st.st_gid or st.st_uid
    return image.uid, image.gid


def rootfs_image_user(rootfs: Path) -> ImageUser:
    """The image user of a task rootfs (its ``/etc/agentbox/image-user``, read without following
    a symlink out of it; the defaults when it has none)."""
    try:
        return load_image_user(rootfs)
    except GuestError as exc:
        raise AgentboxError(f"microvm image: {exc}") from None


def build_launch(opts: MicrovmOptions, rootfs: Path, exec_path: str, layout: StateLayout,
                 vmm: str, user: ImageUser = DEFAULT_IMAGE_USER) -> LaunchConfig:
    """The launch config of 9.7 (env order exact; qemu adds the 9p workspace fstype). The
    workspace is mounted at, and the shell starts in, the image user's workdir."""
    uid, gid = host_ids(layout.workspace, user)
    env = [f"{c.ENV_HOST_UID}={uid}", f"{c.ENV_HOST_GID}={gid}", f"{c.ENV_KVM_DROP_TO_DEV}=1",
           f"{c.ENV_MICROVM_WORKSPACE_TAG}={c.WORKSPACE_TAG}", f"{c.ENV_MICROVM_WORKSPACE_TARGET}={user.workdir}"]
    if opts.root:
        env.append(f"{c.ENV_ENTER_AS_ROOT}=1")
    if opts.profile:
        env.append(f"{c.ENV_GUEST_PROFILE}=1")
    if opts.debug:
        env.append(f"{c.ENV_GUEST_DEBUG}=1")
    env += [f"{c.ENV_NIX_OVERLAY}=1", f"{c.ENV_NIX_DISK_ID}={c.NIX_DISK.block_id}",
            f"{c.ENV_NIX_DISK_LABEL}={c.NIX_DISK.label}", f"{c.ENV_CONTAINERS_STORAGE}=1",
            f"{c.ENV_CONTAINERS_DISK_ID}={c.CONTAINERS_DISK.block_id}",
            f"{c.ENV_CONTAINERS_DISK_LABEL}={c.CONTAINERS_DISK.label}"]
    if vmm == "qemu":
        env.append(f"{c.ENV_MICROVM_WORKSPACE_FSTYPE}=9p")
    env += list(opts.extra_env)
    command = list(opts.command) or list(c.DEFAULT_SHELL)
    return LaunchConfig(
        task_rootfs=str(rootfs), workspace_source=str(layout.workspace), workspace_tag=c.WORKSPACE_TAG,
        workspace_target=user.workdir, ram_mib=opts.memory_mib or MICROVM_DEFAULT_MIB,
        vcpus=opts.cpus or default_cpus(), workdir=user.workdir, exec_path=exec_path,
        disks=tuple(LaunchDisk(d.spec.block_id, str(d.path(layout.state_root))) for d in disks.MICROVM_DISKS),
        argv=("agentbox-guest-init", "microvm", "enter", "--", *command), env=tuple(env))


def driver(name: str):  # type: ignore[no-untyped-def]
    if name == "qemu":

        return QemuDriver()

    return LibkrunDriver()


class Phases:
    """Host profile rows (reference 11) and phase-classified errors (9.1)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []
        self.storage_mode: str | None = None

    def run(self, label: str, context: str | None, fn):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return fn()
        except AgentboxError as exc:
            if context is None or isinstance(exc, InputError):
                raise
            raise AgentboxError(context) from exc
        finally:
            self.rows.append((label, (time.perf_counter() - started) * 1000))

    def report(self) -> str:
        lines = ["agentbox microvm host profile"]
        if self.storage_mode:
            lines.append(f"  storage_mode: {self.storage_mode}")
        lines += [f"  {label}: {ms:.3f}ms" for label, ms in self.rows]
        lines.append(f"  total_profiled_host_runtime: {sum(ms for _, ms in self.rows):.3f}ms")
        return "\n".join(lines)


@dataclass
class MicrovmTask:
    """A started microvm task; use as a context manager."""

    opts: MicrovmOptions
    phases: Phases = field(default_factory=Phases)
    task_id: str = ""
    task_dir: Path = Path()
    rootfs: storage.TaskRootfs | None = None
    launch: LaunchConfig | None = None
    handle: VmHandle | None = None
    ingested: bool = False
    vmm: str = ""
    closed: bool = False
    notice: str | None = None
    stop_report: StopReport | None = None
    layout: StateLayout | None = None
    """The workspace state (set by :meth:`start`)."""
    session_started: float | None = None
    """When the VMM started (``perf_counter``), for the helper-session phase."""
    user: ImageUser = field(default_factory=ImageUser)
    """The image's user and workdir (set by :meth:`start` from the task rootfs)."""

    def __enter__(self) -> MicrovmTask:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        o = self.opts
        layout = (o.state or StateLayout.resolve(o.workspace)).ensure()
        self.layout = layout
        self.task_id = task_container_name(layout.slug)
        self.task_dir = layout.microvm_tasks_dir / self.task_id
        cache = ImageCache(o.image_cache or layout.microvm_image_dir)
        record(layout, self.task_dir, None, o.run_label)
        p = self.phases
        ref = p.run("image_reference_resolution", "microvm image reference resolution failed",
                    lambda: resolve_reference(o.image, cache))
        entry, self.ingested = p.run("image_cache_ensure", "microvm image cache ingestion failed",
                                     lambda: cache.ensure(ref))
        self.vmm = choose_vmm(o.vmm)
        restore = self.restorable()
        if restore:  # the template's root is the image itself, read-only; no task rootfs
            p.storage_mode = "snapshot"
            root = entry.rootfs
        else:
            policy = p.run("storage_backend_selection", "microvm storage backend selection failed",
                           lambda: storage.select(o.storage))
            self.rootfs = p.run("task_rootfs_materialization", "microvm task rootfs materialization failed",
                                lambda: storage.materialize(policy, entry.rootfs, self.task_dir, o.preserve_debug))
            p.storage_mode = self.rootfs.mode
            root = self.rootfs.root
        exec_path = p.run("guest_init_resolution", "microvm guest-init resolution failed",
                          lambda: self._guest_init(root))
        self.user = rootfs_image_user(root)
        p.run("persistent_disk_preparation", "microvm persistent disk preparation failed",
              lambda: self._disks(layout))
        vmm = SnapshotDriver(image_rootfs=root, image_digest=entry.digest, guest_init=root / exec_path.lstrip("/")) \
            if restore else driver(self.vmm)
        self.launch = p.run("launch_config_build", "microvm launch config build failed",
                            lambda: self._write_launch(layout, root, exec_path))
        spec = VmSpec(rootfs=root, launch=self.launch, task_dir=self.task_dir, kernel=o.kernel,
                      initrd=o.initrd, interactive=o.interactive, accel=o.accel,
                      outlive_caller=o.preserve_debug and not o.interactive)
        started = time.perf_counter()
        try:
            self.handle = vmm.start(spec)
        except AgentboxError as exc:
            self.phases.rows.append(("helper_session", (time.perf_counter() - started) * 1000))
            raise AgentboxError(self._launch_failure()) from exc
        self.session_started = started
        self._record_process()

    def restorable(self) -> bool:
        """True when this task restores from a snapshot template (see :attr:`MicrovmOptions.boot`)."""
        o = self.opts
        return (o.boot == "restore" and self.vmm == "qemu" and o.kernel is None and o.initrd is None
                and o.guest_init is None and not o.interactive)

    def _guest_init(self, root: Path) -> str:
        target = validate_rootfs(root)
        if self.opts.guest_init is not None:
            src = self.opts.guest_init
            try:
                resolved = src.resolve(strict=True)
            except OSError:
                raise AgentboxError(f"failed to resolve microvm guest-init override '{src}'") from None
            if not resolved.is_file() or not os.access(resolved, os.X_OK):
                raise InputError(f"microvm guest-init override '{src}' is not an executable regular file")
            shutil.copy2(resolved, target)
        rel = target.relative_to(root)
        return "/" + str(rel)

    def _disks(self, layout: StateLayout) -> None:
        try:
            disks.prepare_all(disks.MICROVM_DISKS, layout.state_root)
        except AgentboxError as exc:
            raise AgentboxError("failed to prepare microvm persistent dev cache disk") from exc

    def _write_launch(self, layout: StateLayout, root: Path, exec_path: str) -> LaunchConfig:
        cfg = build_launch(self.opts, root, exec_path, layout, self.vmm, self.user)
        self.task_dir.mkdir(parents=True, exist_ok=True)
        path = self.task_dir / "launch.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(encode(cfg))
        return cfg

    def _record_process(self) -> None:
        if self.handle is not None and self.layout is not None:
            record(self.layout, self.task_dir, self.handle.pid, self.opts.run_label)

    def _paths(self) -> str:
        root = self.rootfs.root if self.rootfs else self.task_dir
        return (f"task_rootfs='{root}', task_state_dir='{self.task_dir}', "
                f"launch_config='{self.task_dir / 'launch.conf'}'")

    def _launch_failure(self) -> str:
        if self.opts.preserve_debug:
            hint = self.rootfs.hint() if self.rootfs else ""
            return f"microvm launch failed; preserved microvm debug state: {self._paths()}" + (f"; {hint}" if hint else "")
        root = self.rootfs.root if self.rootfs else self.task_dir
        return ("microvm launch failed; task debug state was cleaned unless cleanup reported another error; "
                f"rerun with --preserve-debug to keep task_rootfs='{root}' and launch_config='{self.task_dir / 'launch.conf'}'")

    def wait(self, timeout: float | None) -> int:
        """The guest command's exit status."""
        assert self.handle is not None
        return self.handle.wait(timeout)

    def stop(self, timeout: float = 0.0, poweroff: Request | None = None) -> StopReport | None:
        """Stop the VMM down the one ladder (:func:`agentbox_runtime.vmm.shutdown.stop`), once, within
        about ``timeout`` s: ``poweroff`` (the guest's own, through its agent), then terminate, then
        kill. The report is kept in :attr:`stop_report`; a second call returns it without touching
        the VMM again. None when no VMM was started."""
        if self.handle is None:
            return None
        if self.stop_report is None:
            self.stop_report = self.handle.shutdown(timeout, poweroff)
        return self.stop_report

    def close(self) -> None:
        """Stop the VM and clean up (idempotent); keeps everything with preserve_debug."""
        if self.closed:
            return
        self.closed = True
        if self.handle is not None:
            if self.session_started is not None:
                self.phases.rows.append(("helper_session", (time.perf_counter() - self.session_started) * 1000))
            self.stop()  # preserve keeps files, never a running VM; a no-op once stopped
        if self.rootfs is None:  # failed before a rootfs, or restored from a snapshot (no task rootfs)
            if self.layout is not None:
                self._close_rootless()
            return
        assert self.layout is not None  # a rootfs exists only after start() resolved the layout
        if self.opts.preserve_debug:
            hint = self.rootfs.hint()
            self.notice = f"agentbox: preserved microvm debug state: {self._paths()}" + (f"; {hint}" if hint else "")
            forget(self.layout, self.task_dir)  # preserved state is the user's now, never reaped
            return
        self.phases.run("task_rootfs_unmount", f"failed to unmount microvm task rootfs '{self.rootfs.root}'",
                        self.rootfs.unmount)
        self.phases.run("task_state_cleanup", None, self.rootfs.cleanup)
        forget(self.layout, self.task_dir)


    def _close_rootless(self) -> None:
        """Close a task without a task rootfs: its task dir is kept with preserve_debug, else removed."""
        assert self.layout is not None
        if self.opts.preserve_debug and self.task_dir.is_dir():
            self.notice = f"agentbox: preserved microvm debug state: task_state_dir='{self.task_dir}'"
        elif self.task_dir != Path() and self.task_dir.is_dir():
            try:
                remove_tree(self.task_dir)
            except OSError as exc:
                raise AgentboxError(f"failed to clean up microvm task state dir '{self.task_dir}': {exc}") from None
            finally:
                forget(self.layout, self.task_dir)
            return
        forget(self.layout, self.task_dir)


class Terminated(BaseException):
    """SIGTERM arrived while a microvm task ran."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(f"agentbox microvm terminated by signal {signum}")


def run_microvm(opts: MicrovmOptions) -> int:
    """The CLI path: start, wait, clean up, combine results, report."""
    task = MicrovmTask(opts)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        status, run_error = _start_and_wait(task)
    except BaseException:  # Ctrl-C or SIGTERM: stop the VM and clean up, then let it propagate
        if in_main:  # a second signal must not interrupt the cleanup
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            task.close()
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
                signal.signal(signal.SIGINT, signal.default_int_handler)
        raise
    if in_main:
        signal.signal(signal.SIGTERM, previous)
    cleanup_error: AgentboxError | None = None
    try:
        task.close()
    except AgentboxError as exc:
        cleanup_error = exc
    if opts.debug and opts.profile:
        log.info("%s", task.phases.report())
    if task.notice:
        log.warning("%s", task.notice)
    _raise_run_errors(run_error, cleanup_error)
    return status if 0 <= status <= 255 else 1


def _start_and_wait(task: MicrovmTask) -> tuple[int, BaseException | None]:
    """Start the guest and wait for its status. An AgentboxError, OSError or RuntimeError comes back
    as the second item (status 1), so the cleanup still runs; anything else propagates."""
    try:
        task.start()
        return task.wait(None), None
    except (AgentboxError, OSError, RuntimeError) as exc:
        return 1, exc


def _raise_run_errors(run_error: BaseException | None, cleanup_error: AgentboxError | None) -> None:
    """Raise what went wrong, as one AgentboxError: the cleanup failure chained to the run error
    when both failed."""
    if cleanup_error and run_error:
        raise AgentboxError(f"microvm task rootfs cleanup failed after run error: {error_chain(run_error)}") \
            from cleanup_error
    if cleanup_error:
        raise cleanup_error
    if run_error:
        if isinstance(run_error, AgentboxError):
            raise run_error
        raise AgentboxError(str(run_error)) from run_error
