"""The fixtures other projects import (registered by the ``agentbox`` pytest plugin).

Dimension fixtures (override in a ``conftest.py`` or parametrize indirectly):
``agentbox_backend``, ``agentbox_image``, ``vm_memory`` (GiB), ``vm_cpus``,
``storage_backend``. Resource fixtures: ``workspace``, ``nix_disk``,
``containers_disk``, ``microvm`` / ``microvm_factory``, ``krun_task`` /
``krun_task_factory``, ``container_task``. Factories own everything they
create and tear it down in reverse order, also when the test failed.
"""

from __future__ import annotations

import contextlib
import json
import warnings
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentbox_harness.artifacts import MACHINES, REPORTS, attach, failed, node_name
from agentbox_harness.backends import MicrovmMachine
from agentbox_harness.caps import require_backend
from agentbox_harness.machine import Machine
from agentbox_harness.context import BackendContext
from agentbox_harness.registry import build
from agentbox_harness.session import HarnessSession, harness
from agentbox_harness.workspace import Workspace
from agentbox_runtime.backends import BACKENDS, CONTAINER, BackendOptions, is_microvm
from agentbox_runtime.images.commit import image_user
from agentbox_runtime import disks
from agentbox_runtime.container import host_conf
from agentbox_runtime.container.sidecar import prepare_sidecar, teardown_stack
from agentbox_runtime.podman import Podman
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.private_dir import OutputDir
from agentbox_runtime.workspace_disk import WorkspaceDisk



@pytest.fixture(scope="session")
def agentbox_session(pytestconfig: pytest.Config) -> HarnessSession:
    """Session-wide settings: timeout scale, strict mode, shared image cache, run label."""
    return harness(pytestconfig)


@pytest.fixture(scope="session")
def agentbox_harness(agentbox_session: HarnessSession) -> HarnessSession:
    """Deprecated name of ``agentbox_session`` (it read like the package); kept for existing tests."""
    warnings.warn("the agentbox_harness fixture is now agentbox_session", DeprecationWarning, stacklevel=2)
    return agentbox_session


@pytest.fixture
def agentbox_backend(request: pytest.FixtureRequest, agentbox_session: HarnessSession) -> str:
    """The backend for VM fixtures: ``request.param``, else ``--agentbox-backend`` (``auto`` = best usable)."""
    return getattr(request, "param", None) or agentbox_session.backend


@pytest.fixture
def agentbox_image(request: pytest.FixtureRequest, agentbox_session: HarnessSession) -> str:
    """The guest image: ``request.param``, else ``--agentbox-image``, else ``localhost/agentbox:latest``
    (built once per run, across xdist workers)."""
    return getattr(request, "param", None) or agentbox_session.image()


def workspace_owner(request: pytest.FixtureRequest, session: HarnessSession) -> tuple[int, int] | None:
    """As root, the ids a workspace gets: the image user's of the test's image, known without
    building one (its ``agentbox_image`` parameter, else the run's image: ``--agentbox-image`` or
    the default tag; the stock image's dev when none is built yet). None when not root: the
    workspace stays the invoking user's."""
    if os.geteuid() != 0:
        return None
    callspec = getattr(request.node, "callspec", None)
    image = callspec.params.get("agentbox_image") if callspec is not None else None
    user = image_user(str(image)) if image else session.image_user()
    return user.uid, user.gid


@pytest.fixture
def vm_memory(request: pytest.FixtureRequest) -> int:
    """Guest memory in GiB (default 2)."""
    return int(getattr(request, "param", 2))


@pytest.fixture
def vm_cpus(request: pytest.FixtureRequest) -> int:
    """Guest vCPUs (default 2)."""
    return int(getattr(request, "param", 2))


@pytest.fixture
def storage_backend(request: pytest.FixtureRequest) -> str:
    """microvm task rootfs storage: auto, btrfs-snapshot, fuse-overlay or reflink (default auto)."""
    return str(getattr(request, "param", "auto"))


