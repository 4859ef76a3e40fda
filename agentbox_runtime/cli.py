"""The ``agentbox`` command line: parsing, dispatch and exit statuses.

Exit statuses: 0 on success, 2 on usage errors or bad input (nothing is
written), 1 on runtime failures, and the child's status for task runs.
Each subcommand's behaviour lives in ``agentbox_runtime.commands.<name>``; this module
only parses and dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from agentbox_runtime.container import podman_api
from agentbox_runtime.errors import AgentboxError, InputError, error_chain, one_line
from agentbox_runtime.config import KRUN_RUNTIMES
from agentbox_runtime.guest_resources import parse_mem_gib
from agentbox_runtime.size_grammar import parse_resize_size

ABOUT = "Launch a Podman shell with the current directory mounted at /workspace"

EXAMPLES = """\
examples:
  agentbox
  agentbox libkrun --mem 8
  agentbox libkrun resize --target nix --size 128G
  agentbox libkrun reset-nix --force
  agentbox libkrun --guest-init ./agentbox-guest-init
  agentbox --krun-runtime qemu -- sh -c 'echo ok'
  agentbox container
  agentbox container sidecar
  agentbox microvm --storage auto -- sh -c 'echo ok'
  agentbox --debug container sidecar
  agentbox --profile --debug
  agentbox --root container
  agentbox image build
  agentbox image build --tag localhost/my-agent:latest --user agent --uid 2000 --gid 2000 --workdir /work
  agentbox doctor --json
  AGENTBOX_IMAGE=ghcr.io/example/agentbox:dev agentbox
"""

MICROVM_NOTES = """\
notes:
  microvm mode is experimental and separate from Podman-backed libkrun mode.
  Every run gets a clean task rootfs; --preserve-debug keeps the rootfs and
  launch config. The persistent /nix and container-store disks are reused per
  workspace. There is no inbound port publishing. With --vmm qemu the guest
  boots the image's own kernel (KVM when a probe boot proves it works, TCG
  otherwise).
