"""Snapshot boot for the qemu backend: a guest restored from a saved template instead of booted.

Every cold boot under TCG spends about 5 s (kernel, modules, PID 1) doing the
same work. A *template* is one guest booted that far, once per input set, and
saved with QEMU's migration stream to a file; each later guest starts qemu
with ``-incoming`` from that file and is running within a second.

What a template holds and how a restore differs from a cold boot:

- **Root.** A snapshot cannot hold a 9p root (QEMU blocks migration while a 9p
  export is mounted), so the template's root is the image as a read-only ext4
  image (:mod:`agentbox_runtime.vmm.root_image`) on virtio-scsi (``/dev/sda``)
  under an overlay whose upper layer is a tmpfs in guest memory: each restored
  guest's root writes are its own and vanish with it. (A cold guest's root is
  the task's own host overlay over 9p.)
- **Where it stops.** PID 1 (:mod:`agentbox_guest_init.vminit`, kernel command
  line ``agentbox.launch=port``) mounts the kernel filesystems, loads the late
  modules, brings up the network, says ``ready`` on the ``org.agentbox.launch``
  port and blocks. Nothing per-test is mounted: the workspace 9p share is
  present but unmounted, and there are no persistent disks.
- **After a restore** (:meth:`SnapshotDriver.start`): qemu runs the same device
  set (only the socket and workspace paths differ); the persistent disks are
  hot-added over QMP (``vda``, ``vdb`` in launch order, as at a cold boot);
  then the host sends one line on the launch port: the launch config, 64 bytes
  from the host's RNG and the host's clock. PID 1 reseeds the kernel CRNG with
  the bytes (credited, then forced reseed), steps ``CLOCK_REALTIME``, writes a
  fresh ``/etc/machine-id`` and a random ``/run/agentbox/instance-id``, waits
  for the disks, acknowledges, and goes on exactly as a cold boot does: the
  launch command (``microvm enter`` mounts the workspace and disks, runs the
  preps, starts the agent).
- **What restored guests still share**: the kernel's KASLR offset and the
  secrets it drew once during the template's boot (hash seeds, TCP ISN keys),
  and anything a process of the template wrote before the save (nothing of
  ours runs then but PID 1). ``boot_id`` is drawn at its first read, which no
  template makes, so each guest draws its own after the reseed; still, a
  template that read it would share it: nothing may tell guests apart by
  ``boot_id``; use ``/run/agentbox/instance-id``.
- **Key and invalidation.** A template is keyed by the image digest, a digest of
  the image's guest-init files, the kernel file's SHA-256, the initramfs base
  (generator version, module set, ``/init``), the qemu binary (path, size,
  mtime), memory, vCPUs, accelerator (with KVM: the host CPU's model and
  flags, as the guest runs ``-cpu host``), the workspace mount tag, the kernel
  command line the template booted with and :data:`FORMAT`. Any change is a
  different key: a new template is built and the stale ones of the same shape
  (memory, vCPUs, accelerator) are removed.
  A restore that fails (qemu refuses the stream, the guest does not
  acknowledge) removes its template and the guest boots cold, with a warning.
  A template that cannot be built is marked ``failed`` in its directory: every
  guest of that key boots cold at once (remove the directory to retry).

Templates live under ``$XDG_CACHE_HOME/agentbox/qemu/snapshots`` (0700), one
directory per key holding the initramfs, the saved state and ``meta.json``
(written last: a directory without it is incomplete and rebuilt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from agentbox_guest_init import contract
from agentbox_guest_init.launch_config import LaunchConfig, encode
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.retry import WaitTimeout, retry
from agentbox_runtime.vmm import initramfs, qmp, root_image, shutdown
from agentbox_runtime.vmm.base import VmSpec
from agentbox_runtime.vmm.console_log import ConsoleListener
from agentbox_runtime.vmm.host import cache_dir, qemu_binary, socket_dir, tail
from agentbox_runtime.vmm.qemu import (CMDLINE, QemuDriver, QemuHandle, control_args, fast_boot, machine_args, net_args,
                                       port_args, share_args, status_listener)
from agentbox_runtime.vmm.qemu_opts import opts, quote
from agentbox_runtime.vmm.share_filter import require_filter, vmm_preexec

log = logging.getLogger("agentbox")

FORMAT = "1"
"""Bumped when what a template holds changes shape."""
SNAPSHOT_CMDLINE = f"{CMDLINE} agentbox.root=blk agentbox.launch=port"
LAUNCH_SOCKET = "launch.sock"
TEMPLATE_BOOT_TIMEOUT_S = 300.0
"""How long the template's guest may take to say ``ready`` (a cold TCG boot takes about 5-10 s)."""
SAVE_TIMEOUT_S = 120.0
RESTORE_TIMEOUT_S = 60.0
"""From qemu's start to the guest's acknowledgement of its launch line."""
SEED_BYTES = 64


