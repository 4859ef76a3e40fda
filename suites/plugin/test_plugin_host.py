"""The plugin in fresh pytester projects, with machines on the ``host`` backend
(real subprocess transport, no guest): verbs, waits, factories, artifacts,
capability skips, strict mode, leak report and reaping, Allure, xdist."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from suites.plugin.host_backend import install

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def artifact_dirs(root: Path) -> dict[str, Path]:
    base = root / "results" / "artifacts"
    return {p.name: p for p in base.iterdir()} if base.is_dir() else {}


def test_options_and_markers_are_registered(pytester: pytest.Pytester) -> None:
    help_out = pytester.runpytest("--help").stdout.str()
    for option in ("--agentbox-backend", "--agentbox-image", "--agentbox-kernel", "--agentbox-state-dir",
                   "--preserve-debug", "--agentbox-strict", "--agentbox-timeout-scale"):
        assert option in help_out
    markers = pytester.runpytest("--markers").stdout.str()
    for marker in ("vm:", "needs_kvm:", "needs_libkrun:", "needs_root:", "destructive:", "slow:"):
        assert f"@pytest.mark.{marker}" in markers


def test_verbs_waits_and_errors(pytester: pytest.Pytester) -> None:
    install(pytester.path)
    pytester.makepyfile(test_verbs='''
        import pytest, threading, time
        from agentbox_harness.machine import MachineError

        def test_verbs(machine_factory, tmp_path):
            m = machine_factory("h")
            assert m.succeed("echo hi", timeout=10) == "hi\\n"
            assert m.succeed(["printf", "%s", "a b"], timeout=10) == "a b"
            r = m.execute("echo out; echo err >&2; exit 3", timeout=10)
            assert (r.exit_status, r.stdout, r.stderr, r.ok) == (3, "out\\n", "err\\n", False)
            m.fail("exit 1", timeout=10)
            with pytest.raises(MachineError) as exc:
                m.succeed("echo visible-out; echo visible-err >&2; exit 7", timeout=10)
            text = str(exc.value)
            assert "exit status 7" in text and "visible-out" in text and "visible-err" in text
            assert "console tail:" in text and "ready" in text
            with pytest.raises(MachineError):
                m.fail("true", timeout=10)
            flag = tmp_path / "flag"
            threading.Timer(1.0, flag.touch).start()
            m.wait_for_file(str(flag), timeout=20)
            threading.Timer(1.0, flag.unlink).start()
            m.wait_until_fails(["test", "-e", str(flag)], timeout=20)
            with pytest.raises(MachineError) as exc:
                m.wait_until_succeeds("echo still-waiting; false", timeout=2)
            assert "timed out after 2.0s" in str(exc.value) and "still-waiting" in str(exc.value)
            r = m.execute("sleep 5", timeout=0.5)
            assert r.timed_out and not r.ok
            src = tmp_path / "src.bin"
            src.write_bytes(bytes(range(256)))
            m.copy_from(str(src), tmp_path / "back.bin")
            assert (tmp_path / "back.bin").read_bytes() == bytes(range(256))
            assert m.console.wait_for_text("rea.y", timeout=5) == "ready"
            assert m.console.log.name == "h-host-console.log"
            verbs = m.profile["verbs"]
            assert verbs["succeed"]["count"] == 3 and verbs["wait_for_file"]["count"] == 1
            assert m.profile["phases"]["boot_s"] >= 0

        def test_timeout_scale(machine_factory):
            m = machine_factory("slow", scale=4.0)
            r = m.execute("sleep 1", timeout=0.5)  # 0.5 s scaled to 2 s
            assert r.ok, r
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_timeouts_are_optional_with_a_default_from_option_or_ini(pytester: pytest.Pytester) -> None:
    install(pytester.path)
    pytester.makepyfile(test_defaults='''
        def test_no_timeout_needed(machine_factory):
            m = machine_factory("d")
            assert m.succeed("echo hi") == "hi\\n"
            m.wait_until_succeeds("true")
            m.wait_for_file("/")

        def test_default_applies(machine_factory):
            m = machine_factory("d", scale=1.0)
            assert m.execute("sleep 3").timed_out
            assert not m.execute("sleep 3", timeout=30).timed_out  # an explicit value still wins
    ''')
    pytester.makeini("[pytest]\nagentbox_timeout = 1\n")
    pytester.runpytest("-p", "no:cacheprovider", "-k", "no_timeout_needed").assert_outcomes(passed=1)
    pytester.runpytest("-p", "no:cacheprovider", "-k", "default_applies").assert_outcomes(passed=1)
    pytester.runpytest("-p", "no:cacheprovider", "-k", "default_applies", "--agentbox-timeout", "60"
                       ).assert_outcomes(failed=1)
    bad = pytester.runpytest("-p", "no:cacheprovider", "--agentbox-timeout", "-1")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*agentbox_timeout must be positive, got -1*"])


def test_failing_test_keeps_artifacts_passing_test_removes_them(pytester: pytest.Pytester) -> None:
    install(pytester.path)
    pytester.makepyfile(test_art='''
        def test_ok(machine_factory):
            machine_factory("a").succeed("true", timeout=10)

        def test_bad(machine_factory):
            m = machine_factory("b")
            m.succeed("echo seen", timeout=10)
            assert False, "deliberate"
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    dirs = artifact_dirs(pytester.path)
    assert list(dirs) == ["test_art.py_test_bad"]
    kept = dirs["test_art.py_test_bad"]
    names = sorted(p.name for p in kept.iterdir())
    assert {"b-transcript.json", "b-profile.json", "outcome.json", "doctor.json", "b-host-console.log"} <= set(names)
    transcript = json.loads((kept / "b-transcript.json").read_text())
    assert transcript[0]["command"] == "echo seen" and transcript[0]["exit_status"] == 0
    assert len(transcript[0]["stdout_sha256"]) == 64 and "duration_s" in transcript[0]
    assert json.loads((kept / "outcome.json").read_text())["phases"]["call"] == "failed"
    assert any(c["name"] == "qemu" for c in json.loads((kept / "doctor.json").read_text()))
    timings = {p.name for p in (pytester.path / "results" / "timings").iterdir()}
    assert timings == {"test_art.py_test_ok.json", "test_art.py_test_bad.json"}


def test_preserve_debug_keeps_artifacts_and_refuses_xdist(pytester: pytest.Pytester) -> None:
    install(pytester.path)
    pytester.makepyfile(test_keep='''
        def test_ok(machine_factory):
            machine_factory("a").succeed("true", timeout=10)
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider", "--preserve-debug")
    result.assert_outcomes(passed=1)
    assert list(artifact_dirs(pytester.path)) == ["test_keep.py_test_ok"]
    refused = pytester.runpytest("-p", "no:cacheprovider", "--preserve-debug", "-n", "2")
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    refused.stderr.fnmatch_lines(["*--preserve-debug*cannot run under xdist*drop -n*"])


def test_teardown_reaches_every_machine_and_reports_each_error(pytester: pytest.Pytester) -> None:
    install(pytester.path)
    pytester.makepyfile(test_td='''
        import pytest
        STOPPED = []

        @pytest.fixture(autouse=True)
        def broken_stop(monkeypatch):
            from conftest import HostMachine
            def stop(self, timeout):
                STOPPED.append(self.name)
                if self.name != "ok":
                    raise RuntimeError(f"cannot stop {self.name}")
            monkeypatch.setattr(HostMachine, "_stop", stop)

        def test_three(machine_factory):
            for name in ("first", "ok", "last"):
                machine_factory(name)

        def test_order():
            assert STOPPED == ["last", "ok", "first"]
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*machine teardown failed: last: shutdown: cannot stop last; "
                                 "first: shutdown: cannot stop first*"])


def test_missing_capability_skips_then_fails_under_strict(pytester: pytest.Pytester,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTBOX_LIBKRUN_LIBRARY", str(pytester.path / "no-such" / "libkrun.so.1"))
    pytester.makepyfile(test_caps='''
        import pytest

        @pytest.mark.needs_libkrun
        def test_marked():
            pass

        @pytest.mark.vm
        def test_vm_on_krun_direct(microvm):
            pass
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs", "--agentbox-backend", "krun-direct")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*missing capability: libkrun: *no-such/libkrun.so.1*(fix: *",
                                 "*missing capability: backend krun-direct unavailable: libkrun: *"])
    strict = pytester.runpytest("-p", "no:cacheprovider", "--agentbox-backend", "krun-direct",
                                "--agentbox-strict")
    strict.assert_outcomes(errors=2)  # a missing capability fails the setup phase
    strict.stdout.fnmatch_lines(["*missing capability (--agentbox-strict): libkrun: *"])


def test_strict_counts_a_krun_stand_in_only_when_allowed(pytester: pytest.Pytester,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 24 item 7: a strict krun-podman run on a host whose crun lacks libkrun would run through
    agentbox-krun-runtime; it fails instead of passing without touching crun+libkrun, unless the
    stand-in is allowed on purpose. The header says which ran either way."""
    from agentbox_runtime.doctor import run_checks, standin_in_use

    if standin_in_use("krun-podman", run_checks()) is None:
        pytest.skip("krun-podman here is crun with libkrun, or cannot run at all: no stand-in to count")
    monkeypatch.delenv("AGENTBOX_ALLOW_STANDINS", raising=False)
    pytester.makepyfile(test_krun="""
        import pytest

        @pytest.mark.vm
        def test_on_krun_podman():
            pass
    """)
    strict = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--agentbox-backend", "krun-podman",
                                           "--agentbox-strict")
    strict.assert_outcomes(errors=1)
    strict.stdout.fnmatch_lines(["*krun-podman runs through agentbox-krun-runtime*--agentbox-strict: its tests fail*",
                                 "*missing capability (--agentbox-strict): backend krun-podman would run through "
                                 "agentbox-krun-runtime*--agentbox-allow-standins*"])
    allowed = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--agentbox-backend", "krun-podman",
                                            "--agentbox-strict", "--agentbox-allow-standins")
    allowed.assert_outcomes(passed=1)
    allowed.stdout.fnmatch_lines(["*agentbox: krun-podman runs through agentbox-krun-runtime (the QEMU stand-in)*"])


