"""Direct libkrun through ctypes (reference 9.7): the helper's call order and the driver.

The helper process (``agentbox __agentbox_microvm_enter <launch.conf>``) loads
``$AGENTBOX_LIBKRUN_LIBRARY`` or ``libkrun.so.1`` then ``libkrun.so`` and makes
exactly these calls (:data:`HELPER_CALLS`): create_ctx, set_log_level(0), set_vm_config,
set_root, add_disk per disk, set_port_map(empty), disable_implicit_console,
add_virtio_console_default(0,1,2), add_virtiofs3(workspace), set_workdir, set_exec,
[add_vsock_port2(attach)], start_enter. A setup failure frees the context.

The empty port map is microvm mode's "no inbound publishing": libkrun's header
promises that an empty map exposes no guest port under TSI, and libkrun up to
v1.16 kept it. From v1.17 ``tsi_stream.rs`` ``try_listen`` binds an unmapped
port on the guest's own address anyway, so there the map no longer closes inbound
ports (``docs/libkrun-fidelity.md`` (c); a stand-in cannot show it).

``$AGENTBOX_MICROVM_ATTACH_SOCKET`` (set by :class:`LibkrunDriver` for a
non-interactive guest) asks for the ``agentbox attach`` channel:
``krun_add_vsock_port2(ctx, ATTACH_VSOCK_PORT, path, listen=true)``, so libkrun
listens on that unix socket (in the task's private socket dir) and bridges each
connection to the guest agent's vsock port. A libkrun without that call, or
one that refuses it, starts the guest without the channel and says so on stderr.

The workspace handed to ``krun_add_virtiofs3`` is the export of
:func:`agentbox_runtime.vmm.host_share.export` (id-mapped to the guest's dev user when the
helper runs as root), attached over the workspace's own path in the helper's private mount
namespace (:func:`agentbox_runtime.vmm.host_share.attach_privately`: libkrun opens a share root
with ``O_NOFOLLOW``, so a ``/proc/self/fd/N`` path would not do), and the share filter
(:mod:`agentbox_runtime.vmm.share_filter`) is loaded just before ``krun_start_enter``: libkrun's file server runs in this
process, so no guest request can make a setuid/setgid file, a device node or an
xattr on the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from agentbox_guest_init import contract
from agentbox_guest_init.launch_config import LaunchConfig, decode
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.vmm import host_share, shutdown
from agentbox_runtime.vmm.base import VmSpec
from agentbox_runtime.vmm.console_log import ConsoleRecorder
from agentbox_runtime.vmm.shutdown import StopReport
from agentbox_runtime.channel import AgentClient
from agentbox_runtime.vmm.host import die_with_parent, socket_dir, tail
from agentbox_runtime.vmm.share_filter import install as install_filter
from agentbox_runtime.vmm.share_filter import require_filter

SONAMES = ("libkrun.so.1", "libkrun.so")
HELPER_CALLS: tuple[str, ...] = (
    "krun_create_ctx", "krun_set_log_level", "krun_set_vm_config", "krun_set_root", "krun_add_disk",
    "krun_set_port_map", "krun_disable_implicit_console", "krun_add_virtio_console_default",
    "krun_add_virtiofs3", "krun_set_workdir", "krun_set_exec", "krun_add_vsock_port2", "krun_start_enter",
    "krun_free_ctx")
"""Every libkrun symbol the helper calls; docs/libkrun-fidelity.md has one row for each (a test keeps
them in step)."""
ATTACH_SOCKET_ENV = "AGENTBOX_MICROVM_ATTACH_SOCKET"
#: With non-TTY stdio libkrun hands the guest console (kernel and hvc0) to its logger as error records of
#: target ``init_or_kernel`` (v1.18 ``port_io.rs`` ``PortOutputLog``), which ``krun_set_log_level(0)``
#: turns off. ``RUST_LOG`` overrides that level (``lib.rs`` ``krun_set_log_level``), so this filter keeps
#: the reference's call sequence and still records the console into ``console.log``.
CONSOLE_LOG_FILTER = "init_or_kernel=error"


def load_library() -> ctypes.CDLL:
    names = [os.environ["AGENTBOX_LIBKRUN_LIBRARY"]] if os.environ.get("AGENTBOX_LIBKRUN_LIBRARY") else list(SONAMES)
    last = ""
    for name in names:
        try:
            return ctypes.CDLL(name, mode=os.RTLD_NOW)
        except OSError as exc:
            last = f"failed to load {name}: {exc}"
    raise AgentboxError(last)


STANDIN_SYMBOL = "agentbox_krun_standin"
"""Exported by the project's QEMU-backed libkrun stand-in, never by libkrun."""


def is_standin(lib: ctypes.CDLL | None = None) -> bool:
    """Whether the libkrun that loads (or ``lib``) is the project's QEMU-backed stand-in, not libkrun."""
    lib = lib or load_library()
    try:
        getattr(lib, STANDIN_SYMBOL)
    except AttributeError:
        return False
    return True