class RestoreFailed(AgentboxError):
    """A restore from a template did not reach the guest's acknowledgement."""


@dataclass(frozen=True)
class TemplateInputs:
    """What a template is built from; every field is part of its key."""

    image_rootfs: Path
    """The image's read-only rootfs (the microvm image cache entry)."""
    image_digest: str
    guest_init: Path
    """The guest-init executable inside ``image_rootfs``."""
    kernel: Path
    """The kernel file (bzImage) the guest boots."""
    ram_mib: int
    vcpus: int
    accel: str
    """``tcg`` or ``kvm`` (resolved, never ``auto``)."""
    workspace_tag: str = contract.WORKSPACE_TAG
    rtc_base: str | None = None
    """qemu ``-rtc base=`` of the template (tests: a template whose clock is far off)."""


@dataclass(frozen=True)
class Template:
    """A template's files (see the module docstring); complete once :attr:`meta` exists."""

    directory: Path
    inputs: TemplateInputs
    key: str
    root_image: Path
    boot_kernel: Path
    firmware: tuple[str, ...]
    initramfs_base: Path
    """The cached initramfs base (``SNAPSHOT_WANTED``) the template's initrd is made of."""

    @property
    def state(self) -> Path:
        """The saved migration stream."""
        return self.directory / "state"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def meta(self) -> Path:
        return self.directory / "meta.json"

    @property
    def failed(self) -> Path:
        """Written when building failed: later starts of the same key boot cold at once."""
        return self.directory / "failed"

    @property
    def complete(self) -> bool:
        return self.meta.is_file() and self.state.is_file()


def snapshots_dir() -> Path:
    """``$XDG_CACHE_HOME/agentbox/qemu/snapshots``."""
    return cache_dir() / "snapshots"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def qemu_identity() -> str:
    """The qemu binary as a key part: its resolved path, size and mtime."""
    found = shutil.which(qemu_binary())
    if found is None:
        return "missing"
    st = os.stat(found)
    return f"{os.path.realpath(found)}:{st.st_size}:{st.st_mtime_ns}"


