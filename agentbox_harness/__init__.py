"""pytest plugin and fixtures that boot real agentbox guests (``microvm``, ``krun_task``, ...)."""
