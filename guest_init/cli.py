"""``agentbox-guest-init``: the command tree of reference 7.1 plus ``status``, ``agent`` and ``vm-init``.

::

    agentbox-guest-init default|libkrun|container|microvm enter [-- CMD...]
    agentbox-guest-init libkrun resize --target nix|containers
    agentbox-guest-init libkrun nix prep|wait
    agentbox-guest-init libkrun podman prep|wait|service-wait
    agentbox-guest-init status [--json] [--wait nix|podman --timeout S]
    agentbox-guest-init agent [--device PATH | --port NAME]
    agentbox-guest-init vm-init [LAUNCH_CONF]        (PID 1 of qemu guests)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from guest_init import contract as c
from guest_init import prep
from guest_init.env import GuestEnv, GuestError, resolve_identity


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentbox-guest-init",
                                description="agentbox guest bootstrap (runs inside the guest)")
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("default", "container", "microvm"):
        m = sub.add_parser(mode)
        m.add_subparsers(dest="action", required=True).add_parser("enter")
    lk = sub.add_parser("libkrun")
    lks = lk.add_subparsers(dest="action", required=True)
    lks.add_parser("enter")
    rs = lks.add_parser("resize")
    rs.add_argument("--target", required=True, choices=("nix", "containers"))
    for kind, verbs in (("nix", ("prep", "wait")), ("podman", ("prep", "wait", "service-wait"))):
        k = lks.add_parser(kind)
        k.add_argument("verb", choices=verbs)
    st = sub.add_parser("status")
    st.add_argument("--json", action="store_true")
    st.add_argument("--wait", choices=("nix", "podman"))
    st.add_argument("--timeout", type=float, default=c.PREP_WAIT_TIMEOUT_S)
    ag = sub.add_parser("agent")
    ag.add_argument("--device")
    ag.add_argument("--port")
    vi = sub.add_parser("vm-init")
    vi.add_argument("launch_conf", nargs="?", default="/run/agentbox/launch.conf")
    return p


def _self_argv() -> list[str]:
    return prep.self_argv()


def _status(args: argparse.Namespace) -> int:
    if args.wait:
        prep.wait(prep.KINDS[args.wait], args.timeout,
                  socket=__import__("pathlib").Path(c.NIX_DAEMON_SOCKET) if args.wait == "nix" else None)
    report = {}
    for name, kind in prep.KINDS.items():
        s = kind.status().read()
        report[name] = {"state": s.state, "pid": s.pid, "error": s.error, "log_path": s.log_path or kind.log_path,
                        "status_path": kind.status_path}
    if args.json:
        print(json.dumps(report))
    else:
        for name, r in report.items():
            print(f"{name}: {r['state']}" + (f" ({r['error']})" if r["error"] else ""))
    return 0


def dispatch(args: argparse.Namespace, command: list[str]) -> int:
    from guest_init import enter

    if args.mode == "vm-init":
        from guest_init import vminit

        return vminit.main([args.launch_conf])
    if args.mode == "agent":
        from guest_init import agent

        return agent.main(args.device, args.port)
    if args.mode == "status":
        return _status(args)
    if args.mode == "default":
        enter.default_enter(command, _self_argv())
    elif args.mode == "container":
        enter.container_enter(command)
    elif args.mode in ("libkrun", "microvm") and args.action == "enter":
        enter.enter(args.mode, command)
    elif args.action == "resize":
        from guest_init.resize import resize

        resize(args.target, GuestEnv.parse())
        return 0
    elif args.action == "nix":
        genv = GuestEnv.parse()
        if args.verb == "prep":
            if not genv.nix_overlay:
                return 0
            from guest_init import nix_prep

            return prep.run_worker(prep.NIX, lambda: nix_prep.prep(genv))
        prep.wait(prep.NIX, socket=__import__("pathlib").Path(c.NIX_DAEMON_SOCKET))
    elif args.action == "podman":
        from guest_init import podman_prep

        genv = GuestEnv.parse()
        if args.verb == "prep":
            if not genv.containers_storage:
                return 0
            ident = resolve_identity(genv, "fish")
            return prep.run_worker(prep.PODMAN, lambda: podman_prep.prep(genv, ident))
        prep.wait(prep.PODMAN)
        if args.verb == "service-wait":
            from guest_init.agent import dev_identity

            ident = dev_identity() if os.geteuid() == 0 else resolve_identity(genv, "fish")
            podman_prep.service_wait(ident)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``agentbox-guest-init``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args_list:
        i = args_list.index("--")
        args_list, command = args_list[:i], args_list[i + 1:]
    args = _parser().parse_args(args_list)
    try:
        return dispatch(args, command)
    except GuestError as exc:
        print(f"agentbox-guest-init: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
