"""``agentbox-guest-init``: the command tree of reference 7.1 plus ``status``, ``agent`` and ``vm-init``.

::

    agentbox-guest-init default|libkrun|container|microvm enter [--] [CMD...]
    agentbox-guest-init libkrun resize --target nix|containers
    agentbox-guest-init libkrun nix prep|wait
    agentbox-guest-init libkrun podman prep|wait|service-wait
    agentbox-guest-init status [--json] [--wait nix|podman|gate --timeout S]
    agentbox-guest-init agent [--device PATH | --port NAME]
    agentbox-guest-init vm-init [LAUNCH_CONF]        (hidden: PID 1 of qemu guests)

An empty command is ``fish -l``. Failures print ``agentbox-guest-init: <reason>``
on stderr and exit 1; bad usage exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agentbox_guest_init import contract as c
from agentbox_guest_init import image_user, prep
from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.identity import Identity, dev_identity, passwd_dev, resolve_identity

PROG = "agentbox-guest-init"
ENTER_MODES = ("default", "libkrun", "container", "microvm")
PREP_VERBS = {"nix": ("prep", "wait"), "podman": ("prep", "wait", "service-wait")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="agentbox guest bootstrap (runs inside the guest)")
    sub = p.add_subparsers(dest="mode", required=True, metavar="{default,libkrun,container,microvm,status,agent}")
    for mode in ("default", "container", "microvm"):
        sub.add_parser(mode, help=f"{mode} enter [-- CMD...]").add_subparsers(
            dest="action", required=True).add_parser("enter", help="prepare the guest and exec CMD (default fish -l)")
    lks = sub.add_parser("libkrun", help="libkrun mode: enter, resize, nix and podman prep").add_subparsers(
        dest="action", required=True)
    lks.add_parser("enter", help="prepare the guest and exec CMD (default fish -l)")
    lks.add_parser("resize", help="grow a disk's btrfs filesystem to its disk").add_argument(
        "--target", required=True, choices=("nix", "containers"))
    for kind, verbs in PREP_VERBS.items():
        lks.add_parser(kind, help=f"{kind} prep: {'|'.join(verbs)}").add_argument("verb", choices=verbs)
    st = sub.add_parser("status", help="show (or wait for) the nix and podman prep status")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--wait", choices=(*prep.KINDS, "gate"),
                    help="wait until this prep is ready first; gate: until the readiness gate passes or a prep "
                         "fails (exit 1 when it did not pass)")
    st.add_argument("--timeout", type=float, default=float(c.PREP_WAIT_TIMEOUT_S), help="seconds (default 120)")
    ag = sub.add_parser("agent", help="serve the harness control channel")
    where = ag.add_mutually_exclusive_group()
    where.add_argument("--device", help="serve on this character device")
    where.add_argument("--port", help="serve on the virtio-serial port with this name")
    sub.add_parser("vm-init").add_argument("launch_conf", nargs="?")
    return p


def status_report() -> dict[str, dict[str, object]]:
    """The nix and podman prep status as plain data."""
    report: dict[str, dict[str, object]] = {}
    for name, kind in prep.KINDS.items():
        s = kind.status().read()
        report[name] = {"state": s.state, "pid": s.pid, "started_at": s.started_at, "finished_at": s.finished_at,
                        "error": s.error, "log_path": s.log_path or kind.log_path, "status_path": kind.status_path}
    return report


def readiness(report: dict[str, dict[str, object]], genv: GuestEnv, mounts: str, *,
              nix_daemon: bool = True) -> dict[str, object]:
    """The readiness gate: ``ready``, ``reason`` and ``missing`` over what this guest's contract
    enables (the nix prep with the nix overlay and its daemon accepting connections, the Podman
    prep with container storage, the workspace mount in a microvm). Liveness (the agent answering)
    is the host's part."""
    missing: list[str] = []
    for name, enabled in (("nix", genv.nix_overlay), ("podman", genv.containers_storage)):
        state = report[name]["state"]
        if enabled and state != "ready":
            error = report[name].get("error")
            missing.append(f"{name}: {state}" + (f" ({error})" if error else ""))
    if genv.nix_overlay and report["nix"]["state"] == "ready" and not nix_daemon:
        missing.append(f"nix: daemon not accepting connections at {c.NIX_DAEMON_SOCKET} yet")
    if genv.workspace_tag:
        targets = {line.split()[1] for line in mounts.splitlines() if len(line.split()) > 2}
        if genv.workspace_target not in targets:
            missing.append(f"workspace: {genv.workspace_target} is not mounted")
    return {"ready": not missing, "reason": "ready" if not missing else "; ".join(missing), "missing": missing}


GATE_POLL_S = 0.05
"""How often ``status --wait gate`` looks again (status files and a socket connect: cheap, in process)."""


def gate_report(genv: GuestEnv) -> dict[str, object]:
    """:func:`status_report` with the readiness gate of ``genv`` under ``gate``."""
    report = status_report()
    try:
        with open("/proc/mounts") as f:
            mounts = f.read()
    except OSError:
        mounts = ""
    gate = readiness(report, genv, mounts, nix_daemon=prep.socket_accepts(Path(c.NIX_DAEMON_SOCKET)))
    return {**report, "gate": gate}


