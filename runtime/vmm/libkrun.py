"""Direct libkrun through ctypes (reference 9.7): the helper's call order and the driver.

The helper process (``agentbox __agentbox_microvm_enter <launch.conf>``) loads
``$AGENTBOX_LIBKRUN_LIBRARY`` or ``libkrun.so.1`` then ``libkrun.so`` and makes
exactly these calls: create_ctx, set_log_level(0), set_vm_config, set_root,
add_disk per disk, disable_implicit_console, add_virtio_console_default(0,1,2),
add_virtiofs3(workspace), set_workdir, set_exec, start_enter. A setup failure
frees the context.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

from guest_init.launch_config import LaunchConfig, decode
from runtime.errors import AgentboxError
from runtime.vmm.base import VmSpec
from runtime.vmm.qemu import _die_with_parent

SONAMES = ("libkrun.so.1", "libkrun.so")


def load_library() -> ctypes.CDLL:
    names = [os.environ["AGENTBOX_LIBKRUN_LIBRARY"]] if os.environ.get("AGENTBOX_LIBKRUN_LIBRARY") else list(SONAMES)
    last = ""
    for name in names:
        try:
            return ctypes.CDLL(name, mode=os.RTLD_NOW)
        except OSError as exc:
            last = f"failed to load {name}: {exc}"
    raise AgentboxError(last)


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
    ctx = _fn(lib, "krun_create_ctx")()
    if ctx < 0:
        raise AgentboxError("libkrun setup failed: create ctx") from AgentboxError(f"krun_create_ctx returned {ctx}")
    u32 = ctypes.c_uint32
    steps = [("krun_set_log_level", (u32(0),)),
             ("krun_set_vm_config", (u32(ctx), ctypes.c_uint8(cfg.vcpus), u32(cfg.ram_mib))),
             ("krun_set_root", (u32(ctx), cfg.task_rootfs.encode()))]
    steps += [("krun_add_disk", (u32(ctx), d.id.encode(), d.path.encode(), ctypes.c_bool(d.read_only)))
              for d in cfg.disks]
    steps += [("krun_disable_implicit_console", (u32(ctx),)),
              ("krun_add_virtio_console_default", (u32(ctx), ctypes.c_int(0), ctypes.c_int(1), ctypes.c_int(2))),
              ("krun_add_virtiofs3", (u32(ctx), cfg.workspace_tag.encode(), cfg.workspace_source.encode(),
                                      ctypes.c_uint64(0), ctypes.c_bool(False))),
              ("krun_set_workdir", (u32(ctx), cfg.workdir.encode())),
              ("krun_set_exec", (u32(ctx), cfg.exec_path.encode(), _cstr_array(list(cfg.argv)),
                                 _cstr_array(list(cfg.env))))]
    for name, args in steps:
        rc = _fn(lib, name)(*args)
        if rc < 0:
            _fn(lib, "krun_free_ctx")(u32(ctx))
            raise AgentboxError(f"libkrun setup failed: {name} returned {rc}")
    rc = _fn(lib, "krun_start_enter")(u32(ctx))
    raise AgentboxError(f"libkrun start failed: krun_start_enter returned {rc}")


def helper_main(path: str) -> int:
    """``__agentbox_microvm_enter <launch.conf>``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise AgentboxError(f"failed to read microvm launch config '{path}': {exc.strerror}") from None
    return enter(decode(text))


class LibkrunHandle:
    def __init__(self, proc: subprocess.Popen[bytes], task_dir: Path) -> None:
        self.proc, self.task_dir = proc, task_dir
        self.pid = proc.pid
        self.console_log = task_dir / "console.log"
        self.agent_socket = None
        self.console_socket = None
        self.accel = "kvm"

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None) -> int:
        rc = self.proc.wait(timeout)
        return rc if 0 <= rc <= 255 else 1

    def shutdown(self, timeout: float) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


class LibkrunDriver:
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
        argv = [sys.executable, "-m", "runtime.cli", "__agentbox_microvm_enter", str(spec.task_dir / "launch.conf")]
        try:
            proc = subprocess.Popen(argv, start_new_session=not spec.interactive, preexec_fn=_die_with_parent)
        except OSError as exc:
            raise AgentboxError(f"failed to start microvm helper for '{spec.task_dir / 'launch.conf'}'") from exc
        return LibkrunHandle(proc, spec.task_dir)
