"""Hidden commands: ``__agentbox_microvm_enter <launch.conf>`` and ``internal microvm-ingest-cache``."""

from __future__ import annotations

import sys
from pathlib import Path

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.microvm.image_cache import ImageCache


def run_hidden(argv: list[str]) -> int:
    """Dispatch the hidden argv (before normal parsing)."""
    if argv[0] == "__agentbox_microvm_enter":
        if len(argv) < 2:
            raise AgentboxError("microvm helper requires a launch config path")
        from agentbox_runtime.vmm.libkrun import helper_main

        return helper_main(argv[1])
    rest = argv[1:]
    if not rest:
        raise AgentboxError("internal command is required")
    if rest[0] != "microvm-ingest-cache":
        raise AgentboxError(f"unsupported internal command '{rest[0]}'")
    names = ("an image reference", "a cache root", "an expected digest argument")
    if len(rest) < 4:
        raise AgentboxError(f"internal microvm-ingest-cache requires {names[len(rest) - 1]}")

    print(ImageCache(Path(rest[2])).ingest(rest[1], rest[3]))
    sys.stdout.flush()
    return 0
