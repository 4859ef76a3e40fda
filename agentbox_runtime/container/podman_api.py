"""The one place that talks to the Podman API (podman-py): structured reads and clean-up.

Podman is reached two ways, each for its own kind of work:

- the CLI runner :class:`agentbox_runtime.podman.Podman` runs what must keep the reference's exact
  argv (``podman run`` of tasks, sidecars, probes and maintenance VMs, the interactive
  ``podman exec -it`` of ``agentbox attach``) and what has no API (``podman unshare``,
  ``podman image mount``, ``podman pull`` with its progress);
- this module reads state and removes it: container and image inspect, labels, lists by label,
  logs, published ports, ``rm -f``, ``kill``, ``rmi``, the live-disk annotation query and ``podman info``.

The service
-----------
Every call goes to the first of:

1. ``$CONTAINER_HOST`` when it is set (it makes the ``podman`` CLI a remote client of that service
   too): it must be a ``unix://`` socket of ours that answers ``_ping``, else every call fails;
2. this user's own Podman socket (root: ``/run/podman/podman.sock``; rootless:
   ``$XDG_RUNTIME_DIR/podman/podman.sock``) when it is a socket owned by this user and answers
   ``_ping``;
3. a ``podman system service --time=0`` this process starts on first need, listening on
   ``podman.sock`` in a private runtime dir of its own
   (``runtime_dir("podman-api", <pid>)``: 0700, owned by us; the socket is 0600). It is waited for
   (up to :data:`START_TIMEOUT_S`) until it answers ``_ping``, and stopped through the one shutdown
   ladder (:func:`agentbox_runtime.vmm.shutdown.stop`) when the :func:`service_scope` it was started
   in ends: the harness session (``pytest_configure`` to the end of the run) and each ``agentbox``
   command. Outside any scope (a library caller) it is stopped at interpreter exit. Started from
   the main thread it also dies with this process (``PR_SET_PDEATHSIG``), so a killed run leaves
   no service behind.

Every call has a timeout (:data:`API_TIMEOUT_S`). Every failure is one line,
``podman API: <what> failed: <why> (service <socket>)``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from agentbox_runtime.errors import AgentboxError, one_line
from agentbox_runtime.private_dir import ensure_private, runtime_dir
from agentbox_runtime.retry import WaitTimeout, retry
from agentbox_runtime.vmm.shutdown import StopReport, stop

if TYPE_CHECKING:
    from podman import PodmanClient

API_TIMEOUT_S = 30.0
"""Timeout of one API call."""
START_TIMEOUT_S = 30.0
"""How long a started service may take to answer ``_ping``."""
PING_TIMEOUT_S = 2.0
"""Timeout of the ``_ping`` that decides whether an existing socket answers."""
STOP_TIMEOUT_S = 10.0
"""The shutdown ladder's budget for a service we started."""
SOCKET_NAME = "podman.sock"
T = TypeVar("T")


class PodmanApiError(AgentboxError):
    """The Podman API could not be reached or refused a call (one line)."""


# --- the service ---------------------------------------------------------------------------------
def user_socket() -> Path | None:
    """``$CONTAINER_HOST`` (``unix://`` only), else this user's default Podman socket, when it is a
    socket owned by this user; None otherwise (nothing is checked for an answer here)."""
    host = os.environ.get("CONTAINER_HOST", "")
    if host.startswith("unix://"):
        path = Path(host[len("unix://"):])
    elif os.geteuid() == 0:
        path = Path("/run/podman") / SOCKET_NAME
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
        path = Path(xdg) / "podman" / SOCKET_NAME
    try:
        st = os.stat(path)
    except OSError:
        return None
    return path if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid() else None


def _client(sock: Path, timeout: float) -> PodmanClient:
    from podman import PodmanClient

    return PodmanClient(base_url=f"unix://{sock}", timeout=timeout)