def host_cpu_identity() -> str:
    """The host CPU's model and flags (a KVM guest's ``-cpu host`` is this CPU: a template saved on
    one CPU must not be restored on another, e.g. through a shared home directory)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    wanted = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags")]
    return hashlib.sha256("\n".join(sorted(set(wanted))).encode()).hexdigest()[:16]


def template_key(inputs: TemplateInputs, initramfs_base: Path, guest_init_digest: str) -> str:
    """The key of the template built from ``inputs`` (see the module docstring)."""
    parts = [FORMAT, SNAPSHOT_CMDLINE, inputs.image_digest, guest_init_digest, _file_sha256(inputs.kernel),
             initramfs_base.name, qemu_identity(), str(inputs.ram_mib), str(inputs.vcpus), inputs.accel,
             inputs.workspace_tag, inputs.rtc_base or "", host_cpu_identity() if inputs.accel == "kvm" else ""]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def machine_argv(t: Template, sock: Path, workspace: str | Path) -> list[str]:
    """The template's qemu command line with its per-guest paths: sockets in ``sock``, the
    workspace share at ``workspace``. Identical devices, in the same order, for the template boot
    and every restore."""
    i = t.inputs
    argv = machine_args(ram_mib=i.ram_mib, vcpus=i.vcpus, kernel=t.boot_kernel, initrd=t.initrd, accel=i.accel,
                        cmdline=SNAPSHOT_CMDLINE, firmware=t.firmware)
    if i.rtc_base:
        argv += ["-rtc", f"base={quote(i.rtc_base)}"]
    argv += control_args(sock)
    argv += port_args("launch", contract.LAUNCH_PORT_NAME, "socket", path=sock / LAUNCH_SOCKET, server="on",
                      wait="off")
    argv += ["-device", "virtio-scsi-pci,id=scsi0",
             "-drive", opts(f"file={quote(t.root_image)}", **{"if": "none"}, id="root", format="raw",
                            readonly="on", cache="writeback"),
             "-device", "scsi-hd,drive=root,bus=scsi0.0"]
    argv += share_args("ws", workspace, i.workspace_tag)
    return argv + net_args()


def restore_argv(t: Template, sock: Path, workspace: str | Path) -> list[str]:
    """:func:`machine_argv` loading the saved state."""
    return [*machine_argv(t, sock, workspace), "-incoming", f"exec:cat {shlex.quote(str(t.state))}"]


def prepare(inputs: TemplateInputs, cache: Path | None = None) -> Template:
    """The :class:`Template` for ``inputs`` (its files may not exist yet: :func:`ensure` builds)."""
    cache = cache or snapshots_dir()
    version = initramfs.kernel_version(inputs.image_rootfs, inputs.kernel)
    base = initramfs.cached_base(inputs.image_rootfs, version, cache_dir() / "initramfs", initramfs.SNAPSHOT_WANTED)
    gi_digest = root_image.guest_init_hash(inputs.image_rootfs, inputs.guest_init)
    key = template_key(inputs, base, gi_digest)
    digest_part = inputs.image_digest.partition(":")[2][:16] or "image"
    root = root_image.ensure(inputs.image_rootfs, f"{digest_part}-{gi_digest}", cache)
    boot_kernel, firmware = fast_boot(inputs.kernel)
    return Template(cache / key, inputs, key, root, boot_kernel, tuple(firmware), base)


def ensure(inputs: TemplateInputs, cache: Path | None = None) -> Template:
    """The complete template for ``inputs``, built when missing (once across processes)."""
    cache = cache or snapshots_dir()
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    with FileLock(str(cache / f".template-{os.getuid()}.lock"), timeout=TEMPLATE_BOOT_TIMEOUT_S + SAVE_TIMEOUT_S):
        t = prepare(inputs, cache)
        if t.failed.is_file():
            raise RestoreFailed(f"the snapshot template {t.key} failed to build before "
                                f"({t.failed.read_text().strip()[-300:]}); remove {t.directory} to try again")
        if not t.complete:
            try:
                build(t)
            except (AgentboxError, OSError) as exc:
                with contextlib.suppress(OSError):
                    t.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                    t.failed.write_text(f"{exc}\n")
                raise
            prune(t)
    return t


def build(t: Template) -> None:
    """Boot the template's guest to ``ready`` and save it (see the module docstring)."""
    shutil.rmtree(t.directory, ignore_errors=True)
    t.directory.mkdir(parents=True, mode=0o700)
    initramfs.task_initrd(t.initramfs_base, "", t.initrd)  # no launch.conf: PID 1 reads it from the port
    placeholder = t.directory / "workspace"
    placeholder.mkdir(mode=0o700)
    require_filter()
    sock = socket_dir(t.directory)
    console = ConsoleListener(sock / "serial.sock", t.directory / "console.log")
    status = status_listener(sock, t.directory)
    argv = machine_argv(t, sock, placeholder)
    started = time.monotonic()
    with open(t.directory / "qemu.log", "ab") as qemu_log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=qemu_log,
                                start_new_session=True, preexec_fn=vmm_preexec)
    try:
        with _connect(sock / LAUNCH_SOCKET, proc, t.directory, 30.0) as launch:
            _read_line(launch, b"ready", TEMPLATE_BOOT_TIMEOUT_S, proc, t.directory)
            booted = time.monotonic() - started
            qmp.execute(sock / "qmp.sock", "stop")
            partial = t.directory / "state.partial"
            qmp.execute(sock / "qmp.sock", "migrate", {"uri": f"exec:cat > {shlex.quote(str(partial))}"})
            _wait_migrated(sock / "qmp.sock", t.directory)
            os.replace(partial, t.state)
        saved = time.monotonic() - started - booted
        meta: dict[str, object] = {"key": t.key, "format": FORMAT, "inputs": {k: str(v) for k, v in asdict(t.inputs).items()},
                "root_image": str(t.root_image), "boot_s": round(booted, 3),
                "save_s": round(saved, 3), "state_bytes": t.state.stat().st_size,
                "created": time.time(), "argv": argv}
        t.meta.write_text(json.dumps(meta, indent=1))
        log.info("agentbox: built qemu snapshot template %s (boot %.1fs, save %.1fs, %d MiB)", t.key,
                 booted, saved, t.state.stat().st_size >> 20)
    finally:
        shutdown.stop(proc, timeout=5.0, terminate=lambda budget: qmp.execute(sock / "qmp.sock", "quit",
                                                                               timeout=budget / 2))
        console.close()
        status.close()
        shutil.rmtree(sock, ignore_errors=True)


