"""The harness's waits use the runtime's one retry primitive (:mod:`runtime.retry`)."""

from runtime.retry import WaitTimeout, retry

__all__ = ["WaitTimeout", "retry"]
