"""``/.krun_config.json``: the container's ``config.json``, written into its rootfs for the guest's init.

crun's krun handler does this when the container is created (``libkrun_configure_container``,
phase ``HANDLER_CONFIGURE_BEFORE_USERNS``, crun 1.21 through HEAD ba38286f): the bytes of the
``config.json`` it was given, into ``.krun_config.json`` beneath the rootfs directory descriptor,
opened ``O_NOFOLLOW`` (since CVE-2025-24965 through ``safe_openat``), created mode 0444. libkrun's
init reads it as its command, environment and directory (:mod:`agentbox_runtime.vmm.krun_init`).

The rootfs belongs to the image, so the name may already be anything. A symlink is never followed
(crun fails with ``ELOOP``; so does this, in one line). Beyond crun, anything but a regular file
(a FIFO, a device node, a directory) is refused before it is opened for writing, and an existing
file is truncated only after it was opened and checked to be that regular file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agentbox_runtime.private_dir import file_kind
from agentbox_runtime.errors import AgentboxError

NAME = ".krun_config.json"
MODE = 0o444  # S_IRUSR | S_IRGRP | S_IROTH, as crun creates it


class KrunConfigError(AgentboxError):
    """``/.krun_config.json`` cannot be written safely; one line."""


def write(rootfs: Path, data: bytes) -> None:
    """Write ``data`` to ``<rootfs>/.krun_config.json`` (see the module text); KrunConfigError otherwise."""
    where = rootfs / NAME
    accepted = "accepted: a missing name or a regular file there, which is replaced"
    try:
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise KrunConfigError(f"cannot open the rootfs {rootfs}: {exc.strerror}") from None
    try:
        try:
            before: os.stat_result | None = os.lstat(NAME, dir_fd=root_fd)
        except FileNotFoundError:
            before = None
        if before is not None and not stat.S_ISREG(before.st_mode):
            raise KrunConfigError(f"refusing to write {where}: it is {file_kind(before.st_mode)} in the image; {accepted}")
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if before is None
                                                                            else 0)
        try:
            fd = os.open(NAME, flags, MODE, dir_fd=root_fd)
        except OSError as exc:
            raise KrunConfigError(f"cannot write {where}: {exc.strerror}; {accepted}") from None
    finally:
        os.close(root_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or before is not None and (st.st_dev, st.st_ino) != (before.st_dev,
                                                                                              before.st_ino):
            raise KrunConfigError(f"refusing to write {where}: it changed while it was opened; {accepted}")
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        raise KrunConfigError(f"cannot write {where}: {exc.strerror}") from None
    finally:
        os.close(fd)