def answers(sock: Path, timeout: float = PING_TIMEOUT_S) -> bool:
    """Whether a Podman API service answers ``_ping`` on ``sock``."""
    try:
        with _client(sock, timeout) as client:
            return bool(client.ping())
    except Exception:  # podman-py raises requests', urllib3's and its own types
        return False


def _die_with_parent(parent: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)
    return setup


@dataclass
class ApiService:
    """A ``podman system service`` this process started in a private runtime dir."""

    directory: Path
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.directory / SOCKET_NAME

    @property
    def log(self) -> Path:
        return self.directory / "service.log"

    @classmethod
    def start(cls, directory: Path | None = None, timeout_s: float = START_TIMEOUT_S) -> ApiService:
        """Start ``podman system service --time=0 unix://<directory>/podman.sock`` (``directory``:
        a fresh private dir of this process by default) and wait until it answers ``_ping``; raises
        PodmanApiError with the service's last output when it does not within ``timeout_s``."""
        directory = ensure_private(directory or runtime_dir("podman-api", for_sockets=True) / str(os.getpid()))
        sock = directory / SOCKET_NAME
        sock.unlink(missing_ok=True)
        main = threading.current_thread() is threading.main_thread()
        try:
            with open(directory / "service.log", "wb") as log:
                proc = _spawn(["podman", "system", "service", "--time=0", f"unix://{sock}"], log,
                              _die_with_parent(os.getpid()) if main else None)
        except PodmanApiError:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        service = cls(directory, proc)
        try:
            retry(lambda _last: service._ready(), timeout=timeout_s, interval=0.1,
                  describe=lambda: f"last output: {service.last_output() or '(none)'}")
        except (WaitTimeout, PodmanApiError) as exc:
            service.stop()
            raise PodmanApiError(f"podman API: starting 'podman system service' on {sock} failed: "
                                 f"{one_line(str(exc))}") from None
        os.chmod(sock, 0o600)
        return service

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise PodmanApiError(f"it exited with status {self.proc.returncode}; "
                                 f"last output: {self.last_output() or '(none)'}")
        return self.socket.is_socket() and answers(self.socket)

    def last_output(self) -> str:
        """The end of the service's log, on one line."""
        try:
            return one_line(self.log.read_text(errors="replace")[-400:].strip())
        except OSError:
            return ""

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> StopReport:
        """Stop the service down the shutdown ladder (SIGTERM, then SIGKILL; within about
        ``timeout_s``) and remove its dir."""
        report = stop(self.proc, timeout=timeout_s)
        shutil.rmtree(self.directory, ignore_errors=True)
        return report


def _spawn(argv: list[str], log: IO[bytes], setup: Callable[[], None] | None) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=setup)
    except FileNotFoundError:
        raise PodmanApiError("podman API: starting 'podman system service' failed: podman is not "
                             "installed or not available on PATH") from None


@dataclass
class Connection:
    """Where this process's API calls go; starts (and later stops) a service only when needed."""

    timeout_s: float = API_TIMEOUT_S
    service: ApiService | None = None
    _socket: Path | None = None
    _client: PodmanClient | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def socket(self) -> Path:
        """The socket calls go to (see the module docstring); starts a service on first need."""
        with self._lock:
            if self._socket is None:
                existing = user_socket()
                if existing is not None and answers(existing):
                    self._socket = existing
                elif os.environ.get("CONTAINER_HOST"):
                    raise PodmanApiError(
                        f"podman API: CONTAINER_HOST={os.environ['CONTAINER_HOST']} does not answer (accepted: "
                        "unix://<socket of ours> of a running 'podman system service', or CONTAINER_HOST unset)")
                else:
                    self.service = ApiService.start()
                    self._socket = self.service.socket
            return self._socket

    def client(self) -> PodmanClient:
        """The podman-py client on :meth:`socket`."""
        sock = self.socket()
        with self._lock:
            if self._client is None:
                self._client = _client(sock, self.timeout_s)
            return self._client

    def close(self) -> StopReport | None:
        """Close the client and stop the service this connection started (if any)."""
        with self._lock:
            if self._client is not None:
                self._client.close()  # type: ignore[no-untyped-call]
            service, self.service, self._socket, self._client = self.service, None, None, None
        return service.stop() if service is not None else None