def test_workspace_modes_and_isolated_state(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_ws='''
        import pytest
        ROOTS = []

        def test_direct(workspace):
            assert workspace.mode == "direct" and workspace.path == workspace.source
            assert workspace.slug == "project"
            ROOTS.append(workspace.state.state_root)

        def test_isolated(workspace):
            ROOTS.append(workspace.state.state_root)
            assert ROOTS[0] != ROOTS[1]

        @pytest.mark.parametrize("workspace", ["copy"], indirect=True)
        def test_copy(workspace):
            (workspace.path / "f").write_text("guest")
            assert workspace.path != workspace.source and not (workspace.source / "f").exists()

        @pytest.mark.parametrize("workspace", ["overlay-review"], indirect=True)
        def test_overlay_review(workspace):
            (workspace.path / "new").write_text("guest")
            assert workspace.changes() == ["new"] and not (workspace.source / "new").exists()
            workspace.apply()
            assert (workspace.source / "new").read_text() == "guest"
            (workspace.path / "later").write_text("x")
            workspace.discard()
            assert workspace.changes() == [] and not (workspace.path / "later").exists()

        @pytest.mark.parametrize("workspace", ["bogus"], indirect=True)
        def test_bad_mode(workspace):
            pass
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["*workspace mode 'bogus' is not one of direct, copy, overlay-review*"])


@pytest.fixture
def private_registry(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run registries of the inner runs in a private cache, so no concurrent run reaps them."""
    cache = pytester.path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache / "agentbox" / "harness-runs"


def printed(result: pytest.RunResult, tag: str) -> str:
    """The path an inner test printed after ``tag``."""
    return re.search(rf"{tag} (\S+)", result.stdout.str()).group(1)  # type: ignore[union-attr]


def _mounted(path_part: str) -> list[str]:
    return [line for line in Path("/proc/self/mounts").read_text().splitlines() if path_part in line]


@pytest.mark.needs_root
def test_killed_run_is_reaped_by_the_next_run(pytester: pytest.Pytester, private_registry: Path) -> None:
    pytester.makepyfile(test_die='''
        import os, signal
        import pytest

        @pytest.mark.parametrize("workspace", ["overlay-review"], indirect=True)
        def test_killed(workspace):
            print("MOUNT", workspace.path, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    ''')
    killed = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    assert killed.ret == -signal.SIGKILL
    mount = printed(killed, "MOUNT")
    try:
        assert _mounted(mount), "the killed run left its overlay mounted"
        pytester.makepyfile(test_die="def test_nothing():\n    pass\n")
        nxt = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        nxt.assert_outcomes(passed=1)
        nxt.stdout.fnmatch_lines(["*agentbox: reaped what a dead run left*", f"mount {mount}*"])
        assert not _mounted(mount)
        assert list(private_registry.iterdir()) == [], "the reaped registry and the clean run's are gone"
    finally:
        subprocess.run(["umount", "-l", mount], capture_output=True)


@pytest.mark.needs_root
def test_leaks_are_reported_and_fail_under_strict(pytester: pytest.Pytester, private_registry: Path) -> None:
    pytester.makepyfile(test_leak='''
        import subprocess

        def test_leaky(workspace, tmp_path):
            (tmp_path / "leak").mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "leak", str(tmp_path / "leak")], check=True)
            print("LEAK", tmp_path / "leak")
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "--agentbox-strict")
    leak = printed(result, "LEAK")
    try:
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.stdout.fnmatch_lines(["*agentbox: leaked resources*", f"mount {leak}",
                                     "--agentbox-strict: leaks fail the run"])
    finally:
        subprocess.run(["umount", leak], capture_output=True)


