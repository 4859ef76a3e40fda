"""The harness's waits use the runtime's one retry primitive (:mod:`agentbox_runtime.retry`)."""

from agentbox_runtime.retry import WaitTimeout, retry

__all__ = ["WaitTimeout", "retry"]
