"""libkrun-mode task and resize maintenance ``podman run`` argv (reference 6.2, 6.4, 6.6).

The argv lists returned here exclude the leading ``podman`` (and the
``--log-level=debug`` that :class:`agentbox_runtime.podman.Podman` adds).

The OCI runtime is ``crun`` (the reference) or, selected with ``--krun-runtime qemu``,
``$AGENTBOX_KRUN_RUNTIME=qemu`` or ``[libkrun] runtime = "qemu"``, the absolute path of
the QEMU-backed ``agentbox-krun-runtime`` (:func:`select_krun_runtime`,
:func:`oci_runtime`); nothing else in the argv changes with it.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_runtime.config import KRUN_RUNTIMES, Config, load_config, quote
from agentbox_runtime.disks import LIBKRUN_DISKS, RawDisk
from agentbox_runtime.errors import AgentboxError, InputError
from agentbox_runtime.container import podman_api
from agentbox_runtime.oci.locate import runtime_path
from agentbox_runtime.tasks.volumes import Volumes

TMPFS = "/tmp:rw,exec,mode=1777"
ENV_KRUN_RUNTIME = "AGENTBOX_KRUN_RUNTIME"


def select_krun_runtime(flag: str | None, env: Mapping[str, str] | None = None,
                        config: Config | None = None) -> str:
    """The selected krun runtime, one of :data:`agentbox_runtime.config.KRUN_RUNTIMES`: ``--krun-runtime``
    (``flag``), else ``$AGENTBOX_KRUN_RUNTIME``, else ``[libkrun].runtime`` of ``config`` (default:
    the config file of ``env``), else ``crun``.

    An empty environment value counts as unset; any other value outside ``crun``/``qemu`` is an
    :class:`InputError` (one line, exit 2) when it is the one consulted."""
    env = os.environ if env is None else env
    if flag:
        if flag not in KRUN_RUNTIMES:
            raise InputError(f"invalid --krun-runtime '{flag}'; accepted: {', '.join(KRUN_RUNTIMES)}")
        return flag
    value = env.get(ENV_KRUN_RUNTIME)
    if value:
        if value not in KRUN_RUNTIMES:
            raise InputError(f"invalid {ENV_KRUN_RUNTIME} value {quote(value)}; accepted: {', '.join(KRUN_RUNTIMES)}")
        return value
    config = load_config(env) if config is None else config
    return config.krun_runtime or "crun"


def oci_runtime(selected: str) -> str:
    """The ``podman run --runtime`` value for a selected krun runtime: ``crun``, or for ``qemu``
    the absolute path of ``agentbox-krun-runtime`` (:class:`AgentboxError` when not installed)."""
    if selected == "crun":
        return "crun"
    return runtime_path()


@dataclass(frozen=True)
class KrunOptions:
    """Options of a libkrun task (``agentbox libkrun ...`` and global flags)."""

    ram_mib: int
    cpus: int | None = None
    tsi: bool = False
    publish: tuple[str, ...] = ()
    root: bool = False
    profile: bool = False
    debug: bool = False
    guest_init_mount: str | None = None  # "<src>:<target>:ro"
    run_label: str | None = None
    command: tuple[str, ...] = field(default=("fish", "-l"))
    runtime: str = "crun"  # podman --runtime: "crun" or the absolute path of agentbox-krun-runtime


PUBLISH = re.compile(r"(?:(?:(?P<ip>\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]):)?(?P<host>\d+(?:-\d+)?)?:)?"
                     r"(?P<guest>\d+(?:-\d+)?)(?:/(?:tcp|udp|sctp))?")
PUBLISH_ACCEPTED = "[[ip:][hostPort]:]containerPort[/tcp|udp|sctp], ports 1-65535 or ranges a-b"


def _ports_ok(spec: str | None) -> bool:
    if spec is None:
        return True
    lo, _, hi = spec.partition("-")
    ports = [int(lo)] + ([int(hi)] if hi else [])
    return all(1 <= p <= 65535 for p in ports) and ports == sorted(ports)


def validate_publish(publish: Sequence[str], tsi: bool) -> tuple[str, ...]:
    """The ``--publish`` specs, each checked against Podman's grammar (InputError, exit 2, before any
    state or disk is created)."""
    for spec in publish:
        if not spec.strip():
            raise InputError("publish spec must not be empty")
        m = PUBLISH.fullmatch(spec)
        ip_ok = m is not None and (m["ip"] is None or m["ip"].startswith("[")
                                   or all(int(o) <= 255 for o in m["ip"].split(".")))
        if m is None or not ip_ok or not _ports_ok(m["host"]) or not _ports_ok(m["guest"]):
            raise InputError(f"invalid publish spec {spec!r}; accepted: {PUBLISH_ACCEPTED}")
    if publish and tsi:
        raise InputError(
            "--publish requires default passt networking and is not supported with --tsi; "
            "drop --tsi or the --publish options")
    return tuple(publish)


def guest_init_override(source: str, target: str = c.GUEST_INIT_PATH) -> str:
    """The read-only bind mount of a host ``agentbox-guest-init`` over ``target``."""
    try:
        resolved = Path(source).resolve(strict=True)
    except OSError as exc:
        raise InputError(f"failed to resolve libkrun guest-init override '{source}': {exc.strerror}; "
                         "pass an existing agentbox-guest-init file") from None
    if not stat.S_ISREG(os.stat(resolved).st_mode):
        raise InputError(f"libkrun guest-init override '{source}' is not a regular file")
    return f"{resolved}:{target}:ro"


def validate_guest_init_target(image: str, target: str) -> str:
    """Check an image's first entrypoint element (inspect-based variant of 6.6)."""
    target = target.strip()
    if not target or target == "<no value>":
        raise InputError(f"selected image '{image}' does not define a first entrypoint element; "
                         "--guest-init requires an absolute agentbox-guest-init path")
    if not target.startswith("/"):
        raise InputError(f"selected image '{image}' first entrypoint element '{target}' is not "
                         "absolute; --guest-init requires an absolute agentbox-guest-init path")
    if os.path.basename(target) != "agentbox-guest-init":
        raise InputError(f"selected image '{image}' first entrypoint element '{target}' does not "
                         "point to agentbox-guest-init; --guest-init can only override the image "
                         "agentbox-guest-init binary")
    return target