@pytest.fixture
def workspace(request: pytest.FixtureRequest, tmp_path: Path, agentbox_session: HarnessSession) -> Iterator[Workspace]:
    """A project directory mounted at /workspace in the guest, with an isolated state root.

    ``request.param`` may name the mode: ``direct`` (default), ``copy`` or
    ``overlay-review``. When the tests run as root, the directory belongs to
    the image user's ids (1000:1000, dev, in the stock image; the test's
    ``agentbox_image`` parameter or ``--agentbox-image`` may name another), so
    the guest's user is that user and its writes land owned by it."""
    mode = getattr(request, "param", "direct")
    state_base = agentbox_session.state_base(tmp_path)
    owner = workspace_owner(request, agentbox_session)
    ws = Workspace.create(tmp_path / "project", tmp_path / "ws-scratch", state_base, mode, owner)
    if ws.mounted:
        agentbox_session.registry.add_mount(ws.path)
    yield ws
    ws.close()
    agentbox_session.registry.drop_mount(ws.path)


@dataclass(frozen=True)
class DiskHandle(WorkspaceDisk):
    """A managed raw btrfs image of a workspace (create, validate, grow, reset: see
    :class:`agentbox_runtime.workspace_disk.WorkspaceDisk`; grow and reset refuse while a guest of
    this harness uses it) that a root test can also inspect."""

    @contextlib.contextmanager
    def inspect(self) -> Iterator[Path]:
        """Mount the image read-only on the host (root only) for inspection."""
        if os.geteuid() != 0:
            pytest.skip("read-only host inspection of a raw disk needs root (loop mount)")
        target = self.state_root / f".inspect-{self.disk.spec.key}"
        target.mkdir(exist_ok=True)
        subprocess.run(["mount", "-o", "loop,ro", str(self.path), str(target)], check=True,
                       capture_output=True, timeout=60)
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], capture_output=True, timeout=60)
            target.rmdir()


@pytest.fixture
def nix_disk(workspace: Workspace, agentbox_backend: str) -> DiskHandle:
    """The workspace's /nix raw image as the chosen backend attaches it: ``microvm-nix.raw`` for
    qemu and krun-direct, ``libkrun-nix.raw`` for krun-podman (the container backend attaches none:
    the test skips)."""
    return DiskHandle(_backend_disk(agentbox_backend, "nix"), workspace.state.state_root)


@pytest.fixture
def containers_disk(workspace: Workspace, agentbox_backend: str) -> DiskHandle:
    """The workspace's container-storage raw image as the chosen backend attaches it (see ``nix_disk``)."""
    return DiskHandle(_backend_disk(agentbox_backend, "containers"), workspace.state.state_root)


def _backend_disk(backend: str, key: str) -> disks.RawDisk:
    """The raw disk ``key`` as ``backend`` attaches it (a backend registered at run time that the
    runtime does not know gets the microvm images)."""
    known = BACKENDS.get(backend)
    if known is not None and not known.capabilities.raw_disks:
        with_disks = ", ".join(b.name for b in BACKENDS.values() if b.capabilities.raw_disks)
        pytest.skip(f"the {backend} backend attaches no raw disks; raw-disk tests need {with_disks}")
    chosen = known.disks if known is not None else disks.MICROVM_DISKS
    return next(d for d in chosen if d.spec.key == key)


