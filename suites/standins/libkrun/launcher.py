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
import sys
import tempfile
from pathlib import Path

from agentbox_runtime.private_dir import runtime_dir
from agentbox_runtime.vmm import initramfs
from agentbox_runtime.vmm.krun_guest import INIT_FAILED, Disk, GuestSpec, Share, VsockListen, boot


def say(msg: str) -> None:
    print(f"krun-standin: {msg}", file=sys.stderr, flush=True)


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
                     shares=[Share(s["tag"], s["path"], bool(s["read_only"])) for s in raw["shares"]],
                     vsock_listen=[VsockListen(int(v["port"]), v["path"]) for v in raw.get("vsock_listen", [])],
                     console=(int(console[0]), int(console[1]), int(console[2])))


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
