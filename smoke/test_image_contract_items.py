"""The image contract's base tools and CA certificates (seed 003): the stock image keeps them in
the guest and in container mode, and in the same real guest the checks name what they find
broken (a cut CA bundle, an empty one, a missing command, a gzip that fails under tar).

The guest checks only look (their files go to /tmp and are removed), so they share one guest."""

from __future__ import annotations

from typing import Any

import pytest

from agentbox_harness.image_contract import BASE_TOOLS, CA_BUNDLE, ImageContract

pytestmark = pytest.mark.vm

SHADOW = "/tmp/contract-shadow"


class _WithEnv:
    """``machine`` whose every command runs with ``env`` added (what the contract's probe sees)."""

    def __init__(self, machine: Any, env: dict[str, str]) -> None:
        self.machine, self.env = machine, env

    def execute(self, cmd: str, *, timeout: float) -> Any:
        return self.machine.execute(cmd, timeout=timeout, env=self.env)


def test_base_tools_and_ca_certificates_in_the_guest(shared_microvm):
    """coreutils, findutils, grep, sed, tar, gzip on PATH and working together; the CA bundle parses."""
    assert ImageContract().base_failures(shared_microvm) == []
    count = shared_microvm.succeed(["grep", "-c", "BEGIN CERTIFICATE", CA_BUNDLE], timeout=30).strip()
    assert int(count) > 100, f"{CA_BUNDLE} holds {count} certificates; Debian's ca-certificates has over 100"


def test_base_tools_and_ca_certificates_in_container_mode(container_task):
    assert ImageContract().base_failures(container_task) == []


def test_the_checks_name_a_broken_bundle_and_broken_tools(shared_microvm):
    """Both sides in one real guest: a bundle cut inside its first certificate and an empty one are
    named, so is a command no package provides, and a gzip that fails stops the round trip at tar."""
    m = shared_microvm
    m.succeed(f"head -c 600 {CA_BUNDLE} > /tmp/contract-cut.crt && : > /tmp/contract-empty.crt && "
              f"mkdir -p {SHADOW} && printf '#!/bin/sh\\necho gzip: shadowed >&2\\nexit 1\\n' > {SHADOW}/gzip && "
              f"chmod +x {SHADOW}/gzip", timeout=30)
    try:
        cut = ImageContract(base_tools=(), ca_bundle="/tmp/contract-cut.crt").base_failures(m)
        assert len(cut) == 1 and cut[0].startswith(
            "ca-certificates: the CA bundle /tmp/contract-cut.crt holds no certificate"), cut
        empty = ImageContract(base_tools=(), ca_bundle="/tmp/contract-empty.crt").base_failures(m)
        assert empty == ["ca-certificates: the CA bundle /tmp/contract-empty.crt is empty: TLS clients (curl, git, "
                         "pip) cannot verify any server"]
        gone = ImageContract(ca_bundle="/nonexistent/ca.crt").base_failures(m)
        assert gone == ["ca-certificates: the CA bundle /nonexistent/ca.crt is missing: TLS clients (curl, git, "
                        "pip) cannot verify any server"]
        extra = ImageContract(base_tools=(*BASE_TOOLS, ("no-such-package", ("agentbox-no-such-tool",))))
        assert extra.base_failures(m) == ["base tools: missing from PATH: no-such-package (agentbox-no-such-tool)"]
        path = m.succeed("echo $PATH", timeout=30).strip()
        shadowed = ImageContract().base_failures(_WithEnv(m, {"PATH": f"{SHADOW}:{path}"}))
        assert len(shadowed) == 1 and shadowed[0].startswith("base tools: the round trip failed at tar -cz: "), shadowed
        assert "gzip: shadowed" in shadowed[0], shadowed
    finally:
        m.execute(f"rm -rf {SHADOW} /tmp/contract-cut.crt /tmp/contract-empty.crt", timeout=30)