def guest_init_target(image: str, inspect: bool = False) -> str:
    """Where ``--guest-init`` is mounted in ``image``.

    By default (Era D) the constant :data:`agentbox_guest_init.contract.GUEST_INIT_PATH`,
    with no Podman call. With ``inspect`` (Era C) the image's first entrypoint
    element (the reference's ``{{index .Config.Entrypoint 0}}``, read through the Podman API), which
    must name an absolute ``agentbox-guest-init``; the image must be local and inspectable."""
    if not inspect:
        return c.GUEST_INIT_PATH
    try:
        attrs = podman_api.image_inspect(image)
        why = "" if attrs is not None else f"{image}: image not known"
    except AgentboxError as exc:
        attrs, why = None, str(exc)
    if attrs is None:
        raise InputError(f"selected image '{image}' must be local and inspectable for --guest-init") from \
            AgentboxError(f"failed to inspect selected image entrypoint for libkrun guest-init override: {why}")
    entrypoint = (attrs.get("Config") or {}).get("Entrypoint") or []
    first = entrypoint[0] if isinstance(entrypoint, list) and entrypoint else ""
    return validate_guest_init_target(image, str(first))


def _disk_args(disk: RawDisk, state_root: Path, index: int | None = None) -> list[str]:
    i = disk.spec.index if index is None else index
    return ["--annotation", f"krun.disk.{i}.path={disk.path(state_root)}",
            "--annotation", f"krun.disk.{i}.id={disk.spec.block_id}",
            "--annotation", f"krun.disk.{i}.readonly=false"]


def _disk_env(disk: RawDisk) -> list[str]:
    if disk.spec.key == "nix":
        pairs = [(c.ENV_NIX_OVERLAY, "1"), (c.ENV_NIX_DISK_ID, disk.spec.block_id),
                 (c.ENV_NIX_DISK_LABEL, disk.spec.label)]
    else:
        pairs = [(c.ENV_CONTAINERS_STORAGE, "1"), (c.ENV_CONTAINERS_DISK_ID, disk.spec.block_id),
                 (c.ENV_CONTAINERS_DISK_LABEL, disk.spec.label)]
    out: list[str] = []
    for k, v in pairs:
        out += ["--env", f"{k}={v}"]
    return out


def _network(opts: KrunOptions) -> list[str]:
    if opts.tsi:
        return ["--env", f"{c.ENV_NO_PROXY}=1"]
    return ["--env", f"{c.ENV_USE_PASST}=1", "--annotation", "krun.use_passt=1"]


