"""The guest image ``localhost/agentbox:latest``: recipe, Debian root, guest_init layer."""