def library_path() -> str:
    """The file :func:`load_library` loads (raises like it when none loads)."""
    explicit = os.environ.get("AGENTBOX_LIBKRUN_LIBRARY")
    load_library()
    if explicit:
        return os.path.realpath(explicit)
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if os.path.basename(path).startswith("libkrun.so"):
                return path
    raise AgentboxError("libkrun loaded but its file is not in /proc/self/maps")


def _fn(lib: ctypes.CDLL, name: str):  # type: ignore[no-untyped-def]
    try:
        f = getattr(lib, name)
    except AttributeError as exc:
        raise AgentboxError(f"failed to resolve libkrun symbol {name}: {exc}") from None
    f.restype = ctypes.c_int32
    return f


def _cstr_array(items: list[str]):  # type: ignore[no-untyped-def]
    arr = (ctypes.c_char_p * (len(items) + 1))()
    arr[:-1] = [s.encode() for s in items]
    arr[len(items)] = None
    return arr


def enter(cfg: LaunchConfig, lib: ctypes.CDLL | None = None) -> int:
    """Run the v1 call sequence; returns only on failure (libkrun exits with the guest status)."""
    lib = lib or load_library()
    require_filter()
    uid, gid = host_share.guest_ids(cfg.env_dict())
    share = host_share.export(Path(cfg.workspace_source), guest_uid=uid, guest_gid=gid)
    workspace = host_share.attach_privately(share)  # libkrun opens the root O_PATH|O_NOFOLLOW: a real path
    ctx = _fn(lib, "krun_create_ctx")()
    if ctx < 0:
        raise AgentboxError("libkrun setup failed: create ctx") from AgentboxError(f"krun_create_ctx returned {ctx}")
    u32 = ctypes.c_uint32
    steps: list[tuple[str, tuple[Any, ...]]] = [("krun_set_log_level", (u32(0),)),
             ("krun_set_vm_config", (u32(ctx), ctypes.c_uint8(cfg.vcpus), u32(cfg.ram_mib))),
             ("krun_set_root", (u32(ctx), cfg.task_rootfs.encode()))]
    steps += [("krun_add_disk", (u32(ctx), d.id.encode(), d.path.encode(), ctypes.c_bool(d.read_only)))
              for d in cfg.disks]
    steps += [("krun_set_port_map", (u32(ctx), _cstr_array([]))),  # no inbound publishing (see above)
              ("krun_disable_implicit_console", (u32(ctx),)),
              ("krun_add_virtio_console_default", (u32(ctx), ctypes.c_int(0), ctypes.c_int(1), ctypes.c_int(2))),
              ("krun_add_virtiofs3", (u32(ctx), cfg.workspace_tag.encode(), workspace.encode(),
                                      ctypes.c_uint64(0), ctypes.c_bool(False))),
              ("krun_set_workdir", (u32(ctx), cfg.workdir.encode())),
              ("krun_set_exec", (u32(ctx), cfg.exec_path.encode(), _cstr_array(list(cfg.argv)),
                                 _cstr_array(list(cfg.env))))]
    for name, args in steps:
        rc = _fn(lib, name)(*args)
        if rc < 0:
            _fn(lib, "krun_free_ctx")(u32(ctx))
            raise AgentboxError(f"libkrun setup failed: {name} returned {rc}")
    attach = os.environ.get(ATTACH_SOCKET_ENV)
    if attach:
        _add_attach_channel(lib, ctx, attach)
    install_filter()
    rc = _fn(lib, "krun_start_enter")(u32(ctx))
    raise AgentboxError(f"libkrun start failed: krun_start_enter returned {rc}")


def _add_attach_channel(lib: ctypes.CDLL, ctx: int, path: str) -> None:
    """The optional ``agentbox attach`` channel: libkrun listens on ``path`` for the guest's vsock port."""
    try:
        fn = lib.krun_add_vsock_port2
    except AttributeError:
        print("agentbox: this libkrun has no krun_add_vsock_port2; the guest starts without an "
              "`agentbox attach` channel", file=sys.stderr, flush=True)
        return
    fn.restype = ctypes.c_int32
    rc = fn(ctypes.c_uint32(ctx), ctypes.c_uint32(contract.ATTACH_VSOCK_PORT), path.encode(), ctypes.c_bool(True))
    if rc < 0:
        print(f"agentbox: krun_add_vsock_port2 returned {rc}; the guest starts without an "
              "`agentbox attach` channel", file=sys.stderr, flush=True)