def _diagnostics(opts: KrunOptions) -> list[str]:
    out: list[str] = []
    if opts.profile:
        out += ["--env", f"{c.ENV_GUEST_PROFILE}=1"]
    if opts.debug:
        out += ["--env", f"{c.ENV_GUEST_DEBUG}=1"]
    return out


def _cpus(opts: KrunOptions) -> list[str]:
    return ["--annotation", f"krun.cpus={opts.cpus}"] if opts.cpus is not None else []


def _label(opts: KrunOptions) -> list[str]:
    return ["--label", f"{c.LABEL_HARNESS_RUN}={opts.run_label}"] if opts.run_label else []


def _userns() -> list[str]:
    """``--userns keep-id`` for rootless Podman; nothing as root, where Podman refuses keep-id
    ("keep-id is only supported in rootless mode") and root's identity mapping already is what
    keep-id gives a rootless user."""
    return [] if os.geteuid() == 0 else ["--userns", "keep-id"]


def krun_task_argv(*, name: str, hostname: str, state_root: Path, volumes: Volumes,
                   uid: int, gid: int, image: str, opts: KrunOptions, workdir: str = c.WORKSPACE) -> list[str]:
    """The exact ordered ``podman run`` argv of a libkrun task (6.2); the shell starts in ``workdir``
    (the image user's, :func:`agentbox_runtime.images.commit.image_user`).

    ``--runtime`` is ``opts.runtime`` (``crun`` in the reference). Rootless (euid != 0) this is
    the reference argv; as root the pair ``--userns keep-id`` is left out (Podman refuses it for
    root, whose identity mapping is what keep-id gives a rootless user)."""
    publish = validate_publish(opts.publish, opts.tsi)
    argv = ["run", "--rm", "-it", "--name", name, *_userns(), "--user", "0:0",
            "--runtime", opts.runtime, "--annotation", "run.oci.handler=krun",
            "--annotation", f"krun.ram_mib={opts.ram_mib}",
            "--annotation", "krun.nested_virt=1"]
    for disk in LIBKRUN_DISKS:
        argv += _disk_args(disk, state_root)
    argv += ["--device", "/dev/net/tun:/dev/net/tun", "--workdir", workdir,
             "--hostname", hostname]
    argv += volumes.argv()
    for disk in LIBKRUN_DISKS:
        argv += _disk_env(disk)
    argv += ["--env", f"{c.ENV_HOST_UID}={uid}", "--env", f"{c.ENV_HOST_GID}={gid}",
             "--env", f"{c.ENV_KVM_DROP_TO_DEV}=1"]
    if opts.root:
        argv += ["--env", f"{c.ENV_ENTER_AS_ROOT}=1"]
    argv += ["--tmpfs", TMPFS]
    argv += _cpus(opts)
    argv += _network(opts)
    for spec in publish:
        argv += ["--publish", spec]
    argv += _diagnostics(opts)
    if opts.guest_init_mount:
        argv += ["--volume", opts.guest_init_mount]
    argv += _label(opts)
    argv += [image, *opts.command]
    return argv


def resize_task_argv(*, name: str, hostname: str, state_root: Path, disk: RawDisk, image: str,
                     opts: KrunOptions, guest_init_path: str = c.GUEST_INIT_PATH) -> list[str]:
    """The exact ordered argv of the one-shot resize maintenance VM (6.4).

    ``--runtime`` is ``opts.runtime``; as root ``--userns keep-id`` is left out, as in
    :func:`krun_task_argv`. The one disk it carries is ``krun.disk.0`` whichever disk it is: the
    reference put the containers disk at index 1 alone, which the crun fork that reads these
    annotations (zeroqn/crun ``krun-disk.c``) refuses ("indexes must be contiguous from 0"); the
    guest finds the disk by its label, not its position."""
    argv = ["run", "--rm", "--name", name, "--hostname", hostname, *_userns(),
            "--user", "0:0", "--runtime", opts.runtime, "--annotation", "run.oci.handler=krun",
            "--annotation", f"krun.ram_mib={opts.ram_mib}"]
    argv += _disk_args(disk, state_root, index=0)
    argv += _disk_env(disk)
    argv += _cpus(opts)
    argv += _network(opts)
    argv += _diagnostics(opts)
    if opts.guest_init_mount:
        argv += ["--volume", opts.guest_init_mount]
    argv += ["--tmpfs", TMPFS]
    argv += _label(opts)
    argv += ["--entrypoint", guest_init_path, image, "libkrun", "resize", "--target", disk.spec.key]
    return argv
