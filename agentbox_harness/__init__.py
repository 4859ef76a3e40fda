"""pytest plugin and fixtures that boot real agentbox guests (``microvm``, ``krun_task``, ...).

The types a test meets are re-exported here (the Machine verbs' result and
errors, and the exception types fixture operations raise), so tests need
nothing from the runtime's internals.
"""

from agentbox_harness.console import ConsoleError
from agentbox_harness.machine import Machine, MachineError, ReadyStatus, Result
from agentbox_harness.wait import WaitTimeout
from agentbox_runtime.errors import AgentboxError, InputError
from agentbox_runtime.resize import GuestStepFailed

__all__ = ["AgentboxError", "ConsoleError", "GuestStepFailed", "InputError", "Machine", "MachineError",
           "ReadyStatus", "Result", "WaitTimeout"]
