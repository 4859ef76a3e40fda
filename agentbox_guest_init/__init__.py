"""agentbox-guest-init: the bootstrap that runs inside the guest (stdlib only)."""
