"""What ``enter`` itself gives a session, seen from inside a running guest.

The harness's agent runs as root (``AGENTBOX_ENTER_AS_ROOT=1``) and demotes each command it runs,
so a plain ``id -un`` through it shows the agent's demotion, not ``enter``'s identity drop. These
helpers look past the agent:

- :func:`agent_cwd`: where the agent (so: ``enter``) was started, read from ``/proc/<agent>/cwd``;
- :func:`enter_identity`: ``enter`` of the guest's own mode (``microvm`` on qemu and krun-direct,
  ``libkrun`` on krun-podman, read from the agent's command line) run again without
  ``AGENTBOX_ENTER_AS_ROOT``, with the environment the backend gave the guest; the process it
  execs reports its credentials. Background preps are off for that run (they already ran).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from agentbox_harness.machine import Machine

AGENT_CMDLINE = "tr '\\0' ' ' < /proc/$PPID/cmdline"
"""The command line of the agent: the parent of a command it runs."""

REPORT = ("echo \"user=$(id -un)\"; echo \"uid=$(id -u)\"; echo \"gid=$(id -g)\"; echo \"groups=$(id -G)\"; "
          "sed -n 's/^\\(CapEff\\|CapPrm\\|NoNewPrivs\\):\\s*/\\1=/p' /proc/self/status")

ENTER_AGAIN = f"""
cmd=$({AGENT_CMDLINE})
case "$cmd" in
  *" microvm enter "*) mode=microvm ;;
  *" libkrun enter "*) mode=libkrun ;;
  *) echo "the agent was not started by enter: $cmd" >&2; exit 3 ;;
esac
cd "$(readlink /proc/$PPID/cwd)"
exec env {{unset}} AGENTBOX_NIX_OVERLAY=0 AGENTBOX_CONTAINERS_STORAGE=0 \\
  agentbox-guest-init "$mode" enter -- sh -c {shlex.quote(REPORT)}
"""


@dataclass(frozen=True)
class EnterIdentity:
    """The credentials of the process ``enter`` exec'd."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    cap_eff: int
    cap_prm: int
    no_new_privs: int


def agent_cwd(machine: Machine) -> str:
    """The agent's own working directory (where ``enter`` started it), read by a root command that
    itself runs in ``/``."""
    cmdline = machine.succeed(AGENT_CMDLINE, user="root", cwd="/", timeout=30)
    assert "agentbox-guest-init" in cmdline and " agent" in cmdline, f"the parent is not the agent: {cmdline}"
    return machine.succeed("readlink /proc/$PPID/cwd", user="root", cwd="/", timeout=30).strip()


def enter_identity(machine: Machine, *, enter_as_root: bool = False) -> EnterIdentity:
    """The identity ``enter`` of the guest's mode drops to (see the module text); with
    ``enter_as_root`` the backend's ``AGENTBOX_ENTER_AS_ROOT=1`` stays, and ``enter`` keeps root."""
    unset = "" if enter_as_root else "-u AGENTBOX_ENTER_AS_ROOT"
    out = machine.succeed(ENTER_AGAIN.replace("{unset}", unset), user="root", cwd="/", timeout=60)
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return EnterIdentity(user=fields["user"], uid=int(fields["uid"]), gid=int(fields["gid"]),
                         groups=tuple(int(g) for g in fields["groups"].split()),
                         cap_eff=int(fields["CapEff"], 16), cap_prm=int(fields["CapPrm"], 16),
                         no_new_privs=int(fields["NoNewPrivs"]))