class Factory:
    """Creates machines and tears every one down (reverse order, errors collected)."""

    def __init__(self, session: HarnessSession, request: pytest.FixtureRequest) -> None:
        self.session, self.request = session, request
        self.machines: list[Machine] = []

    def add(self, machine: Machine) -> Machine:
        machine.default_timeout = self.session.default_timeout
        machine.test_id = self.request.node.nodeid
        self.request.node.stash.setdefault(MACHINES, []).append(machine)
        self.machines.append(machine)
        machine.artifacts = self.session.artifact_dir(self.request.node)
        machine.redactor = self.session.redactor
        machine.start()
        return machine

    def keep_timings(self) -> None:
        """Every machine's profile goes to results/timings/<test>.json whatever the outcome."""
        root = Path(str(self.request.config.rootpath)) / "results" / "timings"
        with OutputDir.open(root) as out:  # no link followed, ours (see private_dir.OutputDir)
            out.write_file(f"{node_name(self.request.node.nodeid)}.json",
                           json.dumps({m.name: m.profile for m in self.machines}, indent=1).encode(), replace=True)

    def close(self) -> list[str]:
        """Stop every machine (newest first) and write its artifacts; the errors, one per failure.

        A failure stopping one machine never keeps the others running. With --preserve-debug, a
        failed test's guests that can be attached to (qemu, container) keep running for
        ``agentbox attach``; the others stop with their rootfs, disks and logs kept (see the summary).
        A passing test's guests keep nothing, flag or not."""
        errors = []
        test_failed = failed(self.request.node.stash.get(REPORTS, {}))
        live = self.session.preserve_debug and test_failed
        for m in reversed(self.machines):
            steps: tuple[Callable[[], None], ...] = (m.shutdown, m.write_artifacts)
            if not test_failed:
                m.keep_nothing()  # --preserve-debug keeps what failed, never a passing test's state
            if live:
                try:
                    if m.preserve_live() is not None:
                        steps = (m.write_artifacts,)
                except Exception as exc:  # noqa: BLE001 - then it is stopped as usual
                    errors.append(f"{m.name}: preserve_live: {exc}")
            for step in steps:
                try:
                    step()
                except Exception as exc:  # noqa: BLE001 - teardown must reach every machine
                    errors.append(f"{m.name}: {step.__name__}: {exc}")
            self.session.preserved.extend(m.preserved)
        try:
            self.keep_timings()
        except (OSError, AgentboxError) as exc:
            errors.append(f"timings: {exc}")
        node = self.request.node
        if failed(node.stash.get(REPORTS, {})) and self.machines:
            attach(sorted(self.session.artifact_dir(node).iterdir()))
        return errors


def _context(request: pytest.FixtureRequest, session: HarnessSession, workspace: Workspace, memory: int, cpus: int,
             storage: str) -> BackendContext:
    cold = request.node.get_closest_marker("cold_boot") is not None
    return BackendContext(session, workspace, lambda: str(request.getfixturevalue("agentbox_image")), memory * 1024,
                          cpus, storage, "cold" if cold else session.boot)


def _factory(request: pytest.FixtureRequest, session: HarnessSession, backend: str, ctx: BackendContext,
             what: str) -> Iterator[Callable[..., Machine]]:
    require_backend(session, backend)
    factory = Factory(session, request)

    def make(name: str = "vm", **options: object) -> Machine:
        return factory.add(build(backend, ctx, name, options))

    yield make
    errors = factory.close()
    if errors:
        raise AssertionError(f"{what} teardown failed: " + "; ".join(errors))


@pytest.fixture
def machine_factory(request: pytest.FixtureRequest, agentbox_session: HarnessSession, workspace: Workspace,
                    agentbox_backend: str, vm_memory: int, vm_cpus: int,
                    storage_backend: str) -> Iterator[Callable[..., Machine]]:
    """``machine_factory(name="vm", **options)``: a started machine of the ``agentbox_backend``.

    The backend comes from :data:`agentbox_harness.registry.MACHINE_BACKENDS`; options are the
    backend's (see ``microvm_factory`` and ``krun_task_factory``). Every machine is torn down
    after the test, newest first, also when it failed."""
    ctx = _context(request, agentbox_session, workspace, vm_memory, vm_cpus, storage_backend)
    yield from _factory(request, agentbox_session, agentbox_backend, ctx, "machine")