def wait_for_gate(genv: GuestEnv, timeout: float, clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> dict[str, object]:
    """The :func:`gate_report` once the gate passes or a prep has failed
    (:func:`~agentbox_guest_init.contract.gate_says_failed`), else the last one at ``timeout``."""
    deadline = clock() + timeout
    while True:
        report = gate_report(genv)
        gate = report["gate"]
        assert isinstance(gate, dict)
        if gate["ready"] or c.gate_says_failed(gate["missing"]) or clock() >= deadline:
            return report
        sleep(GATE_POLL_S)


def _status(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise GuestError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if args.wait == "gate":
        report = wait_for_gate(GuestEnv.parse(), args.timeout)
        gate = report["gate"]
        assert isinstance(gate, dict)
        if args.json:
            print(json.dumps(report, sort_keys=True))
        if not gate["ready"]:
            raise GuestError(f"readiness gate not passed within {args.timeout:g}s: {gate['reason']}")
        if not args.json:
            print("gate: ready")
        return 0
    if args.wait:
        prep.wait(prep.KINDS[args.wait], args.timeout,
                  socket=c.NIX_DAEMON_SOCKET if args.wait == "nix" else None)
    if args.json:
        print(json.dumps(gate_report(GuestEnv.parse()), sort_keys=True))
    else:
        for name, r in status_report().items():
            print(f"{name}: {r['state']}" + (f" ({r['error']})" if r["error"] else ""))
    return 0


def _service_identity(genv: GuestEnv) -> Identity:
    if os.geteuid() == 0:
        return dev_identity(genv)
    entry = passwd_dev()
    return Identity(os.geteuid(), os.getegid(), entry.shell if entry else "/bin/sh", image_user.load())


def _libkrun(args: argparse.Namespace) -> int:
    genv = GuestEnv.parse()
    if args.action == "resize":
        from agentbox_guest_init.resize import resize

        resize(args.target, genv)
        return 0
    if args.action == "nix":
        if args.verb == "wait":
            prep.wait(prep.NIX, socket=c.NIX_DAEMON_SOCKET)
            return 0
        if not genv.nix_overlay:
            return 0
        from agentbox_guest_init import nix_prep

        return prep.run_worker(prep.NIX, lambda: nix_prep.prep(genv))
    from agentbox_guest_init import podman_prep, podman_service

    if args.verb == "prep":
        if not genv.containers_storage:
            return 0
        return prep.run_worker(prep.PODMAN, lambda: podman_prep.prep(genv, resolve_identity(genv, "fish")))
    prep.wait(prep.PODMAN)
    if args.verb == "service-wait":
        podman_service.service_wait(_service_identity(genv))
    return 0


def dispatch(args: argparse.Namespace, command: list[str]) -> int:
    """Run the parsed command."""
    if args.mode == "vm-init":
        import importlib

        vminit = importlib.import_module("agentbox_guest_init.vminit")
        return int(vminit.main([args.launch_conf] if args.launch_conf else []))
    if args.mode == "agent":
        from agentbox_guest_init import agent

        return agent.main(args.device, args.port)
    if args.mode == "status":
        return _status(args)
    if args.action != "enter":
        return _libkrun(args)
    from agentbox_guest_init import enter

    if args.mode == "default":
        enter.default_enter(command, prep.self_argv())
    elif args.mode == "container":
        from agentbox_guest_init.container import container_enter

        container_enter(command)
    else:
        enter.enter(args.mode, command)
    return 0


def split_enter(argv: list[str]) -> tuple[list[str], list[str]]:
    """``MODE enter [--] CMD...`` → (``[MODE, enter]``, CMD); other command lines are unchanged."""
    if len(argv) >= 2 and argv[0] in ENTER_MODES and argv[1] == "enter":
        rest = argv[2:]
        return argv[:2], rest[1:] if rest[:1] == ["--"] else rest
    return argv, []


def fast_args(words: list[str]) -> argparse.Namespace | None:
    """The parsed form of the boot-path command lines (``MODE enter``, ``vm-init [CONF]``) without
    building the argparse tree: it costs a fifth of a second per guest boot under TCG."""
    if len(words) == 2 and words[0] in ENTER_MODES and words[1] == "enter":
        return argparse.Namespace(mode=words[0], action="enter")
    if words[:1] == ["vm-init"] and len(words) <= 2 and not any(w.startswith("-") for w in words[1:]):
        return argparse.Namespace(mode="vm-init", launch_conf=words[1] if len(words) == 2 else None)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``agentbox-guest-init``."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == [PROG]:  # libkrun passes krun_set_exec's argv after the exec path; tolerate our name there
        words = words[1:]
    words, command = split_enter(words)
    args = fast_args(words) or _parser().parse_args(words)
    try:
        return dispatch(args, command)
    except GuestError as exc:
        print(f"agentbox-guest-init: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
