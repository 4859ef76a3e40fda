"""The Machine: verbs a test uses on a guest, over one abstract ``_execute``.

Backends supply only transport (``_execute``, file copy) and lifecycle
(``start``, ``shutdown``); every verb below is shared. Every verb and wait takes
an optional ``timeout`` in seconds: omitted, it is the machine's
``default_timeout`` (``--agentbox-timeout`` / ini ``agentbox_timeout``, default 60;
``wait_for_prep`` waits twice that). Either way it is multiplied by the session's
timeout scale, and a wait's error carries the last output and the console tail.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shlex
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from agentbox_harness.ports import READ_COMMAND, Listener, describe, listening, normalize, serves
from agentbox_harness.console import Console, ConsoleError, read_tail
from agentbox_harness.verb_timings import Profile
from agentbox_harness.wait import WaitTimeout, retry
from agentbox_runtime.backend_caps import Capabilities, caps
from agentbox_runtime.evidence import REDACTED, SECRET_NAME, Redactor
from agentbox_runtime.vmm.shutdown import StopReport
from agentbox_harness.leftovers import Holdings, leftovers
from agentbox_runtime.vmm.hostfwd import check_port
from agentbox_guest_init import contract
from agentbox_guest_init.image_user import ImageUser

log = logging.getLogger("agentbox_harness")
BOOTS = {"started": 0, "cold": 0, "restore": 0}
"""Guest boots started in this process (every :meth:`Machine.start`, restarts included), and of the
ones that came up, how many booted cold and how many restored from a snapshot template."""

Command = str | Sequence[str]


@dataclass(frozen=True)
class Result:
    """One guest command's outcome."""

    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and not self.timed_out


@dataclass(frozen=True)
class ReadyStatus:
    """A readiness verdict: ``ready``, ``reason`` (``ready`` or what is missing), ``missing`` (one
    entry per part not ready) and ``parts`` (part -> state)."""

    ready: bool
    reason: str
    missing: tuple[str, ...]
    parts: dict[str, str]


class MachineError(AssertionError):
    """A verb's expectation failed; the message shows what the guest said."""


def _step(title: str) -> contextlib.AbstractContextManager[Any]:
    """An Allure step when allure-pytest is installed, else nothing."""
    try:
        import allure

        step: contextlib.AbstractContextManager[Any] = allure.step(title)
        return step
    except ImportError:
        return contextlib.nullcontext()


def as_argv(cmd: Command) -> list[str]:
    return ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)


def render(cmd: Command) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


@dataclass(frozen=True)
class Preserved:
    """What --preserve-debug kept of one task: summary lines and the kept paths (not leaks)."""

    lines: list[str]
    paths: tuple[str, ...]


