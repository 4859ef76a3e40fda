"""pytest plugin and fixtures that boot real agentbox guests (``microvm``, ``krun_task``, ...).

The exception types a test may expect from fixture operations are re-exported here,
so tests need nothing from the runtime's internals.
"""

from runtime.errors import AgentboxError, InputError
from runtime.resize import GuestStepFailed

__all__ = ["AgentboxError", "InputError", "GuestStepFailed"]
