"""``agentbox-krun-runtime``: an OCI runtime that boots krun-handler containers as QEMU guests.

Podman calls it (``podman run --runtime <path>``) the way it calls crun: ``create``,
``start``, ``state``, ``kill``, ``delete``. A container whose config carries the
krun handler annotation (``run.oci.handler=krun``) is booted as libkrun would boot
it, through qemu; any other container is handed to runc unchanged.
"""
