"""Session-wide harness settings, computed once from the pytest options."""

from __future__ import annotations

import contextlib
import sys
import logging
import os
import uuid
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentbox_harness.artifacts import node_dir
from agentbox_harness.run_reaper import RunRegistry, cache_root
from agentbox_runtime.container import podman_api
from agentbox_runtime.doctor import Check, run_checks, usable_backends
from agentbox_runtime.evidence import Redactor
from agentbox_guest_init.image_user import ImageUser
from agentbox_runtime.images.build import build
from agentbox_runtime.images.commit import image_user
from agentbox_runtime.images.recipe import DEFAULT_TAG
from agentbox_runtime.microvm.probe import probe
from agentbox_runtime.vmm import boot_verdicts
from agentbox_runtime.vmm import kvm_probe

KEY = pytest.StashKey["HarnessSession"]()
AUTO_ORDER = ("krun-direct", "qemu", "container")
"""What ``--agentbox-backend=auto`` tries, best first."""
TCG_SCALE = 4.0
"""Default timeout scale under TCG (software emulation); 1.0 with KVM."""


@dataclass
class HarnessSession:
    """What every fixture of a run shares."""

    config: pytest.Config
    run_label: str
    strict: bool
    preserve_debug: bool
    backend_option: str
    image_option: str | None
    kernel: Path | None
    state_dir: Path | None
    scale_option: float | None
    boot: str = "restore"
    """``--agentbox-boot``: how qemu guests start unless a test is marked ``cold_boot``."""
    default_timeout: float = 60.0
    image_cache: Path = field(default_factory=lambda: cache_root() / "microvm-images")
    preserved: list[Any] = field(default_factory=list)
    evidence_dir: Path | None = None
    """Where ``--agentbox-evidence`` writes each test's bundle (None: off)."""
    redactor: Redactor = field(default_factory=Redactor)
    """What no evidence file may contain: :meth:`register_secret` values and the values of
    secret-looking environment variables of this process."""
    _registry: RunRegistry | None = None
    _checks: list[Check] | None = None
    _image: str | None = None
    _image_user: ImageUser | None = None
    _accel: str | None = None
    _backend: str | None = None
    backend_reason: str = ""
    allow_standins: bool = False
    """``--agentbox-allow-standins`` (or ``AGENTBOX_ALLOW_STANDINS=1``): under ``--agentbox-strict`` a
    krun backend served by a QEMU stand-in counts as that backend."""

    def register_secret(self, value: str) -> None:
        """Keep ``value`` out of every evidence bundle of this run (it becomes ``[REDACTED]``)."""
        self.redactor.register(value)

    @property
    def checks(self) -> list[Check]:
        if self._checks is None:
            self._checks = run_checks(probe_kvm=False)
        return self._checks

    @property
    def backends(self) -> dict[str, tuple[bool, str]]:
        return usable_backends(self.checks)

    @property
    def backend(self) -> str:
        """``--agentbox-backend``; ``auto`` picks krun-direct, then qemu, then container, each only
        when usable here (krun-direct: only after a probe boot through it passed)."""
        if self._backend is None:
            self._backend, self.backend_reason = self._choose_backend()
        return self._backend

    def _choose_backend(self) -> tuple[str, str]:
        if self.backend_option in ("auto", "krun-direct"):
            self._probe_krun_direct()
        if self.backend_option != "auto":
            return self.backend_option, "chosen with --agentbox-backend"
        table = self.backends
        skipped: list[str] = []
        for name in AUTO_ORDER:
            ok, why = table[name]
            if ok:
                detail = f"; {', '.join(skipped)}" if skipped else ""
                return name, f"auto: first usable of {', '.join(AUTO_ORDER)}{detail}"
            skipped.append(f"{name} unavailable ({why})")
        return "qemu", f"auto: nothing usable ({'; '.join(skipped)}); qemu reports why"

    def _probe_krun_direct(self) -> None:
        """When libkrun loads but has never booted a guest here, boot once (cached per library)."""

        key = boot_verdicts.krun_direct_key()
        if key is None or boot_verdicts.read(boot_verdicts.KRUN_DIRECT, key) is not None:
            return

        probe(self.image(), image_cache=self.image_cache)
        self._checks = None

    @property
    def accelerator(self) -> str:
        """``kvm`` when a probe boot proved KVM boots the guest kernel here, else ``tcg`` (also for the
        krun backends: a QEMU-backed libkrun stand-in runs under TCG where KVM does not boot)."""
        if self._accel is None:
            if os.environ.get("AGENTBOX_QEMU_ACCEL") in ("kvm", "tcg"):
                self._accel = os.environ["AGENTBOX_QEMU_ACCEL"]
            else:

                self._accel = "kvm" if kvm_probe.probe_summary().ok else "tcg"
        return self._accel

    @property
    def timeout_scale(self) -> float:
        """``--agentbox-timeout-scale``, else 4.0 under TCG and 1.0 with KVM."""
        if self.scale_option is not None:
            return self.scale_option
        return 1.0 if self.accelerator == "kvm" else TCG_SCALE

    @property
    def registry(self) -> RunRegistry:
        """This process's leak registry (created on first use)."""
        if self._registry is None:
            self._registry = RunRegistry.create(self.run_label)
        return self._registry

    def state_base(self, tmp_path: Path) -> Path:
        """Where a test's state root lives (isolated per test unless --agentbox-state-dir).

        Both the test's tmp dir and the state base are recorded for leak checks and reaping."""
        base = self.state_dir if self.state_dir else tmp_path / "state"
        self.registry.add_root(tmp_path)
        self.registry.add_state_base(base)
        return base

    def image(self) -> str:
        """The guest image, built once per run (file-locked across xdist workers). The default
        image is (re)built for the user it was last built for (``agentbox image build --user``),
        so a run never turns someone's image back into the stock one."""
        if self._image is None:
            if self.image_option:
                self._image = self.image_option
            else:

                with self.live_output():  # the build's progress lines show while it runs, not after
                    self._image = build(user=self.image_user()).tag
        return self._image

    def image_user(self) -> ImageUser:
        """The user of the run's image (``--agentbox-image``, else the default tag), read from its
        labels once, without building it (the stock dev when it does not exist yet)."""
        if self._image_user is None:
            self._image_user = image_user(self.image_option or DEFAULT_TAG)
        return self._image_user

    @contextlib.contextmanager
    def live_output(self) -> Iterator[None]:
        """Output capture suspended and the runtime's ``agentbox`` log lines (image build progress)
        written to the terminal as they happen, not only captured."""
        capman = self.config.pluginmanager.getplugin("capturemanager")
        logger = logging.getLogger("agentbox")
        level = logger.level
        with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
            handler = logging.StreamHandler(sys.stderr)  # the real stderr: capture is off in here
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            try:
                yield
            finally:
                logger.removeHandler(handler)
                logger.setLevel(level)

    def artifact_dir(self, node: pytest.Item) -> Path:
        """The test's artifact dir (see :mod:`agentbox_harness.artifacts`)."""
        return node_dir(self.config, node.nodeid)