"""

STORAGE_CHOICES = ("auto", "btrfs-snapshot", "fuse-overlay", "reflink")
VMM_CHOICES = ("auto", "qemu", "libkrun")
RESIZE_TARGETS = ("nix", "containers")
KRUN_RUNTIME_HELP = ("OCI runtime of libkrun tasks: crun (its krun handler, the default) or qemu "
                     "(the QEMU-backed agentbox-krun-runtime; env AGENTBOX_KRUN_RUNTIME, "
                     "config [libkrun] runtime)")


def _positive_gib(text: str) -> int:
    """argparse type for ``--mem``: a positive whole number of GiB."""

    try:
        return parse_mem_gib(text)
    except AgentboxError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_cpus(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1 or int(text) > 255:
        raise argparse.ArgumentTypeError(
            f"invalid cpu count '{text}': must be a whole number from 1 to 255"
        )
    return int(text)


def _resize_size(text: str) -> int:

    try:
        return parse_resize_size(text)
    except AgentboxError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``agentbox: <what> (see --help)``, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"agentbox: {message} (see '{self.prog} --help')\n")


def _global_flags() -> _Parser:
    """Flags accepted before or after any subcommand.

    ``default=SUPPRESS`` lets a flag given at any level survive the merge of
    the parent and subparser namespaces.
    """
    parent = _Parser(add_help=False)
    g = parent.add_argument_group("global options")
    g.add_argument("--image", default=argparse.SUPPRESS, metavar="REF",
                   help="image to run (env AGENTBOX_IMAGE); default localhost/agentbox:latest")
    g.add_argument("--pull-latest", action="store_true", default=argparse.SUPPRESS,
                   help="pull the published image first (ignored when --image is given)")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="podman --log-level=debug and AGENTBOX_GUEST_DEBUG=1")
    g.add_argument("--profile", action="store_true", default=argparse.SUPPRESS,
                   help="guest profiling (reports print only together with --debug)")
    g.add_argument("--root", action="store_true", default=argparse.SUPPRESS,
                   help="keep the task shell as root")
    return parent


def _krun_runtime_option(parser: argparse.ArgumentParser, help_text: str = KRUN_RUNTIME_HELP) -> None:
    """``--krun-runtime``: on the top level (no subcommand means libkrun), ``libkrun`` and its
    actions (``reset-nix`` accepts and ignores it); ``parse`` refuses it with any other subcommand."""

    parser.add_argument("--krun-runtime", choices=KRUN_RUNTIMES, default=argparse.SUPPRESS,
                        help=help_text)


def _libkrun_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tsi", action="store_true", default=argparse.SUPPRESS,
                        help="TSI/proxy networking instead of the default passt")
    parser.add_argument("--mem", type=_positive_gib, default=argparse.SUPPRESS,
                        metavar="GIB", help="guest memory in GiB (default 80%% of host RAM)")
    parser.add_argument("--guest-init", default=argparse.SUPPRESS, metavar="PATH",
                        help="bind-mount this agentbox-guest-init over the image's")
    parser.add_argument("-p", "--publish", action="append", default=argparse.SUPPRESS,
                        metavar="SPEC",
                        help="publish a port (podman --publish); requires passt, not --tsi")


def _add_libkrun(sub: Any, glob: argparse.ArgumentParser) -> None:
    lk = sub.add_parser("libkrun", parents=[glob], help="Podman + crun + libkrun task (default)")
    _libkrun_run_options(lk)
    _krun_runtime_option(lk)
    lk_sub = lk.add_subparsers(dest="libkrun_action", metavar="ACTION")
    rs = lk_sub.add_parser("resize", parents=[glob], help="grow a persistent raw disk")
    rs.add_argument("--target", required=True, choices=RESIZE_TARGETS)
    rs.add_argument("--size", "--size-bytes", dest="size", required=True, type=_resize_size,
                    metavar="SIZE", help="new size: 128, 128G, 128GiB, 2T or 2TiB")
    _krun_runtime_option(rs)
    rn = lk_sub.add_parser("reset-nix", parents=[glob],
                           help="delete and recreate libkrun-nix.raw (needs --force)")
    rn.add_argument("--force", action="store_true")
    _krun_runtime_option(rn, "ignored: reset-nix runs no Podman")


def _add_container(sub: Any, glob: argparse.ArgumentParser) -> None:
    ct = sub.add_parser("container", parents=[glob], help="native Podman task with nix-daemon sidecar")
    ct.add_argument("--hardened", action="store_true", help=HARDENED_HELP)
    ct_sub = ct.add_subparsers(dest="container_action", metavar="ACTION")
    ct_sub.add_parser("sidecar", parents=[glob], help="start or reuse only the sidecar")


def _add_microvm(sub: Any, glob: argparse.ArgumentParser) -> None:
    mv = sub.add_parser(
        "microvm", parents=[glob], epilog=MICROVM_NOTES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="experimental direct-VM one-shot task with a clean rootfs",
        description="Run experimental direct-libkrun microvm mode as a one-shot task "
                    "with a clean task rootfs.",
    )
    mv.add_argument("--storage", choices=STORAGE_CHOICES, default="auto")
    mv.add_argument("--vmm", choices=VMM_CHOICES, default="auto")
    mv.add_argument("--mem", type=_positive_gib, default=None, metavar="GIB",
                    help="guest memory in GiB (default 4)")
    mv.add_argument("--cpus", type=_positive_cpus, default=None)
    mv.add_argument("--guest-init", default=None, metavar="PATH")
    mv.add_argument("--kernel", default=None, metavar="PATH", help="qemu: kernel to boot")
    mv.add_argument("--initrd", default=None, metavar="PATH", help="qemu: initramfs to use")
    mv.add_argument("--preserve-debug", action="store_true")
    mv.add_argument("--hardened", action="store_true", help=HARDENED_HELP)


def _add_harness_tools(sub: Any, glob: argparse.ArgumentParser) -> None:
    """``ps``, ``attach``, ``rm`` (the harness's guests) and ``evidence verify``."""
    sub.add_parser("ps", help="list the harness's running and preserved guests")
    ga = sub.add_parser("attach", parents=[glob], help="a shell in a running or preserved harness guest "
                        "(--root for root)")
    ga.add_argument("guest_id", metavar="ID")
    gr = sub.add_parser("rm", help="stop a preserved harness guest and delete its state")
    gr.add_argument("guest_id", metavar="ID")
    ev = sub.add_parser("evidence", help="check an evidence bundle (pytest --agentbox-evidence)")
    ev_sub = ev.add_subparsers(dest="evidence_action", metavar="ACTION", required=True)
    ev_verify = ev_sub.add_parser("verify", help="recheck every file against the bundle's index")
    ev_verify.add_argument("bundle", metavar="DIR")


def _add_host_tools(sub: Any, glob: argparse.ArgumentParser) -> None:
    """``doctor`` and ``image build``."""
    dr = sub.add_parser("doctor", parents=[glob], help="report what this host can run")
    dr.add_argument("--json", action="store_true")
    dr.add_argument("--no-probe", action="store_true", help="skip the KVM probe boot")
    im = sub.add_parser("image", parents=[glob], help="build the guest image")
    im_sub = im.add_subparsers(dest="image_action", metavar="ACTION", required=True)
    ib = im_sub.add_parser("build", parents=[glob], help="build localhost/agentbox:latest")
    ib.add_argument("--tag", default=None)
    ib.add_argument("--guest-init-only", action="store_true",
                    help="refresh only guest_init in the existing image")
    ib.add_argument("--force", action="store_true", help="rebuild even when cached")
    ib.add_argument("--user", default=None, metavar="NAME", help="the image's non-root user (default dev)")
    ib.add_argument("--uid", default=None, metavar="N", help="its uid, 1000-59999 (default 1000)")
    ib.add_argument("--gid", default=None, metavar="N", help="its gid, 1000-59999 (default 1000)")
    ib.add_argument("--workdir", default=None, metavar="DIR",
                    help="where its shell starts and the workspace is mounted (default /workspace)")


def build_parser() -> argparse.ArgumentParser:
    """The full ``agentbox`` argument parser."""
    glob = _global_flags()
    top = _Parser(
        prog="agentbox", description=ABOUT, parents=[glob], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version="agentbox 0.1.0")
    _krun_runtime_option(top)
    top.epilog = EXAMPLES + "\nA guest command follows '--', e.g. agentbox microvm -- sh -c 'echo ok'.\n"
    sub = top.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=_Parser)
    for add in (_add_libkrun, _add_container, _add_microvm, _add_harness_tools, _add_host_tools):
        add(sub, glob)
    return top