def helper_main(path: str) -> int:
    """``__agentbox_microvm_enter <launch.conf>``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise AgentboxError(f"failed to read microvm launch config '{path}': {exc.strerror}") from None
    return enter(decode(text))


class LibkrunHandle:
    """A running helper (``krun_start_enter`` never returns: the process is the VM).

    The helper's stdin/stdout are the guest command's stdio (libkrun's default
    console: non-TTY fds become the ``krun-stdin``/``krun-stdout`` ports), so a
    non-interactive guest whose command is ``agentbox-guest-init agent`` is
    reached through :meth:`agent_client`. The helper's stderr (guest stderr and
    console output) is recorded into ``console.log`` in the task dir, with the
    size cap of :mod:`agentbox_runtime.vmm.console_log` (a guest that outlives its caller
    writes it directly, uncapped). :attr:`attach_socket` is libkrun's end of the
    guest's ``agentbox attach`` channel (None for an interactive guest).
    """

    def __init__(self, proc: subprocess.Popen[bytes], task_dir: Path,
                 recorder: ConsoleRecorder | None = None, attach_socket: Path | None = None) -> None:
        self.proc, self.task_dir, self.recorder = proc, task_dir, recorder
        self.pid = proc.pid
        self.console_log = task_dir / "console.log"
        self.agent_socket: Path | None = None
        self.console_socket: Path | None = None
        self.attach_socket = attach_socket
        self.accel = "kvm"
        self.boot = "cold"
        self.stop_report: StopReport | None = None

    def agent_client(self, timeout: float) -> AgentClient:
        """The agent on the guest command's stdio (requires a non-interactive start)."""
        if self.proc.stdout is None or self.proc.stdin is None:
            raise AgentboxError("this libkrun guest was started interactively: its stdio is the terminal")
        return AgentClient(self.proc.stdout.fileno(), self.proc.stdin.fileno())

    def poll(self) -> int | None:
        rc = self.proc.poll()
        return None if rc is None else (rc if 0 <= rc <= 255 else 1)

    def wait(self, timeout: float | None) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"guest still running after {timeout:.0f}s; console log "
                               f"{self.console_log}:\n{tail(self.console_log)}") from None
        if self.recorder is not None:
            self.recorder.join(2.0)  # the last console lines, before anyone reads the log
        return rc if 0 <= rc <= 255 else 1

    def shutdown(self, timeout: float, poweroff: shutdown.Request | None = None) -> StopReport:
        """The shutdown ladder within about ``timeout`` s: ``poweroff`` (the guest's own, through its
        agent), then SIGTERM (libkrun's VMM exits on it), then SIGKILL. Once: a second call returns
        the first report."""
        if self.stop_report is None:
            try:
                self.stop_report = shutdown.stop(self.proc, timeout=timeout, poweroff=poweroff)
            finally:
                self._close_pipes()
        return self.stop_report

    def kill(self) -> None:
        """Stop now: no poweroff (SIGTERM, then SIGKILL); a no-op once stopped."""
        self.shutdown(0.0)

    def _close_pipes(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self.attach_socket is not None:
            shutil.rmtree(self.attach_socket.parent, ignore_errors=True)


class LibkrunDriver:
    """Boots guests through the microvm helper and libkrun."""

    name = "libkrun"

    def available(self) -> tuple[bool, str]:
        try:
            load_library()
        except AgentboxError as exc:
            return False, str(exc)
        return True, "usable"

    def start(self, spec: VmSpec) -> LibkrunHandle:
        ok, why = self.available()
        if not ok:
            raise AgentboxError(f"libkrun backend unavailable: {why}")
        spec.task_dir.mkdir(parents=True, exist_ok=True)
        launch = spec.task_dir / "launch.conf"
        argv = [sys.executable, "-m", "agentbox_runtime.cli", "__agentbox_microvm_enter", str(launch)]
        pipe = None if spec.interactive else subprocess.PIPE
        env = dict(os.environ)
        env.setdefault("RUST_LOG", CONSOLE_LOG_FILTER)
        attach: Path | None = None
        if not spec.interactive:
            attach = socket_dir(spec.task_dir) / "attach.sock"
            attach.unlink(missing_ok=True)
            env[ATTACH_SOCKET_ENV] = str(attach)
        recorder, stderr, log_r, log_w = None, None, -1, -1
        if spec.outlive_caller:  # no pipe to a recorder that dies with the caller
            stderr = os.open(spec.task_dir / "console.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                             0o600)
        elif not spec.interactive:
            recorder = ConsoleRecorder(spec.task_dir / "console.log")
            log_r, log_w = os.pipe()
            stderr = log_w
        try:
            proc = subprocess.Popen(argv, stdin=pipe, stdout=pipe, stderr=stderr, env=env,
                                    start_new_session=not spec.interactive,
                                    preexec_fn=None if spec.outlive_caller else die_with_parent)
        except OSError as exc:
            for fd in (log_r, log_w):
                if fd >= 0:
                    os.close(fd)
            raise AgentboxError(f"failed to start microvm helper for '{launch}': {exc.strerror}") from None
        finally:
            if spec.outlive_caller and stderr is not None:
                os.close(stderr)
        if recorder is not None:
            os.close(log_w)
            recorder.start(log_r)
        (spec.task_dir / "helper.pid").write_text(str(proc.pid))
        return LibkrunHandle(proc, spec.task_dir, recorder, attach)