_current: Connection | None = None
_scopes = 0
_guard = threading.Lock()


def connection() -> Connection:
    """This process's connection (the innermost :func:`service_scope`'s, else one stopped at exit)."""
    global _current
    with _guard:
        if _current is None:
            _current = Connection()
            if _scopes == 0:
                atexit.register(_current.close)
        return _current


@contextlib.contextmanager
def service_scope() -> Iterator[Connection]:
    """While inside, API calls share one connection; when the outermost scope ends, the service it
    had to start (if any) is stopped through the shutdown ladder."""
    global _current, _scopes
    with _guard:
        _scopes += 1
    try:
        yield connection()
    finally:
        with _guard:
            _scopes -= 1
            ending = _current if _scopes == 0 else None
            if ending is not None:
                _current = None
        if ending is not None:
            ending.close()


def scope_open() -> bool:
    """Whether a :func:`service_scope` is open in this process (else a started service ends at exit)."""
    return _scopes > 0


def _call(what: str, fn: Callable[[PodmanClient], T], missing: T | None = None) -> T:
    """``fn(client)``; a missing container/image gives ``missing`` when it is not None, any other
    failure one PodmanApiError line."""
    conn = connection()
    client = conn.client()
    try:
        return fn(client)
    except Exception as exc:  # requests', urllib3's and podman-py's own types
        if _not_found(exc):
            if missing is not None:
                return missing
            raise PodmanApiError(f"podman API: {what} failed: {_reason(exc)}") from None
        raise PodmanApiError(f"podman API: {what} failed: {_reason(exc)} (service {conn.socket()})") from None


def _not_found(exc: BaseException) -> bool:
    """A "no such container/image" answer: HTTP 404 from the service. Read from the response, not by
    ``except NotFound``: a second import of ``podman.errors`` (pytester's in-process runs restore
    ``sys.modules``) makes classes that the client's own modules do not raise."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) == 404 or type(exc).__name__ in ("NotFound", "ImageNotFound")


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "explanation", None) or str(exc) or type(exc).__name__
    return one_line(str(text))[:300]


# --- containers ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContainerInfo:
    """One container of a list: short id (12 hex), first name, labels and state (``running``...)."""

    id: str
    name: str
    labels: Mapping[str, str]
    state: str


def container_inspect(name: str) -> dict[str, Any] | None:
    """``podman container inspect <name>`` as a dict, or None when there is no such container."""
    result: dict[str, Any] = _call(f"inspecting container {name!r}",
                                   lambda c: dict(c.containers.get(name).attrs), missing={})
    return result or None


def container_running(name: str) -> bool:
    """Whether container ``name`` exists and is running."""
    attrs = container_inspect(name)
    return bool(attrs and (attrs.get("State") or {}).get("Running"))


def containers(labels: Mapping[str, str] | None = None, *, all_states: bool = True) -> list[ContainerInfo]:
    """Containers carrying every ``labels`` pair (``all_states=False``: running ones only)."""
    filters = [f"label={key}={value}" for key, value in (labels or {}).items()]

    def listed(client: PodmanClient) -> list[ContainerInfo]:
        out = []
        for ctr in client.containers.list(all=all_states, filters=filters or None):
            attrs = ctr.attrs
            names = attrs.get("Names") or [""]
            out.append(ContainerInfo(str(attrs.get("Id", ""))[:12], str(names[0]),
                                     dict(attrs.get("Labels") or {}), str(attrs.get("State", ""))))
        return out

    return _call("listing containers" + (f" labelled {', '.join(filters)}" if filters else ""), listed)


def remove_container(name: str) -> bool:
    """``podman rm -f -t 0 <name>``: stop (SIGKILL at once) and remove; False when it was not there."""
    def remove(client: PodmanClient) -> bool:
        response = client.api.delete(f"/containers/{name}", params={"force": True, "timeout": 0})
        if response.status_code == 404:
            return False
        response.raise_for_status()
        return True

    return _call(f"removing container {name!r}", remove)


def kill(name: str, signal_name: str = "KILL") -> None:
    """``podman kill -s <signal_name> <name>`` (``crash()``: SIGKILL with no stop, no sync)."""
    def send(client: PodmanClient) -> None:
        client.api.post(f"/containers/{name}/kill", params={"signal": signal_name}).raise_for_status()

    _call(f"sending SIG{signal_name} to container {name!r}", send)


def logs(name: str, tail: int = 120) -> str:
    """The last ``tail`` lines of a container's stdout and stderr (as ``podman logs --tail``)."""
    def read(client: PodmanClient) -> str:
        chunks = client.containers.get(name).logs(stdout=True, stderr=True, tail=tail)
        return b"".join(chunks if not isinstance(chunks, bytes) else [chunks]).decode(errors="replace")

    return _call(f"reading the logs of container {name!r}", read)


