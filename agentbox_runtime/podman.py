"""The one Podman CLI runner (reference section 10).

The CLI runs only where the reference's exact argv matters (``podman run`` of tasks, sidecars,
probes and maintenance VMs; ``podman exec`` into a task, interactive with :meth:`Podman.interactive`)
and for what has no API (``podman unshare``, ``podman image mount``, ``podman pull``). Structured
reads and clean-up (inspect, labels, lists, logs, ports, removal) go through the Podman API:
:mod:`agentbox_runtime.container.podman_api`.

Every call is ``podman [--log-level=debug] <args>``. A missing binary always
gives ``podman is not installed or not available on PATH``; a failing call
with context gives ``<context>[: <stderr>]``. Every call but an interactive one has a timeout.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Sequence

import agentbox_runtime.container.podman_api as podman_api
from agentbox_runtime.errors import AgentboxError, InputError, one_line

MISSING = "podman is not installed or not available on PATH"
CALL_TIMEOUT_S = 300.0
DEFAULT_IMAGE = "localhost/agentbox:latest"
PUBLISHED_IMAGE = "ghcr.io/zeroqn/agentbox:latest"


class Podman:
    """``podman [--log-level=debug] <args>`` through subprocess."""

    def __init__(self, debug: bool = False, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.debug = debug
        self.prefix = ["podman", "--log-level=debug"] if debug else ["podman"]
        self.timeout_s = timeout_s

    def argv(self, args: Sequence[str]) -> list[str]:
        """The full command line for ``args``."""
        return [*self.prefix, *args]

    def capture(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run with stdin null; the raw result; a timeout becomes exit status 124."""
        try:
            return subprocess.run(self.argv(args), stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=self.timeout_s, check=False)
        except FileNotFoundError as exc:
            raise AgentboxError(MISSING) from exc
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            return subprocess.CompletedProcess(
                exc.cmd, 124, out, err + f"\ntimed out after {self.timeout_s:g}s")

    def output(self, args: Sequence[str], context: str) -> str:
        """Run with stdin null; stdout; non-zero raises ``<context>[: <stderr>]``."""
        proc = self.capture(args)
        if proc.returncode != 0:
            detail = proc.stderr.strip()
            raise AgentboxError(f"{context}: {detail}" if detail else context)
        return proc.stdout

    def status(self, args: Sequence[str]) -> int:
        """Run with stdio inherited; the exit status."""
        return self.spawn(args).wait()

    def spawn(self, args: Sequence[str], **popen: object) -> subprocess.Popen[bytes]:
        """Start with stdio inherited (unless overridden) and return the process."""
        try:
            proc: subprocess.Popen[bytes] = subprocess.Popen(self.argv(args), **popen)  # type: ignore[call-overload]
            return proc
        except FileNotFoundError as exc:
            raise AgentboxError(MISSING) from exc

    def interactive(self, args: Sequence[str]) -> int:
        """Run on this terminal (``podman exec -it ...``: Podman owns the tty until it exits) and
        return its exit status. This process ignores SIGINT and SIGQUIT meanwhile, as a shell does
        for its foreground job, so Ctrl-C reaches only Podman; no timeout: the user ends it."""
        proc = self.spawn(args)  # before the parent ignores them: ignored signals stay ignored across exec
        saved = [signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGQUIT)]
        try:
            return proc.wait()
        finally:
            for sig, handler in zip((signal.SIGINT, signal.SIGQUIT), saved, strict=True):
                signal.signal(sig, handler)


IMAGE_REF = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
                       r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")
"""An OCI image reference: ``[registry[:port]/]name[:tag][@sha256:digest]``, lowercase name components."""


def validate_image_ref(ref: str, source: str = "--image") -> str:
    """``ref`` if it is an image reference; InputError (exit 2) otherwise, before anything is written.
    A value that starts with ``-`` would be read as a flag by Podman and Buildah."""
    if not ref or len(ref) > 255 or not IMAGE_REF.fullmatch(ref):
        raise InputError(f"invalid image reference {one_line(repr(ref))} from {source}; accepted: "
                         "[registry[:port]/]name[:tag][@sha256:<64 hex>], e.g. localhost/agentbox:latest")
    return ref


def explicit_image(image: str | None) -> str | None:
    """``--image`` or else ``$AGENTBOX_IMAGE``, validated; None when neither is set."""
    if image:
        return validate_image_ref(image, "--image")
    env = os.environ.get("AGENTBOX_IMAGE")
    return validate_image_ref(env, "AGENTBOX_IMAGE") if env else None


def resolve_image(podman: Podman, image: str | None, pull_latest: bool) -> str:
    """The image to run: explicit ``--image``/``AGENTBOX_IMAGE`` wins; else pull
    the published image with ``--pull-latest`` (the CLI, with its progress); else the local
    default if it exists (asked through the API), else the published one."""
    explicit = explicit_image(image)
    if explicit:
        return explicit
    if pull_latest:
        if podman.status(["pull", PUBLISHED_IMAGE]) != 0:
            raise AgentboxError(f"podman pull '{PUBLISHED_IMAGE}' failed")
        return PUBLISHED_IMAGE
    return DEFAULT_IMAGE if podman_api.image_exists(DEFAULT_IMAGE) else PUBLISHED_IMAGE
