"""What ``krun_start_enter`` of the QEMU-backed libkrun stand-in execs into.

``python launcher.py --config-fd N`` reads the context the library recorded
(JSON on fd N: vm config, root, disks, shares, workdir, exec, env, console
fds) and boots it with :func:`agentbox_runtime.vmm.krun_guest.boot` (the root's own
kernel through qemu, the console relayed to the recorded fds the way libkrun's
default virtio console does), then exits with the guest command's status. See
the header of ``libkrun_qemu.c`` for what differs from libkrun.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from agentbox_runtime.private_dir import runtime_dir
from agentbox_runtime.vmm import initramfs
from agentbox_runtime.vmm.krun_guest import INIT_FAILED, Disk, GuestSpec, Share, VsockListen, boot


def say(msg: str) -> None:
    print(f"krun-standin: {msg}", file=sys.stderr, flush=True)


LEVELS = ("off", "error", "warn", "info", "debug", "trace")
CONSOLE_TARGET = "init_or_kernel"


def console_logged(level: int, rust_log: str | None) -> bool:
    """Whether libkrun's logger lets console text through: an error record of target
    ``init_or_kernel`` (libkrun v1.18 ``port_io.rs`` ``PortOutputLog``). ``krun_set_log_level(level)``
    installs env_logger with ``level`` as the default filter and ``RUST_LOG`` overriding it
    (``lib.rs`` ``krun_set_log_level``); -1 means no logger was installed, so nothing is logged. The
    longest directive whose target prefixes ``init_or_kernel`` decides; no directive at all means
    error, as in env_logger."""
    if level < 0:
        return False
    filters = rust_log if rust_log is not None else LEVELS[min(level, len(LEVELS) - 1)]
    directives = [d.strip() for d in filters.split("/")[0].split(",") if d.strip()]
    if not directives:
        return True
    best, enabled = -1, False
    for directive in directives:
        target, has_level, wanted = directive.partition("=")
        if not has_level:
            target, wanted = ("", target) if target.lower() in LEVELS else (target, "trace")
        if wanted.lower() not in LEVELS or not CONSOLE_TARGET.startswith(target):
            continue
        if len(target) > best:
            best, enabled = len(target), wanted.lower() != "off"
    return enabled


def opened_as_libkrun_does(share: Share) -> bool:
    """Whether libkrun's passthrough file server would serve ``share``: it opens the root with
    ``O_PATH|O_NOFOLLOW`` (v1.18 ``passthrough.rs`` ``PassthroughFs::init``), so a symlink, such as
    ``/proc/self/fd/N``, is the link itself and the guest cannot mount the tag."""
    try:
        fd = os.open(share.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        say(f"virtiofs {share.tag}: cannot open {share.path}: {exc.strerror}; the guest cannot mount it")
        return False
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            return True
    finally:
        os.close(fd)
    say(f"virtiofs {share.tag}: {share.path} opened O_PATH|O_NOFOLLOW (as libkrun opens a share root) is not a "
        "directory; the guest cannot mount it")
    return False


def read_spec(fd: int) -> GuestSpec:
    """The recorded libkrun context as a guest spec (shares are not mounted by PID 1: libkrun leaves
    that to the guest, as agentbox-guest-init does for the workspace)."""
    with os.fdopen(fd, "r") as f:
        raw = json.load(f)
    console = raw.get("console") or (0, 1, 2)
    return GuestSpec(vcpus=int(raw["vcpus"]), ram_mib=int(raw["ram_mib"]), root=Path(raw["root"]),
                     workdir=raw.get("workdir") or "/", exec_path=raw["exec_path"], argv=list(raw["argv"]),
                     env=list(raw["env"]),
                     disks=[Disk(d["id"], d["path"], bool(d["read_only"]), d["format"]) for d in raw["disks"]],
                     shares=[share for share in (Share(s["tag"], s["path"], bool(s["read_only"])) for s in raw["shares"])
                             if opened_as_libkrun_does(share)],
                     vsock_listen=[VsockListen(int(v["port"]), v["path"]) for v in raw.get("vsock_listen", [])],
                     console=(int(console[0]), int(console[1]), int(console[2])),
                     console_logged=console_logged(int(raw.get("log_level", -1)), os.environ.get("RUST_LOG")))


def main() -> int:
    p = argparse.ArgumentParser(prog="krun-standin-launcher")
    p.add_argument("--config-fd", type=int, required=True)
    spec = read_spec(p.parse_args().config_fd)
    work = Path(tempfile.mkdtemp(prefix="k", dir=runtime_dir("krun", for_sockets=True)))
    try:
        return boot(spec, work)
    except (OSError, RuntimeError, initramfs.InitramfsError) as exc:
        say(f"{type(exc).__name__}: {exc}")
        if os.environ.get("KRUN_STANDIN_DEBUG"):
            import traceback

            traceback.print_exc()
        return INIT_FAILED
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