def prune(keep: Template) -> None:
    """Remove the templates of the same shape (memory, vCPUs, accelerator) as ``keep`` but another
    key (a stale image, kernel, guest-init or qemu), and root images no template uses."""
    cache = keep.directory.parent
    used = {keep.root_image}
    for meta_path in cache.glob("*/meta.json"):
        if meta_path.parent == keep.directory:
            continue
        try:
            meta = json.loads(meta_path.read_text())
            inputs = meta["inputs"]
            same_shape = (inputs["ram_mib"], inputs["vcpus"], inputs["accel"]) == \
                (str(keep.inputs.ram_mib), str(keep.inputs.vcpus), keep.inputs.accel)
        except (OSError, ValueError, KeyError):
            same_shape = True  # unreadable: not worth keeping
            meta = {}
        if same_shape:
            shutil.rmtree(meta_path.parent, ignore_errors=True)
        else:
            used.add(Path(str(meta.get("root_image", ""))))
    for image in cache.glob("root-*.img"):
        if image not in used:
            image.unlink(missing_ok=True)


def remove(t: Template) -> None:
    """Forget ``t`` (a restore from it failed)."""
    shutil.rmtree(t.directory, ignore_errors=True)


class _Channel:
    """The host end of the launch port: a connected unix socket with a read buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def __enter__(self) -> _Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _connect(path: Path, proc: subprocess.Popen[bytes], directory: Path, timeout: float) -> _Channel:
    found: list[socket.socket] = []

    def connected(_last_try: bool) -> bool:
        if proc.poll() is not None:
            raise RestoreFailed(f"qemu exited with status {proc.returncode}: {tail(directory / 'qemu.log', 10)}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
        except OSError:
            s.close()
            return False
        found.append(s)
        return True

    try:
        retry(connected, timeout=timeout, interval=0.01)
    except WaitTimeout:
        raise RestoreFailed(f"qemu did not open {path} within {timeout:.0f}s: "
                            f"{tail(directory / 'qemu.log', 10)}") from None
    return _Channel(found[0])


def _read_line(ch: _Channel, expected: bytes, timeout: float, proc: subprocess.Popen[bytes], directory: Path) -> None:
    """Read lines from the launch port until ``expected``; :class:`RestoreFailed` with the console's
    tail when qemu exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        line, sep, rest = ch.buffer.partition(b"\n")
        if sep:
            ch.buffer = rest
            if line.strip() == expected:
                return
            continue
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            why = f"qemu exited with status {proc.returncode}" if proc.poll() is not None else \
                f"no '{expected.decode()}' within {timeout:.0f}s"
            raise RestoreFailed(f"snapshot guest: {why}; console:\n{tail(directory / 'console.log', 15)}")
        ch.sock.settimeout(min(left, 0.5))
        try:
            chunk = ch.sock.recv(4096)
        except TimeoutError:
            continue
        if not chunk:
            raise RestoreFailed(f"qemu closed the launch port before '{expected.decode()}'; console:\n"
                                f"{tail(directory / 'console.log', 15)}")
        ch.buffer += chunk


def _wait_migrated(qmp_sock: Path, directory: Path) -> None:
    last: list[Any] = []

    def done(_last_try: bool) -> bool:
        info = qmp.execute(qmp_sock, "query-migrate")
        last[:] = [info]
        status = str(info.get("status"))
        if status == "failed":
            raise RestoreFailed(f"saving the snapshot failed: {info.get('error-desc', info)}; "
                                f"{tail(directory / 'qemu.log', 10)}")
        return status == "completed"

    try:
        retry(done, timeout=SAVE_TIMEOUT_S, interval=0.05)
    except WaitTimeout:
        raise RestoreFailed(f"saving the snapshot did not complete within {SAVE_TIMEOUT_S:.0f}s "
                            f"(last: {last[0] if last else 'none'})") from None


def launch_line(launch: LaunchConfig) -> bytes:
    """The line a restored guest's PID 1 reads: its launch config, a fresh seed, the host clock and
    the serials of the disks to wait for."""
    message = {"launch": encode(launch), "seed": os.urandom(SEED_BYTES).hex(), "time_ns": time.time_ns(),
               "disks": [d.id[:20] for d in launch.disks]}
    return json.dumps(message).encode() + b"\n"