def published_ports(name: str, port: int) -> list[tuple[str, int]]:
    """``(host address, host port)`` of each binding container ``name`` publishes for its
    ``port``/tcp (as ``podman port``; an empty address is every address), in Podman's order; empty
    when it publishes none. PodmanApiError when the container does not exist."""
    attrs = container_inspect(name)
    if attrs is None:
        raise PodmanApiError(f"podman API: reading the ports of container {name!r} failed: no such container")
    bindings = ((attrs.get("NetworkSettings") or {}).get("Ports") or {}).get(f"{port}/tcp") or []
    out = []
    for binding in bindings:
        value = str(binding.get("HostPort", ""))
        if value.isdigit() and 0 < int(value) <= 65535:
            out.append((str(binding.get("HostIp") or ""), int(value)))
    return out


def running_annotations() -> dict[str, dict[str, str]]:
    """``{short id: {annotation: value}}`` of every running container."""
    def read(client: PodmanClient) -> dict[str, dict[str, str]]:
        out = {}
        for ctr in client.containers.list():
            full = client.containers.get(ctr.id).attrs
            out[ctr.id[:12]] = dict((full.get("Config") or {}).get("Annotations") or {})
        return out

    return _call("listing running containers and their annotations", read)


# --- images --------------------------------------------------------------------------------------
def image_inspect(ref: str) -> dict[str, Any] | None:
    """``podman image inspect <ref>`` as a dict, or None when there is no such local image."""
    result: dict[str, Any] = _call(f"inspecting image {ref!r}", lambda c: dict(c.images.get(ref).attrs), missing={})
    return result or None


def image_exists(ref: str) -> bool:
    """``podman image exists <ref>``."""
    return image_inspect(ref) is not None


def image_tags(repo: str) -> list[str]:
    """``repo:tag`` of every local image of repository ``repo`` (as ``podman images <repo>``)."""
    def tags(client: PodmanClient) -> list[str]:
        found = {t for image in client.images.list() for t in image.tags
                 if t.rpartition(":")[0] == repo}
        return sorted(found)

    return _call(f"listing images of {repo!r}", tags)


def remove_image(ref: str) -> bool:
    """``podman rmi <ref>`` (never forced: an image a container or child image uses stays);
    False when it was not removed."""
    from podman.errors import APIError

    def remove(client: PodmanClient) -> bool:
        try:
            client.images.remove(ref)
        except APIError:  # in use, or gone already: best effort, as the callers want
            return False
        return True

    return _call(f"removing image {ref!r}", remove)


def info() -> dict[str, Any]:
    """``podman info`` as a dict."""
    return _call("podman info", lambda c: dict(c.info()))  # type: ignore[no-untyped-call]