@pytest.mark.needs_root
def test_interrupted_run_leaves_no_leaks(pytester: pytest.Pytester, private_registry: Path) -> None:
    pytester.makepyfile(test_int='''
        import pytest

        @pytest.mark.parametrize("workspace", ["overlay-review"], indirect=True)
        def test_interrupted(workspace):
            print("MOUNT", workspace.path, flush=True)
            raise KeyboardInterrupt
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "--agentbox-strict")
    mount = printed(result, "MOUNT")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert not _mounted(mount)
    assert "leaked resources" not in result.stdout.str()
    assert list(private_registry.iterdir()) == []


def test_xdist_gives_the_same_results_with_unique_state(pytester: pytest.Pytester,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    install(pytester.path)
    pytester.makepyfile(test_par='''
        import os
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_many(n, machine_factory, workspace, agentbox_session, tmp_path):
            m = machine_factory(f"m{n}")
            assert m.succeed(["echo", str(n)], timeout=10) == f"{n}\\n"
            line = f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')} {agentbox_session.run_label} {workspace.state.state_root}\\n"
            with open(os.environ["RECORD"], "a") as f:
                f.write(line)
            assert n != 5, "one deliberate failure"
    ''')
    outcomes = {}
    for args in ([], ["-n", "2"]):
        record = pytester.path / f"record{len(args)}"
        monkeypatch.setenv("RECORD", str(record))
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
        outcomes[len(args)] = result.parseoutcomes()
        rows = [line.split() for line in record.read_text().splitlines()]
        assert len({r[2] for r in rows}) == 6, "every test has its own state root"
        if args:
            workers = {r[0] for r in rows}
            labels = {r[0]: r[1] for r in rows}
            assert workers == {"gw0", "gw1"} and len(set(labels.values())) == 2
            assert all(label.endswith(w) for w, label in labels.items())
    assert outcomes[0] == outcomes[2] == {"passed": 5, "failed": 1}


def test_allure_steps_attachments_and_environment(pytester: pytest.Pytester) -> None:
    pytest.importorskip("allure_pytest", reason="allure-pytest is not installed")
    install(pytester.path)
    pytester.makepyfile(test_al='''
        def test_fails(machine_factory):
            m = machine_factory("al")
            m.succeed("echo step-one", timeout=10)
            assert False
    ''')
    alluredir = pytester.path / "allure"
    result = pytester.runpytest("-p", "no:cacheprovider", f"--alluredir={alluredir}")
    result.assert_outcomes(failed=1)
    props = (alluredir / "environment.properties").read_text()
    assert "agentbox.backend=" in props and "host.kernel=" in props and "tool.qemu=" in props
    case = next(json.loads(p.read_text()) for p in alluredir.glob("*-result.json"))

    def titles(steps: list[dict[str, object]]) -> list[str]:
        out = []
        for s in steps:
            out.append(str(s["name"]))
            out += titles(s.get("steps", []))  # type: ignore[arg-type]
        return out

    assert "al: succeed echo step-one" in titles(case.get("steps", []))
    names = {a["name"] for a in case.get("attachments", [])}
    for container in alluredir.glob("*-container.json"):
        for fixture in json.loads(container.read_text()).get("afters", []):
            names |= {a["name"] for a in fixture.get("attachments", [])}
    assert {"al-transcript.json", "al-host-console.log"} <= names


def test_dimension_fixtures_take_params_and_overrides(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('''
        import pytest

        @pytest.fixture
        def vm_cpus():
            return 3
    ''')
    pytester.makepyfile(test_dims='''
        import pytest

        @pytest.mark.parametrize("vm_memory", [4], indirect=True)
        @pytest.mark.parametrize("storage_backend", ["fuse-overlay"], indirect=True)
        @pytest.mark.parametrize("agentbox_backend", ["container"], indirect=True)
        def test_params(vm_memory, storage_backend, agentbox_backend, vm_cpus):
            assert (vm_memory, storage_backend, agentbox_backend, vm_cpus) == (4, "fuse-overlay", "container", 3)

        def test_defaults(vm_memory, storage_backend):
            assert (vm_memory, storage_backend) == (2, "auto")
    ''')
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)


@pytest.mark.needs_root
def test_disk_fixtures_create_validate_inspect_reset(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_disks='''
        import os
        from agentbox_runtime.disks import Outcome

        def test_nix_disk(nix_disk, containers_disk):
            assert nix_disk.create() is Outcome.CREATED
            assert nix_disk.create() is Outcome.REUSED
            size = nix_disk.validate()
            assert size > 0 and nix_disk.path.name == "microvm-nix.raw"
            with nix_disk.inspect() as root:
                assert os.path.ismount(root)
            assert not os.path.exists(root)
            nix_disk.reset(force=True)
            assert nix_disk.validate() == size
            assert containers_disk.create() is Outcome.CREATED
            assert containers_disk.path.name == "microvm-containers.raw"
    ''')
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_krun_podman_machine_argv_and_unknown_options(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_krun='''
        import pytest
        from agentbox_harness.context import BackendContext
        from agentbox_harness.registry import build

        def test_argv(agentbox_session, workspace):
            ctx = BackendContext(agentbox_session, workspace, lambda: "localhost/agentbox:latest", 2048, 3, "auto")
            m = build("krun-podman", ctx, "task", {"memory_mib": 1536, "publish": ("8080:80",), "root": True})
            argv = m.argv
            assert argv[:3] == ["run", "--rm", "-i"] and "-it" not in argv
            assert argv[-3:] == ["localhost/agentbox:latest", "agentbox-guest-init", "agent"]
            assert "krun.ram_mib=1536" in argv and "8080:80" in argv
            assert f"io.agentbox.harness.run={agentbox_session.run_label}" in argv
            assert (workspace.state.state_root / "libkrun-nix.raw").is_file()
            assert "AGENTBOX_ENTER_AS_ROOT=1" in argv  # the agent is root; verbs pick the user per command
            from agentbox_runtime.disks import LIBKRUN_NIX
            from agentbox_runtime.resize import ResizePlan
            runner = m.resize_runner()
            resize_argv = runner.argv(ResizePlan(LIBKRUN_NIX, workspace.state.state_root / "libkrun-nix.raw", 1, 2))
            assert "localhost/agentbox:latest" in resize_argv
            assert any("libkrun-nix.raw" in a for a in resize_argv)
            with pytest.raises(TypeError, match="unknown krun-podman option.s.: bogus; accepted: cpus, "):
                build("krun-podman", ctx, "task", {"bogus": 1})
            with pytest.raises(TypeError, match="unknown krun-podman option.s.: memory; accepted: .*memory_mib"):
                build("krun-podman", ctx, "task", {"memory": 1536})  # one unit: MiB, named so
            with pytest.raises(TypeError, match="krun-podman option memory_mib must be int or None, not str '2G'"):
                build("krun-podman", ctx, "task", {"memory_mib": "2G"})
            with pytest.raises(ValueError, match="unknown agentbox backend 'nope'; known: qemu, krun-direct"):
                build("nope", ctx, "task", {})
    ''')
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_header_names_backend_accelerator_image_kernel_and_timeout_scale(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--agentbox-backend", "qemu",
                                "--agentbox-timeout-scale", "2.5")
    result.assert_outcomes(passed=1)
    result.stdout.re_match_lines([r"agentbox: backend qemu \(chosen with --agentbox-backend\)",
                                  r"agentbox: accelerator (kvm|tcg), timeout scale 2\.5, image \S+ \(.+\), "
                                  r"kernel .+"])


def test_each_verb_logs_one_info_line_with_its_exit_status_and_duration(pytester: pytest.Pytester) -> None:
    install(pytester.path)
    pytester.makepyfile(test_logged='''
        import logging

        def test_logged(machine_factory, caplog):
            m = machine_factory("box")
            with caplog.at_level(logging.INFO, logger="agentbox_harness"):
                m.succeed("echo hi")
                m.execute("exit 3")
            lines = [r.getMessage() for r in caplog.records if r.name == "agentbox_harness"]
            assert len(lines) == 2, lines
            assert lines[0].startswith("box: echo hi (as dev): exit 0 in ")
            assert lines[1].startswith("box: exit 3 (as dev): exit 3 in ")
    ''')
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_session_fixture_is_agentbox_session_and_the_old_name_still_works(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_names='''
        import pytest

        def test_names(agentbox_session, request):
            with pytest.warns(DeprecationWarning, match="now agentbox_session"):
                old = request.getfixturevalue("agentbox_harness")
            assert old is agentbox_session and agentbox_session.run_label
    ''')
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_evidence_bundles_are_kept_for_every_test_redacted_and_verifiable(pytester: pytest.Pytester,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    install(pytester.path)
    monkeypatch.setenv("DEPLOY_TOKEN", "host-env-token-6789")
    pytester.makepyfile(test_ev='''
        def test_ok(machine_factory, agentbox_session):
            agentbox_session.register_secret("registered-secret-12345")
            m = machine_factory("a")
            m.succeed("echo $API_TOKEN registered-secret-12345 host-env-token-6789", env={"API_TOKEN": "tok-in-env-42"})

        def test_bad(machine_factory):
            machine_factory("b").succeed("echo plain", timeout=10)
            assert False, "deliberate"
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider", "--agentbox-evidence")
    result.assert_outcomes(passed=1, failed=1)
    base = pytester.path / "results" / "evidence"
    bundles = {p.name: p for p in base.iterdir()}
    assert set(bundles) == {"test_ev.py_test_ok", "test_ev.py_test_bad"}
    ok = bundles["test_ev.py_test_ok"]
    everything = b"".join(p.read_bytes() for p in ok.rglob("*") if p.is_file())
    for secret in (b"tok-in-env-42", b"registered-secret-12345", b"host-env-token-6789"):
        assert secret not in everything
    (entry,) = json.loads((ok / "a-transcript.json").read_text())
    assert entry["argv"] == ["sh", "-c", "echo $API_TOKEN [REDACTED] [REDACTED]"]  # secrets in argv go too
    assert entry["user"] == "dev" and entry["exit_status"] == 0 and entry["duration_s"] >= 0
    assert entry["env"] == {"API_TOKEN": "[REDACTED]"} and len(entry["stderr_sha256"]) == 64
    assert "[REDACTED] [REDACTED] [REDACTED]" in entry["stdout_tail"]
    assert json.loads((ok / "test.json").read_text())["phases"]["call"] == "passed"
    assert "a-host-console.log" in json.loads((ok / "index.json").read_text())["files"]
    verify = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "evidence", "verify", str(ok)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and ": ok, " in verify.stdout, verify.stdout + verify.stderr
    (ok / "a-host-console.log").write_text("rewritten\n")
    tampered = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "evidence", "verify", str(ok)],
                              capture_output=True, text=True, timeout=60)
    assert tampered.returncode == 1 and tampered.stdout.strip().endswith("changed: a-host-console.log")


def test_evidence_and_allure_dirs_that_are_links_are_refused_in_one_line(pytester: pytest.Pytester,
                                                                         tmp_path: Path) -> None:
    install(pytester.path)
    pytester.makepyfile(test_ev='''
        def test_ok(machine_factory):
            machine_factory("a").succeed("true", timeout=10)
    ''')
    victim = tmp_path / "victim"
    victim.mkdir()
    (pytester.path / "ev-link").symlink_to(victim)
    result = pytester.runpytest("-p", "no:cacheprovider", f"--agentbox-evidence={pytester.path / 'ev-link'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --agentbox-evidence: refusing output directory */ev-link: it is a symlink "
                                 "(accepted: a real directory owned by uid *, or a path that does not exist yet)"])
    assert list(victim.iterdir()) == []
    base = pytester.path / "evidence"
    base.mkdir()
    (base / "test_ev.py_test_ok").symlink_to(victim)  # planted after the option was checked
    result = pytester.runpytest("-p", "no:cacheprovider", f"--agentbox-evidence={base}")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*agentbox evidence not written: refusing output directory */test_ev.py_test_ok: "
                                 "it is a symlink*"])
    assert list(victim.iterdir()) == []