def _split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` at the first ``--`` into (options, guest command)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


# subcommand -> module in agentbox_runtime.commands exposing run(args) -> int
HARDENED_HELP = ("the hardened profile: read-only root, no capabilities, no new privileges, seccomp "
                 "(the shell runs as dev; not with --root)")

_HANDLERS = {
    "libkrun": "krun_podman_command",
    "container": "container_command",
    "microvm": "microvm",
    "doctor": "doctor",
    "image": "image",
    "ps": "guests",
    "attach": "guests",
    "rm": "guests",
    "evidence": "evidence_command",
}

_TOP_ONLY_REJECTED = ("--mem", "--tsi", "--guest-init")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` (without the program name) into a namespace.

    Global flags may appear before or after the subcommand; a guest command
    follows ``--``. No subcommand means ``libkrun``. ``--krun-runtime`` is
    accepted before the subcommand too (``agentbox --krun-runtime qemu -- cmd``),
    but only for libkrun.
    """
    options, command = _split_command(list(argv))
    parser = build_parser()
    subcommands = set(_HANDLERS)
    if not any(a in subcommands for a in options if not a.startswith("-")):
        for flag in _TOP_ONLY_REJECTED:
            if any(a == flag or a.startswith(flag + "=") for a in options):
                parser.error(f"unrecognized arguments: {flag} (it is a libkrun or microvm option: "
                             f"agentbox libkrun {flag} ...)")
    ns = parser.parse_args(options)
    if getattr(ns, "krun_runtime", None) and ns.subcommand not in (None, "libkrun"):
        parser.error("unrecognized arguments: --krun-runtime (it is a libkrun option: "
                     "agentbox libkrun --krun-runtime ... or agentbox --krun-runtime ... -- CMD)")
    for name, default in (("image", None), ("pull_latest", False), ("debug", False),
                          ("profile", False), ("root", False), ("tsi", False), ("mem", None),
                          ("guest_init", None), ("publish", []), ("krun_runtime", None)):
        if not hasattr(ns, name):
            setattr(ns, name, default)
    if ns.subcommand is None:
        ns.subcommand = "libkrun"
    for attr in ("libkrun_action", "container_action", "image_action"):
        if not hasattr(ns, attr):
            setattr(ns, attr, None)
    ns.command = command
    return ns


def dispatch(ns: argparse.Namespace) -> int:
    """Run the handler for ``ns.subcommand`` and return its exit status."""
    module = importlib.import_module(f"agentbox_runtime.commands.{_HANDLERS[ns.subcommand]}")
    return int(module.run(ns))


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever ``sys.stderr`` is at each record (pytest swaps and closes its
    capture streams; a handler bound to one of them would write to a closed file later)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def cli_logging() -> None:
    """Runtime messages (the ``agentbox`` logger: progress, notices) on stderr, as plain lines."""
    logger = logging.getLogger("agentbox")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agentbox`` console script."""
    cli_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("__agentbox_microvm_enter", "internal"):
        from agentbox_runtime.commands import internal

        return _guarded(lambda: internal.run_hidden(args))
    ns = parse(args)
    with podman_api.service_scope():  # a Podman API service this command had to start ends with it
        return _guarded(lambda: dispatch(ns))


def _guarded(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except AgentboxError as exc:
        text = error_chain(exc)
        print(f"agentbox: {one_line(text) if isinstance(exc, InputError) else text}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("agentbox: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
