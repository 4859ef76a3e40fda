"""The guest's network: the container's own interface, handed over to the VM.

Inside the container's network namespace (Podman made it, with netavark's
veth ``eth0``), :func:`attach_guest` creates a tap device and redirects every
frame between the two with ``tc`` (ingress qdisc, ``u32`` match-all, ``mirred``),
the way the Kata Containers runtime wires a VM into a pod. The guest's eth0
takes the container interface's MAC, address and default route, so the
container's IP, its published ports and its DNS work unchanged, now answered by
the guest. A namespace without such an interface gets qemu's user-mode
network (``None``).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.vmm.krun_guest import TapNetwork

CLONE_NEWNET = 0x40000000
TAP = "krun-tap0"


class NetworkError(AgentboxError):
    """The guest's network could not be wired."""


def enter_netns(path: str) -> None:
    """Move the calling thread (call it before any other thread starts) into the namespace at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"cannot open network namespace {path}: {exc.strerror}") from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetworkError(f"cannot enter network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _ip(*args: str) -> object:
    proc = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout or "[]")


def _run(*argv: str) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


def container_interface() -> dict[str, object] | None:
    """The namespace's first interface with an IPv4 address other than loopback, or None."""
    links = _ip("addr", "show")
    assert isinstance(links, list)
    for link in links:
        if link.get("ifname") in ("lo", TAP) or link.get("link_type") != "ether":
            continue
        for addr in link.get("addr_info", []):
            if addr.get("family") == "inet":
                return {"ifname": link["ifname"], "mac": link["address"],
                        "address": f"{addr['local']}/{addr['prefixlen']}"}
    return None


def default_gateway(ifname: str) -> str | None:
    routes = _ip("route", "show", "default")
    assert isinstance(routes, list)
    for route in routes:
        if route.get("dev") == ifname and route.get("gateway"):
            return str(route["gateway"])
    return None


def attach_guest() -> TapNetwork | None:
    """Wire a tap device to the container interface (see the module text); None without one."""
    iface = container_interface()
    if iface is None:
        return None
    ifname = str(iface["ifname"])
    gateway = default_gateway(ifname)
    _run("ip", "tuntap", "add", "dev", TAP, "mode", "tap")
    _run("ip", "link", "set", TAP, "mtu", _mtu(ifname), "up")
    for src, dst in ((ifname, TAP), (TAP, ifname)):
        _run("tc", "qdisc", "add", "dev", src, "ingress")
        _run("tc", "filter", "add", "dev", src, "parent", "ffff:", "protocol", "all", "u32", "match", "u8", "0",
             "0", "action", "mirred", "egress", "redirect", "dev", dst)
    return TapNetwork(ifname=TAP, mac=str(iface["mac"]), address=str(iface["address"]), gateway=gateway)


def _mtu(ifname: str) -> str:
    links = _ip("link", "show", ifname)
    assert isinstance(links, list)
    return str(links[0].get("mtu", 1500)) if links else "1500"
