"""Host probes and their parsers: the low layer that ``vmm``, ``container`` and ``microvm`` may use.

- :mod:`~agentbox_runtime.hostcheck.check`: the :class:`Check` result and :func:`run_tool`, the one
  way a probe runs a host tool (short timeout, a missing tool is a result, never an exception);
- :mod:`~agentbox_runtime.hostcheck.parsers`: pure parsers of tool output and ``/proc``, ``/etc`` text;
- :mod:`~agentbox_runtime.hostcheck.devices`: device probes (``/dev/kvm``).

This package imports nothing of agentbox_runtime but the base modules. The report built from these
probes (``agentbox doctor``, the harness's capability skips) is :mod:`agentbox_runtime.doctor`,
which sits on top of every backend; the choice of VMM is :mod:`agentbox_runtime.vmm.choice`.
"""