def podman_api_scope(config: pytest.Config) -> None:
    """The run's Podman API connection (:func:`agentbox_runtime.container.podman_api.service_scope`),
    from ``pytest_configure`` to the run's very end (``config.add_cleanup``: after
    ``pytest_sessionfinish``'s leak check). The first structured read asks this user's own Podman
    socket, else starts ``podman system service`` in this process's private runtime dir; a service
    started so is stopped at the end, through the shutdown ladder."""
    stack = contextlib.ExitStack()
    stack.enter_context(podman_api.service_scope())
    config.add_cleanup(stack.close)


def run_label() -> str:
    """``pytest-<test run uid>[-<xdist worker>]``: unique per pytest process, shared prefix per run."""
    uid = (os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex)[:12]
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return f"pytest-{uid}-{worker}" if worker else f"pytest-{uid}"


def evidence_dir(config: pytest.Config) -> Path | None:
    """``--agentbox-evidence [DIR]``: DIR, or ``<rootdir>/results/evidence`` when given bare."""
    value = config.getoption("--agentbox-evidence", default=None)
    if value is None:
        return None
    return Path(value) if value else Path(str(config.rootpath)) / "results" / "evidence"


def harness(config: pytest.Config) -> HarnessSession:
    """The run's :class:`HarnessSession` (created on first use)."""
    if KEY not in config.stash:
        opt = config.getoption
        config.stash[KEY] = HarnessSession(
            config=config, run_label=run_label(), strict=bool(opt("--agentbox-strict")),
            allow_standins=bool(opt("--agentbox-allow-standins", default=False))
            or os.environ.get("AGENTBOX_ALLOW_STANDINS") == "1",
            preserve_debug=bool(opt("--preserve-debug")), backend_option=opt("--agentbox-backend"),
            image_option=opt("--agentbox-image"),
            kernel=Path(opt("--agentbox-kernel")) if opt("--agentbox-kernel") else None,
            state_dir=Path(opt("--agentbox-state-dir")) if opt("--agentbox-state-dir") else None,
            scale_option=opt("--agentbox-timeout-scale"), default_timeout=_default_timeout(config),
            boot=str(opt("--agentbox-boot", default="restore")),
            evidence_dir=evidence_dir(config))
        config.stash[KEY].redactor.register_env(os.environ)
    return config.stash[KEY]


def _default_timeout(config: pytest.Config) -> float:
    """``--agentbox-timeout``, else the ini ``agentbox_timeout``; a bad value is a usage error."""
    raw = config.getoption("--agentbox-timeout") or config.getini("agentbox_timeout")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"agentbox_timeout must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise pytest.UsageError(f"agentbox_timeout must be positive, got {value:g}")
    return value
