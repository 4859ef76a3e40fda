"""The container process of a krun guest: what conmon watches, and what becomes the VM.

``create`` starts it (``python -m agentbox_runtime.oci.shim``) with the container's stdio, after it
wrote ``/.krun_config.json`` into the rootfs and checked the ``krun.disk.*`` images. Before it
reports ready on ``--ready-fd`` it does what crun does before the container waits for ``start``:
it builds the container's mount tree in a private mount namespace
(:mod:`agentbox_runtime.oci.mount_tree`, at ``<state dir>/root``), enters the container's network
namespace and loads the share filter. It then waits on ``start.fifo`` until ``start``, takes
vCPUs and RAM as crun's ``libkrun_exec`` does (:mod:`agentbox_runtime.oci.vm_config`: a bad
annotation is one line on the container's stderr and exit status 1, as ``error(EXIT_FAILURE)``
there), wires the network (:mod:`agentbox_runtime.oci.network`) and boots the tree with
:func:`agentbox_runtime.vmm.krun_guest.boot` and no command: the guest's init reads it from
``/.krun_config.json``. Its exit status is the guest command's (125/126/127 when the guest cannot
be set up, 128+N when stopped by signal N).
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
from agentbox_runtime.oci import krun_disks, mount_tree, vm_config
from agentbox_runtime.oci.bundle import Bundle, load
from agentbox_runtime.oci.network import attach_guest, enter_netns
from agentbox_runtime.private_dir import runtime_dir
from agentbox_runtime.vmm import share_filter
from agentbox_runtime.vmm.initramfs import InitramfsError
from agentbox_runtime.vmm.krun_guest import INIT_FAILED, Disk, GuestSpec, Share, boot

TREE = "root"
CRUN_ERROR_STATUS = 1  # crun's error(EXIT_FAILURE, ...) in libkrun_exec


def say(message: str) -> None:
    print(f"agentbox-krun-runtime: {message}", file=sys.stderr, flush=True)


def tree_dir(state_dir: Path) -> Path:
    """Where the container's mount tree is built (in the shim's mount namespace only)."""
    return state_dir / TREE


def prepare_tree(bundle: Bundle, state_dir: Path) -> Path:
    """The container's mount tree (see :mod:`agentbox_runtime.oci.mount_tree`)."""
    tree = tree_dir(state_dir)
    tree.mkdir(mode=0o700, exist_ok=True)
    mount_tree.build(bundle.rootfs, tree, bundle.mounts, bundle.path)
    return tree


def guest_spec(bundle: Bundle, tree: Path, state_dir: Path) -> GuestSpec:
    """The libkrun context crun's krun handler builds for ``bundle``: the tree as root (its directory
    submounts mounted again at their paths, as virtio-fs announces them), the VM's size, the disks;
    no command (``krun_set_exec`` is not called: init reads ``/.krun_config.json``)."""
    shares = [Share(f"krun-sub{i}", str(tree) + guest, mount_at=guest)
              for i, guest in enumerate(mount_tree.submounts(tree))]
    return GuestSpec(vcpus=vm_config.vcpus(bundle), ram_mib=vm_config.ram_mib(bundle), root=tree,
                     disks=[Disk(d.id, d.path, d.read_only) for d in krun_disks.parse(bundle)], shares=shares,
                     kernel_log=state_dir / "console.log")


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
        tree = prepare_tree(bundle, args.state_dir)
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
    work = Path(tempfile.mkdtemp(prefix="o", dir=runtime_dir("krun", for_sockets=True)))
    try:
        spec = guest_spec(bundle, tree, args.state_dir)
        spec.network = attach_guest() if bundle.netns else None
        return boot(spec, work)
    except vm_config.VmConfigError as exc:
        say(str(exc))
        return CRUN_ERROR_STATUS
    except (AgentboxError, OSError, RuntimeError, InitramfsError) as exc:
        say(str(exc))
        return INIT_FAILED
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
