"""The guest's vsock attach listener, run for real (issue 24 item 6).

Under libkrun, ``agentbox attach`` on krun-direct reaches the agent through a vsock port:
libkrun listens on the host's unix socket and opens a vsock stream to the guest's port 10250 per
connection (docs/libkrun-fidelity.md 3f). This host has no vhost-vsock, so the libkrun stand-in
carries that port over virtio-serial instead, and the guest's vsock listener never ran in any other
test. Here a real guest loads the kernel's ``vsock_loopback`` transport, serves attach with the
agent's own :func:`agentbox_guest_init.agent.serve_attach_vsock`, and a vsock client in the same
guest (CID 1, VMADDR_CID_LOCAL) opens a stream to it as libkrun's muxer would and speaks the agent
protocol over it: one ping, then a command.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

PORT = 20250  # not the agent's own 10250, which a guest with a vsock transport would already serve

CLIENT = f"""
import json, socket
from agentbox_guest_init import agent, protocol
assert agent.serve_attach_vsock({PORT}), "no vsock transport"
conn = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
conn.settimeout(30)
conn.connect((1, {PORT}))  # VMADDR_CID_LOCAL: this guest, through vsock_loopback
reader = protocol.FrameReader()
replies = []
for request in ({{"id": 1, "op": "ping"}}, {{"id": 2, "op": "run", "argv": ["id", "-un"], "user": "root"}}):
    conn.sendall(protocol.encode_frame(request))
    got = []
    while not got:
        chunk = conn.recv(65536)
        assert chunk, "the listener closed the stream"
        got = reader.feed(chunk)
    replies.append(got[0])
replies[1]["stdout"] = protocol.unb64(replies[1].get("stdout")).decode()
print(json.dumps(replies))
"""


def test_the_agent_serves_attach_on_a_vsock_port(microvm) -> None:  # type: ignore[no-untyped-def]
    loaded = microvm.execute("modprobe vsock_loopback", user="root", timeout=60)
    if not loaded.ok:
        pytest.skip(f"the guest kernel has no vsock_loopback transport: {loaded.stderr.strip()[-200:]}")
    # the agent's own package, where the image's agentbox-guest-init loads it from
    with_package = 'PYTHONPATH="$(dirname "$(readlink -f "$(command -v agentbox-guest-init)")")/../lib" exec python3 -c "$1"'
    out = microvm.succeed(["sh", "-c", with_package, "sh", CLIENT], user="root", timeout=120)
    ping, run = json.loads(out.strip().splitlines()[-1])
    assert ping.get("ok") is True and ping.get("id") == 1, ping
    assert run.get("id") == 2 and run.get("exit_status") == 0 and run.get("stdout") == "root\n", run
