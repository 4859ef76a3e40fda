"""The container process of a krun guest: what conmon watches, and what becomes the VM.

``create`` starts it (``python -m agentbox_runtime.oci.shim``) with the container's stdio.
It enters the container's network namespace, loads the share filter, reports
ready on ``--ready-fd``, waits on ``start.fifo`` until ``start``, then wires the
network (:mod:`agentbox_runtime.oci.network`), exports the bind-mounted directories
(:mod:`agentbox_runtime.vmm.host_share`) and boots the rootfs with
:func:`agentbox_runtime.vmm.krun_guest.boot`. Its exit status is the guest command's
(125/126/127 when the guest cannot be set up, 128+N when stopped by signal N).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import tempfile
import termios
from pathlib import Path

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.oci.bundle import Bundle, load
from agentbox_runtime.oci.network import attach_guest, enter_netns
from agentbox_runtime.private_dir import runtime_dir
from agentbox_runtime.vmm import host_share, share_filter
from agentbox_runtime.vmm.initramfs import InitramfsError
from agentbox_runtime.vmm.krun_guest import INIT_FAILED, Disk, GuestSpec, Share, boot


def say(message: str) -> None:
    print(f"agentbox-krun-runtime: {message}", file=sys.stderr, flush=True)


def guest_spec(bundle: Bundle, state_dir: Path, exports: list[host_share.ShareExport]) -> GuestSpec:
    """The libkrun context crun would build for ``bundle``; ``exports`` receives the share exports."""
    uid, gid = host_share.guest_ids(dict(e.split("=", 1) for e in bundle.env if "=" in e))
    shares = []
    for i, mount in enumerate(bundle.dirs):
        export = host_share.export(Path(mount.source), read_only=mount.read_only, guest_uid=uid, guest_gid=gid)
        exports.append(export)
        shares.append(Share(f"krun-vol{i}", export.path, mount.read_only, mount.destination))
    return GuestSpec(vcpus=bundle.cpus(), ram_mib=bundle.ram_mib(), root=bundle.rootfs, exec_path=bundle.args[0],
                     argv=bundle.args[1:], env=bundle.env, workdir=bundle.cwd,
                     disks=[Disk(d.id, d.path, d.read_only) for d in bundle.disks()], shares=shares,
                     tmpfs=bundle.tmpfs, files=bundle.files, user=(bundle.uid, bundle.gid),
                     hostname=bundle.hostname, kernel_log=state_dir / "console.log")


def wait_for_start(fifo: Path) -> None:
    """Block until ``start`` opens the fifo for writing. No timeout, by the OCI lifecycle: a created
    container waits for ``start``, ``kill`` or ``delete`` as long as its caller wants (as runc's init does)."""
    with open(fifo, "rb") as f:
        f.read(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agentbox-krun-runtime-shim")
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--bundle", required=True)
    p.add_argument("--ready-fd", required=True, type=int)
    p.add_argument("--tty", action="store_true")
    args = p.parse_args(argv)
    ready = os.fdopen(args.ready_fd, "w")
    try:
        if args.tty:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        bundle = load(args.bundle)
        if bundle.netns:
            enter_netns(bundle.netns)
        share_filter.install()
    except (AgentboxError, OSError) as exc:
        ready.write(f"error: {exc}")
        ready.close()
        return INIT_FAILED
    ready.write("ok")
    ready.close()
    wait_for_start(args.state_dir / "start.fifo")
    (args.state_dir / "started").touch()
    exports: list[host_share.ShareExport] = []
    work = Path(tempfile.mkdtemp(prefix="o", dir=runtime_dir("krun", for_sockets=True)))
    try:
        spec = guest_spec(bundle, args.state_dir, exports)
        spec.network = attach_guest() if bundle.netns else None
        return boot(spec, work)
    except (AgentboxError, OSError, RuntimeError, InitramfsError) as exc:
        say(str(exc))
        return INIT_FAILED
    finally:
        for export in exports:
            export.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