@pytest.fixture
def guest(machine_factory: Callable[..., Machine]) -> Machine:
    """A booted machine of ``agentbox_backend``, whatever it is (microvm, krun-podman, container):
    the verbs are the same. With ``@pytest.mark.krun_podman_too`` a test runs on the session's
    backend and on krun-podman (libkrun mode through Podman).
    Verbs a backend offers by capability (``machine.capabilities``; without it, one line naming
    the backend and the capability): ``wait_for_open_port(port, addr)`` and
    ``wait_for_closed_port`` (checked in the guest), ``forward_port(guest_port, host_port=None)``
    (``port_forward``: a 127.0.0.1 host port; qemu adds it live, krun-podman and container need
    ``publish=`` at start), ``crash()`` (``crash``: hard power-off, then every verb says the guest
    is gone), ``wait_for_console_text(regex)`` and ``wait_until_console_matches(regex)``
    (``console``: qemu and krun-direct). Their docstrings on ``Machine`` are the manual."""
    return machine_factory("vm")


def _require_microvm(backend: str) -> None:
    """Skip unless ``backend`` runs a microvm task (what ``MicrovmMachine`` drives)."""
    if not is_microvm(backend):
        microvms = " or ".join(name for name in BACKENDS if is_microvm(name))
        pytest.skip(f"microvm needs the {microvms} backend, not {backend}")


@pytest.fixture
def microvm_factory(request: pytest.FixtureRequest, agentbox_session: HarnessSession, workspace: Workspace,
                    agentbox_backend: str, vm_memory: int, vm_cpus: int,
                    storage_backend: str) -> Iterator[Callable[..., MicrovmMachine]]:
    """``microvm_factory(name="vm", **options)`` boots a microvm task whose agent serves the verbs.

    The guest command is ``agentbox-guest-init agent --port org.agentbox.agent`` with root=True:
    the agent runs as root and runs commands as dev unless a verb says ``user="root"``.
    Options override the dimension fixtures: ``storage``, ``memory_mib``, ``cpus``, ``image``,
    ``workspace`` (a :class:`Workspace`), ``image_cache`` (a directory; default the per-user
    harness cache), ``extra_env`` (``K=V`` strings added to the guest's launch env),
    ``hardened`` and ``preserve_debug`` (keep the task rootfs and state after shutdown). The VMM
    is the backend's (qemu: QEMU, krun-direct: libkrun)."""
    _require_microvm(agentbox_backend)
    ctx = _context(request, agentbox_session, workspace, vm_memory, vm_cpus, storage_backend)
    yield from _factory(request, agentbox_session, agentbox_backend, ctx, "microvm")  # type: ignore[misc]


@pytest.fixture
def microvm(microvm_factory: Callable[..., MicrovmMachine]) -> MicrovmMachine:
    """A booted microvm (see ``microvm_factory``); ``microvm.succeed("id -un", timeout=30)`` → ``dev``."""
    return microvm_factory()


@pytest.fixture(scope="module")
def shared_workspace(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                     agentbox_session: HarnessSession) -> Iterator[Workspace]:
    """The workspace of ``shared_microvm``: one per test module (direct mode, owned by dev's ids
    when the tests run as root)."""
    tmp = tmp_path_factory.mktemp("shared")
    ws = Workspace.create(tmp / "project", tmp / "ws-scratch", agentbox_session.state_base(tmp), "direct",
                          workspace_owner(request, agentbox_session))
    yield ws
    ws.close()


@pytest.fixture(scope="module")
def _shared_microvm_machine(request: pytest.FixtureRequest, agentbox_session: HarnessSession,
                            shared_workspace: Workspace) -> Iterator[MicrovmMachine]:
    backend = agentbox_session.backend
    _require_microvm(backend)
    ctx = BackendContext(agentbox_session, shared_workspace, agentbox_session.image, 2048, 2, "auto",
                         agentbox_session.boot)
    for make in _factory(request, agentbox_session, backend, ctx, "shared microvm"):
        yield make("shared")  # type: ignore[misc]