@dataclass
class Machine(ABC):
    """A running guest. Subclasses implement ``_execute``, ``_start``, ``_stop``."""

    name: str
    timeout_scale: float = 1.0
    default_timeout: float = 60.0
    """Seconds (before scaling) of a verb whose ``timeout`` is omitted."""
    artifacts: Path | None = None
    transcript: list[dict[str, Any]] = field(default_factory=list, repr=False)
    timings: dict[str, float] = field(default_factory=dict, repr=False)
    profiler: Profile = field(default_factory=Profile, repr=False)
    _console: Console | None = field(default=None, repr=False)
    _baseline_pids: set[int] | None = field(default=None, repr=False)
    _gate_wait: bool = field(default=True, repr=False)
    """The guest's ``agentbox-guest-init status`` knows ``--wait gate`` (until it says otherwise)."""
    ready_checks: dict[str, Command] = field(default_factory=dict, repr=False)
    """Extra readiness checks for :meth:`wait_ready`: name -> a command that must exit 0 (run as root)."""
    redactor: Redactor | None = field(default=None, repr=False)
    """The run's secrets: values of secret-looking env vars given to a command join it."""
    test_id: str = ""
    """The test that made this machine (``agentbox ps`` shows it)."""
    guest_id: str | None = None
    """Its ``agentbox attach`` id while it runs (backends that can be attached to)."""
    boot: str = "cold"
    """How the last start went: ``cold`` (booted) or ``restore`` (qemu, from a snapshot template)."""
    preserved: list[Preserved] = field(default_factory=list, repr=False)
    """What --preserve-debug kept of it (summary lines, kept paths)."""
    backend: str = ""
    """The backend that built it (``qemu``, ``krun-direct``, ``krun-podman``, ``container``)."""
    image_user: ImageUser = field(default_factory=ImageUser)
    """The image's non-root user and workdir (dev and /workspace in the stock image): who a verb
    runs as when it names no ``user``, and where it starts. Set when the machine starts."""
    stop_reports: list[StopReport] = field(default_factory=list, repr=False)
    """How each stop of this machine's VMM went (:class:`agentbox_runtime.vmm.shutdown.StopReport`:
    the rung that ended it, each rung's budget and time), in order; a restart adds one. Empty for
    a backend without a VMM process of ours (container)."""
    _holdings: Holdings | None = field(default=None, repr=False)
    ready_gate: ClassVar[bool] = False
    """:meth:`start` waits for the readiness gate (every real guest backend sets it; a test double
    whose commands run on the host does not)."""

    @property
    def capabilities(self) -> Capabilities:
        """What this machine's backend offers (:mod:`agentbox_runtime.backend_caps`): ask it
        instead of comparing backend names."""
        return caps(self.backend)

    # --- what a backend provides ------------------------------------------
    @abstractmethod
    def _execute(self, argv: list[str], *, user: str | None, env: dict[str, str] | None, cwd: str | None,
                 timeout: float, stdin: bytes | None) -> Result: ...

    @abstractmethod
    def _start(self) -> None: ...

    @abstractmethod
    def _stop(self, timeout: float) -> None: ...

    def _console_connect(self) -> Any:
        """A pexpect child on the live command console; backends that have one override this."""
        raise AssertionError(f"{self.name} has no live console stream on this backend")

    def _shell(self, timeout: float) -> Any:
        """An interactive shell as a pexpect child; backends that can give a real tty override this."""
        raise AssertionError(f"{type(self).__name__} cannot open an interactive shell")

    def _copy_from(self, guest_path: str, host_path: Path, timeout: float) -> None:
        """Guest file -> host file; agent backends stream it in checked chunks, this fallback uses base64."""
        out = self._execute(["base64", "-w0", guest_path], user="root", env=None, cwd=None, timeout=timeout,
                            stdin=None)
        if not out.ok:
            raise MachineError(self._explain(f"cannot read {guest_path}", out))
        import base64

        host_path.write_bytes(base64.b64decode(out.stdout))

    def _copy_to(self, host_path: Path, guest_path: str, timeout: float) -> None:
        """Host file -> guest file owned by the image's user (parents created)."""
        script = 'mkdir -p "$(dirname "$1")" && cat > "$1" && chown "$2:$2" "$1"'
        out = self._execute(["sh", "-c", script, "sh", guest_path, self.image_user.user], user="root", env=None,
                            cwd=None,
                            timeout=timeout, stdin=host_path.read_bytes())
        if not out.ok:
            raise MachineError(self._explain(f"cannot write {guest_path}", out))

    @property
    def console_log(self) -> Path | None:
        """The full console log of the current boot (None when the backend has none)."""
        return None

    @property
    def vmm_pid(self) -> int | None:
        """The host process that is the running guest (qemu, or the libkrun helper that became the VM),
        None when none runs or the backend has no such process of ours (a container, a krun-podman
        guest inside crun). Prove a guest kept or gone by this process, never by a process name:
        real libkrun runs no ``qemu``."""
        return None

    @property
    def console(self) -> Console:
        """The console: ``.log`` (full log path), ``.child`` (pexpect on the live stream),
        ``.wait_for_text(regex, timeout=)``, ``.tail()``."""
        if self._console is None or self._console.log != self.console_log:
            if self._console is not None:
                self._console.close()
            self._console = Console(self.name, self.console_log, self._console_connect, self.timeout_scale,
                                    self.default_timeout)
        return self._console

    def console_tail(self, lines: int = 30) -> str:
        """The last lines of the console log (empty when the backend has none)."""
        return read_tail(self.console_log, lines)

    @property
    def profile(self) -> dict[str, Any]:
        """Timings: how it started (``boot``: cold or restore), lifecycle phases (``boot_s``...) and per verb
        count, total and max seconds."""
        return {"boot": self.boot, "phases": dict(self.timings), "verbs": self.profiler.as_dict()}

    def _verb(self, verb: str, detail: str) -> contextlib.AbstractContextManager[None]:
        """An Allure step (when installed) timed into the profile under ``verb``; verbs other than
        ``execute`` (which logs its exit status itself) log one INFO line with their outcome."""
        @contextlib.contextmanager
        def block() -> Iterator[None]:
            self._gone_check(verb)
            started = time.monotonic()
            outcome = "failed"
            try:
                with _step(f"{self.name}: {verb} {detail}".rstrip()):
                    yield
                outcome = "ok"
            finally:
                elapsed = time.monotonic() - started
                self.profiler.record(verb, elapsed)
                if verb not in ("execute", "succeed", "fail"):  # execute logs the exit status itself
                    log.info("%s: %s %s: %s in %.2fs", self.name, verb, detail, outcome, elapsed)
        return block()

    # --- verbs -------------------------------------------------------------
    def scaled(self, timeout: float | None) -> float:
        """``timeout`` (or :attr:`default_timeout` when None) times the session's timeout scale."""
        return (self.default_timeout if timeout is None else timeout) * self.timeout_scale

    def _given(self, timeout: float | None, factor: float = 1.0) -> float:
        return self.default_timeout * factor if timeout is None else timeout

    def execute(self, cmd: Command, *, timeout: float | None = None, user: str | None = None, env: dict[str, str] | None = None,
                cwd: str | None = None, stdin: bytes | None = None, check: bool = False) -> Result:
        """Run ``cmd`` (a string runs under ``sh -c``) as ``user`` (default the image's user, see
        :attr:`image_user`; or ``root``) in its workdir unless ``cwd`` says otherwise; return its Result."""
        if self.redactor is not None and env:
            self.redactor.register_env(env)
        with self._verb("execute", render(cmd)):
            result = self._execute(as_argv(cmd), user=user, env=env, cwd=cwd, timeout=self.scaled(timeout),
                                   stdin=stdin)
        log.info("%s: %s (as %s): exit %s%s in %.2fs", self.name, render(cmd), user or self.image_user.user,
                 result.exit_status,
                 " (timed out)" if result.timed_out else "", result.duration_s)
        self.transcript.append({
            "command": render(cmd), "argv": as_argv(cmd), "user": user or self.image_user.user,
            "env": {k: REDACTED if SECRET_NAME.search(k) else v for k, v in (env or {}).items()},
            "exit_status": result.exit_status,
            "duration_s": result.duration_s, "timed_out": result.timed_out,
            "stdout_sha256": hashlib.sha256(result.stdout.encode()).hexdigest(),
            "stderr_sha256": hashlib.sha256(result.stderr.encode()).hexdigest(),
            "stdout_tail": result.stdout[-400:], "stderr_tail": result.stderr[-400:]})
        if check and not result.ok:
            raise MachineError(self._explain(f"command failed: {render(cmd)}", result))
        return result

    def _explain(self, headline: str, result: Result | None) -> str:
        parts = [headline]
        if result is not None:
            parts.append(f"exit status {result.exit_status}{' (timed out)' if result.timed_out else ''}")
            parts.append(f"stdout:\n{result.stdout[-2000:]}")
            parts.append(f"stderr:\n{result.stderr[-2000:]}")
        tail = self.console_tail()
        if tail:
            parts.append(f"console tail:\n{tail}")
        return "\n".join(parts)

    def succeed(self, cmd: Command, *, timeout: float | None = None, user: str | None = None,
                env: dict[str, str] | None = None, cwd: str | None = None, stdin: bytes | None = None) -> str:
        """Run ``cmd``; fail the test unless it exits 0. Returns stdout.

        The failure shows the exit status, stdout, stderr and the console tail."""
        with self._verb("succeed", render(cmd)):
            return self.execute(cmd, timeout=timeout, user=user, env=env, cwd=cwd, stdin=stdin, check=True).stdout

    def fail(self, cmd: Command, *, timeout: float | None = None, user: str | None = None,
             env: dict[str, str] | None = None) -> Result:
        """Run ``cmd``; fail the test unless it exits non-zero. Returns the Result."""
        with self._verb("fail", render(cmd)):
            result = self.execute(cmd, timeout=timeout, user=user, env=env)
        if result.ok:
            raise MachineError(self._explain(f"command unexpectedly succeeded: {render(cmd)}", result))
        return result

    def _wait_for(self, cmd: Command, want_ok: bool, timeout: float | None, user: str | None) -> str:
        timeout = self._given(timeout)
        last: list[Result] = []

        def check(_last_try: bool) -> bool:
            r = self.execute(cmd, timeout=max(5.0, timeout / 4), user=user)
            last[:] = [r]
            return r.ok == want_ok

        try:
            with self._verb("wait_until_succeeds" if want_ok else "wait_until_fails", render(cmd)):
                retry(check, timeout=self.scaled(timeout), interval=1.0)
        except WaitTimeout as exc:
            raise MachineError(self._explain(f"{exc}: waiting until {render(cmd)} "
                                             f"{'succeeds' if want_ok else 'fails'}",
                                             last[0] if last else None)) from None
        return last[0].stdout

    def wait_until_succeeds(self, cmd: Command, *, timeout: float | None = None, user: str | None = None) -> str:
        """Retry ``cmd`` until it exits 0; its stdout."""
        return self._wait_for(cmd, True, timeout, user)

    def wait_until_fails(self, cmd: Command, *, timeout: float | None = None, user: str | None = None) -> str:
        """Retry ``cmd`` until it exits non-zero."""
        return self._wait_for(cmd, False, timeout, user)

    def wait_for_file(self, path: str, *, timeout: float | None = None) -> None:
        """Wait until ``path`` exists in the guest."""
        with self._verb("wait_for_file", path):
            self.wait_until_succeeds(["test", "-e", path], timeout=timeout, user="root")

    def wait_for_prep(self, kind: str, *, timeout: float | None = None) -> None:
        """Wait until the ``nix`` or ``podman`` background prep is ready (fails fast when it failed;
        the default timeout is twice the machine's).

        Uses ``agentbox-guest-init status --wait KIND``; the error shows its last output. A Podman
        prep whose status file already reads ``state=ready`` (the one state in which that wait
        returns at once) is taken without starting it; the nix wait also checks that the daemon
        accepts, so it always runs."""
        if kind not in ("nix", "podman"):
            raise ValueError(f"wait_for_prep kind '{kind}' is not one of nix, podman")
        timeout = self._given(timeout, 2.0)  # a prep formats or checks a disk: twice the default
        wait = shlex.join(["agentbox-guest-init", "status", "--wait", kind, "--timeout",
                           str(int(self.scaled(timeout)))])
        if kind == "podman":
            ready = f'IFS= read -r line < {shlex.quote(contract.PODMAN_PREP_STATUS)} && [ "$line" = state=ready ]'
            wait = f"{ready} 2>/dev/null || exec {wait}"
        with self._verb("wait_for_prep", kind):
            self.succeed(["sh", "-c", wait], timeout=timeout + 10, user="root")

    def wait_ready(self, *, timeout: float | None = None) -> ReadyStatus:
        """Wait until the guest is ready and return the status: the agent answers (liveness), the
        guest's gate (``agentbox-guest-init status --json --wait gate``: nix and Podman preps, the
        workspace mount) passes, and every check in :attr:`ready_checks` (name -> command) succeeds. The
        default timeout is twice the machine's. On timeout, or at once when a prep has failed, the
        test fails with the status, ``missing`` naming each part not ready."""
        with self._verb("wait_ready", ""):
            return self._until_ready(self.scaled(self._given(timeout, 2.0)), settle=False)

    def _until_ready(self, timeout: float, *, settle: bool) -> ReadyStatus:
        """Poll :meth:`ready_status` until ready; a failed prep raises at once, or with ``settle``
        ends the wait (the status is returned, not ready: the test sees the failure when it asks)."""
        last: list[ReadyStatus] = []
        deadline = time.monotonic() + timeout

        def ready(_last_try: bool) -> bool:
            last[:] = [self.ready_status(wait=max(1.0, deadline - time.monotonic()))]
            if contract.gate_says_failed(last[0].missing):
                if settle:
                    return True
                raise MachineError(self._explain(f"not ready: {last[0].reason}", None))  # no use waiting
            return last[0].ready

        try:
            retry(ready, timeout=timeout, interval=0.5)
        except WaitTimeout as exc:
            raise MachineError(self._explain(f"{exc}: not ready: {last[0].reason if last else 'no status'}",
                                             None)) from None
        return last[0]

    def ready_status(self, *, wait: float | None = None) -> ReadyStatus:
        """One readiness check (see :meth:`wait_ready`); with ``wait``, the guest's gate is first
        waited for in the guest, up to ``wait`` seconds, until it passes or a prep fails
        (``status --wait gate``: no host round trip per look)."""
        argv = ["agentbox-guest-init", "status", "--json"]
        if wait is not None and self._gate_wait:
            argv += ["--wait", "gate", "--timeout", f"{wait:.1f}"]
        probe = self._execute(argv, user="root", env=None, cwd="/", timeout=self.scaled(30) + (wait or 0.0),
                              stdin=None)
        if probe.exit_status == 2 and "invalid choice: 'gate'" in probe.stderr:
            self._gate_wait = False  # a guest-init from before ``--wait gate``: look without waiting
            return self.ready_status()
        parts: dict[str, str] = {"agent": "ready" if probe.exit_status != 124 else "no answer"}
        missing: list[str] = []
        try:
            report = json.loads(probe.stdout)
            gate = report["gate"]
        except (ValueError, KeyError, TypeError):
            missing.append(f"gate: status --json failed (exit {probe.exit_status}): {probe.stderr.strip()[-200:]}")
        else:
            for name in ("nix", "podman"):
                parts[name] = str(report.get(name, {}).get("state", "unknown"))
            missing += [str(m) for m in gate.get("missing", [])]
        for name, cmd in self.ready_checks.items():
            r = self._execute(as_argv(cmd), user="root", env=None, cwd=None, timeout=self.scaled(30), stdin=None)
            parts[name] = "ready" if r.ok else f"exit {r.exit_status}"
            if not r.ok:
                missing.append(f"{name}: {render(cmd)} exited {r.exit_status}")
        return ReadyStatus(not missing, "ready" if not missing else "; ".join(missing), tuple(missing), parts)

    def copy_to(self, host_path: Path, guest_path: str, *, timeout: float | None = None) -> None:
        """Copy a host file into the guest (parents created, owned by the image's user). Agent backends send it
        in chunks that the guest checks (size and sha256) before it replaces ``guest_path``."""
        with self._verb("copy_to", guest_path):
            self._copy_to(Path(host_path), guest_path, self.scaled(timeout))

    def copy_from(self, guest_path: str, host_path: Path, *, timeout: float | None = None) -> None:
        """Copy a guest file to the host (any size: agent backends stream it with size and sha256 checks)."""
        with self._verb("copy_from", guest_path):
            self._copy_from(guest_path, Path(host_path), self.scaled(timeout))

    def shell(self, *, timeout: float | None = None) -> Any:
        """An interactive shell of dev on a real tty in the guest, as a ``pexpect.spawn``.

        Its prompt is ``AGENTBOX$ `` (already consumed once); ``timeout`` is the child's
        default expect timeout (scaled). Close it with ``child.close()``."""
        with self._verb("shell", ""):
            return self._shell(self.scaled(timeout))

    def start(self) -> None:
        """Boot the guest. On a real guest backend (:attr:`ready_gate`) it returns once the guest is
        ready as :meth:`wait_ready` means it (the agent answers and the guest's readiness gate
        passes: its nix and Podman preps, the nix daemon accepting connections, the workspace
        mount), or once a prep has failed, which :meth:`wait_ready` and :meth:`wait_for_prep` then
        report; it waits up to twice the machine's default timeout. ``boot_s`` times the boot,
        ``ready_s`` the boot and the gate."""
        started = time.monotonic()
        BOOTS["started"] += 1
        with self._verb("start", ""):
            self._start()
            BOOTS[self.boot] += 1
            self._holdings = self.holdings()
            self.timings["boot_s"] = round(time.monotonic() - started, 3)
            if self.ready_gate:
                self._until_ready(self.scaled(self._given(None, 2.0)), settle=True)
        self.timings["ready_s"] = round(time.monotonic() - started, 3)
        self._baseline_pids = None

    def reset(self, *, timeout: float | None = None) -> None:
        """Back to a just-booted state between tests that share this machine: every process of the
        image's user started since the first reset is killed (the guest's own services, such as the
        nix and Podman preps, were already running then and stay), and ``/tmp`` and the workdir
        (``/workspace``) are emptied. What it does not undo (installed packages, files elsewhere, the persistent
        disks) is why tests that change the guest take a fresh ``microvm`` instead."""
        with self._verb("reset", ""):
            listing = self._execute(["pgrep", "-u", self.image_user.user], user="root", env=None, cwd="/",
                                    timeout=self.scaled(timeout), stdin=None)
            pids = {int(p) for p in listing.stdout.split() if p.isdigit()}
            if self._baseline_pids is None:
                self._baseline_pids = pids
            stray = sorted(pids - self._baseline_pids)
            script = (("kill -KILL " + " ".join(map(str, stray)) + " 2>/dev/null; " if stray else "")
                      + f"find /tmp {shlex.quote(self.image_user.workdir)} -mindepth 1 -delete")
            out = self._execute(["sh", "-c", script], user="root", env=None, cwd="/",
                                timeout=self.scaled(timeout), stdin=None)
            if not out.ok:
                raise MachineError(self._explain("reset failed", out))

    def preserve_live(self) -> list[str] | None:
        """Keep this guest running for ``agentbox attach`` after the test (``--preserve-debug``): the
        summary lines, or None when this backend cannot be attached to (it is then stopped as usual)."""
        return None

    def keep_nothing(self) -> None:  # noqa: B027 - an optional hook: a machine with nothing to drop does nothing
        """Under ``--preserve-debug``, a test that passed keeps nothing: its guest's task rootfs,
        mounts and task dir go as they do without the flag. Called before the stop."""

    def holdings(self) -> Holdings:
        """What this boot holds on the host (VMM processes, mounts, private dirs and sockets,
        containers), read right after the start; backends override it. :meth:`shutdown` proves
        each gone."""
        return Holdings()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the guest down the one shutdown ladder within about ``timeout`` seconds (default the
        machine's, scaled): the guest's own poweroff through its agent, then terminate, then kill
        (:func:`agentbox_runtime.vmm.shutdown.stop`; :attr:`stop_reports` says which rung ended it).
        Then checks that what the boot held on the host is gone (:meth:`holdings`: processes,
        mounts, sockets, containers; what --preserve-debug kept excepted) and fails in one line
        naming what leaked, as Firecracker's test framework checks each microVM's teardown."""
        with self._verb("shutdown", ""):
            if self._console is not None:
                self._console.close()
            held, self._holdings = self._holdings, None
            self._stop(self.scaled(timeout))
            if held is not None:
                kept = [path for p in self.preserved for path in p.paths]
                leaked = leftovers(held, kept, settle_s=self.scaled(10))
                if leaked:
                    raise MachineError(f"{self.name}: left behind after its stop: {'; '.join(leaked)}")

    def restart(self, timeout: float | None = None) -> None:
        """Stop and start again with the same state (persistent disks, workspace)."""
        with self._verb("restart", ""):
            self.shutdown(timeout)
            self.start()

    def write_artifacts(self) -> None:
        """Transcript and timings into the test's artifact dir."""
        if self.artifacts is None:
            return
        self.artifacts.mkdir(parents=True, exist_ok=True)
        (self.artifacts / f"{self.name}-transcript.json").write_text(json.dumps(self.transcript, indent=1))
        (self.artifacts / f"{self.name}-profile.json").write_text(json.dumps(self.profile, indent=1))

    # --- ports, crash and console: verbs a backend offers by capability ----------------
    # Each asks :attr:`capabilities` first; a backend without the capability fails in one line.
    crashed: bool = field(default=False, repr=False)
    """True after :meth:`crash` until the next :meth:`start`: every other verb then fails at once."""

    def _require(self, capability: str, verb: str) -> None:
        if not getattr(self.capabilities, capability):
            raise MachineError(f"{self.name}: {verb} is not available on the {self.backend or 'unknown'} backend "
                               f"(it has no '{capability}' capability; see agentbox_runtime.backend_caps)")

    def _gone_check(self, verb: str) -> None:
        """Called as every verb begins: after :meth:`crash`, only a stop or a new start may run."""
        if verb == "start":
            self.crashed = False
        elif self.crashed and verb not in ("shutdown", "restart", "crash"):
            raise MachineError(f"{self.name}: the guest is gone (crashed by crash()); '{verb}' cannot run: "
                               "restart() boots it again")

    def _forward_port(self, guest_port: int, host_port: int | None) -> int:
        """The backend's forward (see :meth:`forward_port`); backends with ``port_forward`` override it."""
        raise MachineError(f"{self.name}: forward_port is not implemented on the {self.backend} backend")

    def _crash(self) -> None:
        """The backend's hard power-off (see :meth:`crash`); backends with ``crash`` override it."""
        raise MachineError(f"{self.name}: crash is not implemented on the {self.backend} backend")

    def wait_for_open_port(self, port: int, addr: str = "127.0.0.1", *, timeout: float | None = None) -> None:
        """Wait until a guest process listens on TCP ``port`` at ``addr`` (default 127.0.0.1; a
        socket on the wildcard address counts), as the NixOS test driver's verb does.

        Checked inside the guest, from its kernel's ``/proc/net/tcp`` and ``tcp6`` (no tool the
        image may lack). On timeout the error lists the guest's listening sockets seen last."""
        self._wait_port(port, addr, True, timeout)

    def wait_for_closed_port(self, port: int, addr: str = "127.0.0.1", *, timeout: float | None = None) -> None:
        """Wait until nothing in the guest listens on TCP ``port`` at ``addr`` (the opposite of
        :meth:`wait_for_open_port`; the same check and error)."""
        self._wait_port(port, addr, False, timeout)

    def _wait_port(self, port: int, addr: str, want_open: bool, timeout: float | None) -> None:
        check_port(port, "port")
        addr = normalize(addr)
        state = "open" if want_open else "closed"
        seen: list[list[Listener]] = []

        def settled(_last_try: bool) -> bool:
            out = self._execute(READ_COMMAND, user="root", env=None, cwd="/", timeout=self.scaled(30),
                                stdin=None)
            seen[:] = [listening(out.stdout)]
            return serves(seen[0], addr, port) == want_open

        with self._verb(f"wait_for_{state}_port", f"{addr}:{port}"):
            try:
                retry(settled, timeout=self.scaled(self._given(timeout)), interval=1.0)
            except WaitTimeout as exc:
                raise MachineError(self._explain(
                    f"{self.name}: {exc}: TCP port {port} on {addr} is not {state} in the guest; "
                    f"its listening sockets: {describe(seen[0]) if seen else 'never read'}", None)) from None

    def forward_port(self, guest_port: int, host_port: int | None = None) -> int:
        """Make the guest's TCP ``guest_port`` reachable from the host on 127.0.0.1; the host port.

        ``host_port`` None picks a free one (only ever on 127.0.0.1). Per backend:

        - qemu: a ``hostfwd`` rule added to the running guest's user-mode network over QMP; the
          guest server must listen on 0.0.0.0 (or 10.0.2.15), not only on its 127.0.0.1; the rule
          lasts for this boot (forward again after a restart);
        - krun-podman and container: ports are published when the task starts (Podman cannot add
          one later): start the machine with ``publish=("127.0.0.1::8080",)`` and
          ``forward_port(8080)`` returns the host port Podman chose; an unpublished port fails in one line;
        - krun-direct: not available (``port_forward`` is False): libkrun's port map is fixed before
          the VM starts and its TSI binds the guest's listen address on the host, 0.0.0.0 for a
          wildcard server (docs/libkrun-fidelity.md (c)).
        """
        self._require("port_forward", "forward_port")
        check_port(guest_port, "guest port")
        if host_port is not None:
            check_port(host_port, "host port")
        with self._verb("forward_port", f"{guest_port}"):
            return self._forward_port(guest_port, host_port)

    def crash(self) -> None:
        """Power the guest off hard, as pulling the plug would: no sync, no shutdown (the VMM gets
        SIGKILL; a Podman task ``podman kill -s KILL``). What the guest had not written to its disks
        is lost. Afterwards every verb fails at once saying the guest is gone; the teardown only
        cleans up (no graceful stop); :meth:`restart` boots it again on the same state."""
        self._require("crash", "crash")
        with self._verb("crash", ""):
            if self.crashed:
                return
            if self._console is not None:
                self._console.close()
            self._crash()
            self.crashed = True

    def wait_for_console_text(self, regex: str, *, timeout: float | None = None) -> str:
        """Wait until ``regex`` appears in the guest's console output (kernel messages, what the
        guest writes to ``/dev/console`` or ``/dev/kmsg`` at a level the console shows); the matched
        text. As in the NixOS test driver, the regex is searched across lines, in output not yet
        consumed by an earlier ``wait_for_console_text`` of this boot: each match consumes the
        output up to its end. Fails at once on a kernel panic; the error shows the console tail."""
        self._require("console", "wait_for_console_text")
        with self._verb("wait_for_console_text", regex):
            return self._console_wait("wait_for_console_text", regex, timeout)

    def wait_until_console_matches(self, regex: str, *, timeout: float | None = None) -> str:
        """Wait until the whole console log of this boot matches ``regex`` (``re.MULTILINE``: ``^``
        and ``$`` are line ends); the matched text. Consumes nothing, so it also finds what an
        earlier wait already saw. Fails at once on a kernel panic; the error shows the console tail."""
        self._require("console", "wait_until_console_matches")
        with self._verb("wait_until_console_matches", regex):
            return self._console_wait("wait_until_matches", regex, timeout)

    def _console_wait(self, how: str, regex: str, timeout: float | None) -> str:

        try:
            result: str = getattr(self.console, how)(regex, timeout=timeout)
        except ConsoleError as exc:
            raise MachineError(str(exc)) from None
        return result

