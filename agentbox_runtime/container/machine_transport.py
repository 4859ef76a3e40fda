"""The Machine backend seam of container mode: run commands in a task container.

The pytest plugin wraps :class:`ContainerTransport` as the ``container``
backend (``agentbox_backend="container"``): every Machine verb
(``succeed``, ``fail``, ``execute``, ``wait_until_succeeds`` ...) ends in
:meth:`ContainerTransport.execute`, which is ``podman exec`` with user, env,
workdir and a timeout, returning exit status, stdout and stderr.

:func:`start_task` and :func:`stop_task` give the plugin a long-running,
detached task container (the reference task argv with ``-d`` and a keep-alive
command) that shares the workspace's sidecar like any interactive task.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from agentbox_runtime.container.lifecycle import release_sidecar, start_with_sidecar
from agentbox_runtime.container.sidecar import Sidecar, SidecarRequest, remove_container
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.podman import Podman

KEEP_ALIVE = ("sleep", "infinity")


@dataclass(frozen=True)
class ExecResult:
    """What one command returned: exit status and decoded output."""

    status: int
    stdout: str
    stderr: str


class ExecTimeout(AgentboxError):
    """A command did not finish in time; carries the output seen so far."""

    def __init__(self, message: str, stdout: str, stderr: str) -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


@dataclass
class ContainerTransport:
    """Runs commands inside the running container ``container``.

    ``user``, ``env`` and ``cwd`` are defaults for every call; a call may
    override them. A string command runs through ``sh -c``; a sequence runs
    as given.
    """

    container: str
    podman: Podman = field(default_factory=Podman)
    user: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None

    def exec_argv(self, command: str | Sequence[str], *, user: str | None = None,
                  env: Mapping[str, str] | None = None, cwd: str | None = None,
                  stdin: bool = False) -> list[str]:
        """The full ``podman exec`` command line for ``command``."""
        argv = ["exec"]
        if stdin:
            argv.append("-i")
        who = user if user is not None else self.user
        if who is not None:
            argv += ["--user", who]
        for key, value in {**self.env, **(env or {})}.items():
            argv += ["--env", f"{key}={value}"]
        where = cwd if cwd is not None else self.cwd
        if where is not None:
            argv += ["--workdir", where]
        cmd = ["sh", "-c", command] if isinstance(command, str) else list(command)
        return self.podman.argv([*argv, self.container, *cmd])

    def execute(self, command: str | Sequence[str], *, user: str | None = None,
                env: Mapping[str, str] | None = None, cwd: str | None = None,
                timeout: float | None = None, stdin: bytes | None = None) -> ExecResult:
        """Run ``command`` and return its status and output.

        On ``timeout`` (seconds) the ``podman exec`` client is killed and
        :class:`ExecTimeout` is raised with the output seen so far. A status
        of 125-127 may come from Podman itself (no such container, command
        not found); its message is in ``stderr``.
        """
        argv = self.exec_argv(command, user=user, env=env, cwd=cwd, stdin=stdin is not None)
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout,
                                  stdin=None if stdin is not None else subprocess.DEVNULL,
                                  check=False)
        except FileNotFoundError as exc:
            raise AgentboxError("podman is not installed or not available on PATH") from exc
        except subprocess.TimeoutExpired as exc:
            out, err = _text(exc.stdout), _text(exc.stderr)
            raise ExecTimeout(
                f"command {command!r} in container '{self.container}' timed out after "
                f"{timeout}s; last output: {(out + err)[-2000:]!r}", out, err) from exc
        return ExecResult(proc.returncode, _text(proc.stdout), _text(proc.stderr))


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def detached_argv(argv: Sequence[str], image: str,
                  command: Sequence[str] = KEEP_ALIVE) -> list[str]:
    """Turn a task argv (reference 8.2, adapted) into a detached keep-alive task.

    ``-it``/``-i`` become ``-d`` and the command after ``image`` becomes
    ``command`` (default ``sleep infinity``).
    """
    argv = list(argv)
    at = len(argv) - 1 - argv[::-1].index(image)
    options = ["-d" if a in ("-it", "-i", "-t") else a for a in argv[:at]]
    if "-d" not in options:
        options.insert(1, "-d")
    return [*options, image, *command]


def start_task(podman: Podman, req: SidecarRequest,
               build_argv: Callable[[Sidecar], list[str]]) -> Sidecar:
    """Prepare the sidecar (with health probe) and start a detached task.

    ``build_argv(sidecar)`` returns the detached task's ``podman`` arguments
    (see :func:`detached_argv`). Returns the sidecar the task uses.
    """
    sidecar, _ = start_with_sidecar(podman, req, lambda s: podman.output(build_argv(s), "failed to start podman"))
    return sidecar


def stop_task(podman: Podman, req: SidecarRequest, sidecar: Sidecar, name: str) -> bool:
    """Remove task ``name``; remove the sidecar too if it was the last task.

    Returns True when the sidecar was removed.
    """
    remove_container(name)
    return release_sidecar(podman, req, sidecar)