@pytest.fixture(scope="module")
def shared_machine_factory(request: pytest.FixtureRequest, agentbox_session: HarnessSession,
                           shared_workspace: Workspace) -> Iterator[Callable[..., Machine]]:
    """``shared_machine_factory(backend, name="shared", **options)``: machines that live for the test
    module, on ``shared_workspace`` (options as for ``machine_factory``, e.g. ``hardened=True``).
    A backend this host cannot run skips (strict: fails) naming what is missing."""
    made: list[Iterator[Callable[..., Machine]]] = []

    def make(backend: str, name: str = "shared", **options: object) -> Machine:
        ctx = BackendContext(agentbox_session, shared_workspace, agentbox_session.image, 2048, 2, "auto",
                         agentbox_session.boot)
        factory = _factory(request, agentbox_session, backend, ctx, f"shared {backend} machine")
        made.append(factory)
        return next(factory)(name, **options)

    yield make
    errors = []
    for factory in reversed(made):  # each one's teardown stops its machine; every one runs
        try:
            next(factory, None)
        except AssertionError as exc:
            errors.append(str(exc))
    if errors:
        raise AssertionError("; ".join(errors))


@pytest.fixture
def shared_microvm(_shared_microvm_machine: MicrovmMachine) -> MicrovmMachine:
    """A microvm booted once per test module and :meth:`~agentbox_harness.machine.Machine.reset`
    before each test, for checks that only look (the image contract, say): one boot instead of one
    per test. Its workspace is ``shared_workspace``. Tests that change the guest beyond what the
    reset undoes (packages, the persistent disks, a restart) use the function-scoped ``microvm``."""
    _shared_microvm_machine.reset()
    return _shared_microvm_machine


@pytest.fixture
def container_task(request: pytest.FixtureRequest, agentbox_session: HarnessSession,
                   workspace: Workspace) -> Iterator[Machine]:
    """A container-mode task (native Podman + nix-daemon sidecar) with the Machine verbs."""
    ctx = _context(request, agentbox_session, workspace, 2, 2, "auto")
    for make in _factory(request, agentbox_session, "container", ctx, "container task"):
        yield make("ct")


@pytest.fixture
def krun_task_factory(request: pytest.FixtureRequest, agentbox_session: HarnessSession, workspace: Workspace,
                      vm_memory: int, vm_cpus: int) -> Iterator[Callable[..., Machine]]:
    """``krun_task_factory(name="task", **options)``: libkrun-mode tasks (Podman + crun + libkrun).

    Options: ``memory_mib``, ``cpus``, ``publish`` (e.g. ``("8080:80",)``), ``root``,
    ``tsi``, ``guest_init`` (a host guest-init file), ``image``. Needs crun built with
    libkrun, libkrunfw and KVM: skips (strict: fails) naming what is missing."""
    ctx = _context(request, agentbox_session, workspace, vm_memory, vm_cpus, "auto")
    yield from _factory(request, agentbox_session, "krun-podman", ctx, "krun task")


@pytest.fixture
def krun_task(krun_task_factory: Callable[..., Machine]) -> Machine:
    """One libkrun-mode task (see ``krun_task_factory``)."""
    return krun_task_factory("task")


@pytest.fixture
def nix_sidecar(agentbox_session: HarnessSession, workspace: Workspace, agentbox_image: str) -> Iterator[object]:
    """The container-mode nix-daemon sidecar of the workspace (started or reused, health-probed).

    Yields a ``Sidecar`` (``name``, ``merged`` /nix dir, ``proxy_port``, ``reused``);
    a ``container_task`` of the same workspace shares it. Afterwards the sidecar,
    its FUSE mount and image mount are removed (``nix-upper`` stays in the state root)."""
    require_backend(agentbox_session, "container")

    with host_conf.applied():  # restored afterwards: no fixture changes os.environ for good
        podman = Podman()
        req = CONTAINER.request(BackendOptions(workspace=workspace.path, state=workspace.state.ensure(),
                                               image=agentbox_image, run_label=agentbox_session.run_label))
        sidecar = prepare_sidecar(podman, req, probe=True)
        try:
            yield sidecar
        finally:
            teardown_stack(podman, req)