def hot_add_disks(handle: QemuHandle, launch: LaunchConfig) -> None:
    """The launch disks as virtio-blk, in order, each with ``serial=<id>`` (as :func:`disk_args`)."""
    for i, disk in enumerate(launch.disks):
        read_only = bool(disk.read_only)
        handle.qmp("blockdev-add", {"driver": "raw", "node-name": f"d{i}", "read-only": read_only,
                                    "discard": "unmap", "cache": {"direct": False},
                                    "file": {"driver": "file", "filename": str(disk.path), "read-only": read_only}})
        handle.qmp("device_add", {"driver": "virtio-blk-pci", "drive": f"d{i}", "id": f"vdisk{i}",
                                  "serial": disk.id[:20]})


def _wait_running(handle: QemuHandle, deadline: float) -> None:
    while True:
        if handle.proc.poll() is not None:
            raise RestoreFailed(f"qemu exited with status {handle.proc.returncode} while loading the snapshot: "
                                f"{tail(handle.task_dir / 'qemu.log', 10)}")
        status = str(handle.qmp("query-status").get("status"))
        if status == "running":
            return
        if status == "paused":  # loaded: the template was saved stopped, and the run state migrates
            handle.qmp("cont")
            continue
        if time.monotonic() > deadline:
            raise RestoreFailed(f"the restored guest is not running within {RESTORE_TIMEOUT_S:.0f}s "
                                f"(status {status})")
        time.sleep(0.01)


def resume(handle: QemuHandle, launch: LaunchConfig) -> None:
    """After ``-incoming``: wait until the guest runs, hot-add its disks, send its launch line and
    wait for the acknowledgement."""
    deadline = time.monotonic() + RESTORE_TIMEOUT_S
    _wait_running(handle, deadline)
    hot_add_disks(handle, launch)
    with _connect(handle.sock_dir / LAUNCH_SOCKET, handle.proc, handle.task_dir, 10.0) as ch:
        ch.sock.sendall(launch_line(launch))
        _read_line(ch, b"launched", max(1.0, deadline - time.monotonic()), handle.proc, handle.task_dir)


@dataclass
class SnapshotDriver(QemuDriver):
    """The qemu driver that restores guests from a template (cold boot when the restore fails).
    ``image_rootfs``, ``image_digest`` and ``guest_init`` name the image; ``rtc_base`` is for tests."""

    image_rootfs: Path = Path()
    image_digest: str = ""
    guest_init: Path = Path()
    rtc_base: str | None = None
    cache: Path | None = None
    fallback: str | None = None
    """Why the last start booted cold instead (None: it restored)."""

    def inputs(self, spec: VmSpec) -> TemplateInputs:
        """The template inputs of ``spec`` (its memory and vCPUs; the accelerator resolved)."""
        kernel = spec.kernel or initramfs.find_kernel(self.image_rootfs)
        version = initramfs.kernel_version(self.image_rootfs, kernel)
        base = initramfs.cached_base(self.image_rootfs, version, cache_dir() / "initramfs")
        accel = self.choose_accel(spec.accel, kernel, base)
        return TemplateInputs(self.image_rootfs, self.image_digest, self.guest_init, kernel, spec.launch.ram_mib,
                              spec.launch.vcpus, accel, spec.launch.workspace_tag, self.rtc_base)

    def start(self, spec: VmSpec) -> QemuHandle:
        """Restore ``spec``'s guest from its template (built on first use); boot cold, with a
        warning, when the template cannot be built (its guest never says ``ready``, no ext4 image)
        or the restore fails."""
        self.require()
        try:
            t = ensure(self.inputs(spec), self.cache)
        except (AgentboxError, OSError) as exc:  # an image the template path cannot boot: boot cold
            self.fallback = f"no snapshot template: {exc}"
            log.warning("agentbox: qemu snapshot template not available, booting cold: %s", exc)
            return QemuDriver().start(spec)
        handle = self.launch(spec, t.inputs.accel, lambda workspace: restore_argv(t, socket_dir(spec.task_dir),
                                                                                   workspace))
        try:
            resume(handle, spec.launch)
        except (RestoreFailed, qmp.QmpError) as exc:
            handle.kill()
            remove(t)
            self.fallback = str(exc)
            log.warning("agentbox: qemu snapshot restore failed, booting cold (template %s removed): %s", t.key, exc)
            return QemuDriver().start(spec)
        self.fallback = None
        handle.boot = "restore"
        return handle
