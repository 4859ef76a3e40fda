"""vCPUs and RAM of a krun guest, as crun's krun handler picks them.

The reference is crun 1.27.1 (1.28 and HEAD ba38286f are the same here; ``src/libcrun/handlers/krun.c``
``libkrun_configure_vm`` and ``libkrun_parse_resource_configuration``):

- an annotation value is read with ``strtol`` (leading blanks and a sign allowed, nothing after the
  digits) and cast to ``int``; not a number is an error, a negative number too;
- vCPUs: ``krun.cpus`` when above 0, else the CPU affinity of the container process, at most 16
  (1 when the affinity cannot be read); passed to ``krun_set_vm_config`` as ``uint8_t``, and 0 vCPUs
  is libkrun's ``-EINVAL``;
- RAM: ``krun.ram_mib`` when above 128, else ``linux.resources.memory.limit`` in MiB, else 1024;
  0 MiB is libkrun's ``-EINVAL``.

crun reports these errors when the container starts (``error(EXIT_FAILURE, ...)`` in
``libkrun_exec``: the container's stderr, exit status 1); the shim does the same. Not read:
``.krun_vm.json`` in the image, which crun also consults when the annotation is absent.
"""

from __future__ import annotations

import os
import re

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.oci.bundle import Bundle

CPUS = "krun.cpus"
RAM_MIB = "krun.ram_mib"
MAX_VCPUS = 16  # LIBKRUN_MAX_VCPUS
DEFAULT_RAM_MIB = 1024  # LIBKRUN_DEFAULT_RAM_MIB
MINIMUM_RAM_MIB = 128  # LIBKRUN_MINIMUM_RAM_MIB: an annotation at or below it is ignored
_STRTOL = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)")
_LONG = 1 << 63


class VmConfigError(AgentboxError):
    """A ``krun.*`` resource annotation crun would refuse; one line for the container's stderr."""


def annotation_int(bundle: Bundle, key: str) -> int | None:
    """``key``'s value as crun reads it (``strtol``, then ``int``); None when the annotation is absent."""
    raw = bundle.annotations.get(key)
    if raw is None:
        return None
    m = _STRTOL.fullmatch(raw)
    value = int(m[1]) if m else None
    if value is None or not -_LONG <= value < _LONG:
        raise VmConfigError(f"krun annotation {key}={raw!r} cannot be converted to an integer; accepted: a "
                            "decimal integer")
    value = (value + (1 << 31)) % (1 << 32) - (1 << 31)  # (int) strtol(...)
    if value < 0:
        raise VmConfigError(f"krun annotation {key}={raw!r} must be a positive integer")
    return value


def affinity_cpus() -> int:
    """The CPUs this process may run on, at most :data:`MAX_VCPUS` (1 when that cannot be read)."""
    try:
        return min(len(os.sched_getaffinity(0)), MAX_VCPUS)
    except OSError:
        return 1


def vcpus(bundle: Bundle) -> int:
    """The guest's vCPUs (see the module text)."""
    cpus = annotation_int(bundle, CPUS)
    if cpus is None or cpus <= 0:
        cpus = affinity_cpus()
    vcpus_u8 = cpus & 0xFF
    if vcpus_u8 == 0:
        raise VmConfigError(f"could not set krun vm configuration: {CPUS}={cpus} is 0 vCPUs as libkrun's "
                            "uint8_t count; accepted: 1 to 255")
    return vcpus_u8


def ram_mib(bundle: Bundle) -> int:
    """The guest's RAM in MiB (see the module text)."""
    ram = annotation_int(bundle, RAM_MIB)
    if ram is None or ram <= MINIMUM_RAM_MIB:
        if bundle.memory_limit is not None:
            limit = bundle.memory_limit
            ram = abs(limit) // (1 << 20) * (1 if limit >= 0 else -1)  # C division truncates towards 0
            ram = (ram + (1 << 31)) % (1 << 32) - (1 << 31)  # stored in an int
        else:
            ram = DEFAULT_RAM_MIB
    if ram <= 0:
        raise VmConfigError(f"could not set krun vm configuration: {ram} MiB of RAM (linux.resources.memory.limit "
                            f"{bundle.memory_limit}); accepted: at least 1 MiB")
    return ram
