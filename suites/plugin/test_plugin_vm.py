"""The plugin's VM-backed fixtures in fresh pytester projects: real qemu boots
through agentbox_runtime.microvm.task (TCG here), artifacts of a failing test,
--preserve-debug with its ready-to-paste commands, and an interrupted run that
leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentbox_runtime.microvm.task_reaper import same_process, start_time

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def vmm_pid(output: str) -> tuple[int, str | None]:
    """The guest's VMM process an inner test printed (``VMM-PID <machine.vmm_pid> <its start time>``):
    qemu on the qemu backend, the libkrun helper on krun-direct. Guests are proved kept or gone by
    this process, never by a ``qemu`` name (real libkrun runs none)."""
    found = re.search(r"VMM-PID (\d+) (\d+)", output)
    assert found, output[-3000:]
    return int(found[1]), found[2]


def alive(vmm: tuple[int, str | None]) -> bool:
    """The recorded VMM process still runs (not a zombie, not a reused pid)."""
    pid, start = vmm
    return start is not None and same_process(pid, start)


def qemu_backend_processes(path: Path | str) -> list[str]:
    """qemu processes whose command line mentions ``path``: only for tests pinned to the qemu backend
    (``--agentbox-backend qemu``), where the VMM is qemu by definition."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("qemu-system") and str(path) in cmd:
            out.append(f"{proc.name} {cmd[:200]}")
    return out


def mounts_under(path: Path) -> list[str]:
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(path))]


def test_microvm_verbs_artifacts_and_preserve_debug(pytester: pytest.Pytester, vm_backend: str) -> None:
    pytester.makepyfile(test_guest='''
        import os
        from agentbox_runtime.microvm.task_reaper import start_time

        def test_guest(microvm, tmp_path):
            print(f"VMM-PID {microvm.vmm_pid} {start_time(microvm.vmm_pid)}", flush=True)
            assert microvm.succeed("id -un", timeout=60) == "dev\\n"
            assert microvm.succeed("id -un", timeout=60, user="root") == "root\\n"
            src = tmp_path / "in.txt"
            src.write_text("payload")
            microvm.copy_to(src, "/home/dev/sub/in.txt")
            assert microvm.succeed("stat -c %U /home/dev/sub/in.txt; cat /home/dev/sub/in.txt",
                                   timeout=60) == "dev\\npayload"
            big = tmp_path / "big.bin"
            big.write_bytes(os.urandom(1 << 20) * 24)  # 24 MiB: several chunks, over the old output caps
            microvm.copy_to(big, "/home/dev/big.bin", timeout=600)
            microvm.copy_from("/home/dev/big.bin", tmp_path / "back.bin", timeout=600)
            assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
            microvm.copy_from("/etc/os-release", tmp_path / "os-release")
            assert "ID=debian" in (tmp_path / "os-release").read_text()
            microvm.succeed("setsid -f sh -c 'sleep 2; touch /tmp/later'", timeout=60, user="root")
            microvm.wait_for_file("/tmp/later", timeout=60)
            microvm.fail("test -e /no/such/file", timeout=60)
            assert microvm.execute("exit 7", timeout=60).exit_status == 7
            assert microvm.console.log.is_file()
            # kernel messages reach the console log (krun-direct: through libkrun's logger, as upstream)
            microvm.succeed("echo '<2>agentbox-console-probe' > /dev/kmsg", timeout=60, user="root")
            microvm.console.wait_for_text("agentbox-console-probe", timeout=60)
            shell = microvm.shell(timeout=60)  # qemu: the hvc0 console; krun-direct: a guest pty
            shell.sendline("tty; id -un")
            shell.expect(r"/dev/(hvc0|pts/[0-9]+)\\r?\\ndev")
            shell.close()
            assert microvm.profile["verbs"]["succeed"]["count"] >= 4
            assert False, "deliberate failure after the checks"
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--agentbox-backend", vm_backend,
                                           "--preserve-debug", timeout=1800)
    result.assert_outcomes(failed=1)
    assert "deliberate failure after the checks" in result.stdout.str()
    kept = pytester.path / "results" / "artifacts" / "test_guest.py_test_guest"
    names = {p.name for p in kept.iterdir()}
    assert {"vm-transcript.json", "vm-profile.json", "outcome.json", "doctor.json"} <= names
    assert any(n.endswith("-console.log") for n in names) and any(n.endswith("-launch.conf") for n in names)
    out = result.stdout.str()
    assert "agentbox: preserved debug state" in out
    task_dir = Path(re.search(r"console log:\s+less (\S+)/console.log", out).group(1))  # type: ignore[union-attr]
    assert (task_dir / "launch.conf").is_file(), "the task state is kept"
    # kept running for `agentbox attach` (krun-direct: through libkrun's vsock bridge); `agentbox rm`
    # stops it and deletes the state
    gid = re.search(r"agentbox rm ((?:qemu|krun-direct)-[0-9a-f]+)", out)
    assert gid, out
    assert gid[1].startswith("qemu" if vm_backend == "qemu" else "krun-direct")
    vmm = vmm_pid(out)
    assert alive(vmm), "the failed test's guest is kept running"
    try:
        in_attached_shell(gid[1], dict(os.environ), "echo $(id -un) in $(pwd)", "dev in /workspace")
    finally:
        assert agentbox_cli("rm", gid[1]).returncode == 0
    assert not alive(vmm)
    assert not task_dir.exists() and not mounts_under(pytester.path)


def test_interrupted_vm_run_leaves_no_leaks(pytester: pytest.Pytester, vm_backend: str) -> None:
    pytester.makepyfile(test_int='''
        from agentbox_runtime.microvm.task_reaper import start_time

        def test_interrupted(microvm):
            microvm.succeed("true", timeout=60)
            print(f"VMM-PID {microvm.vmm_pid} {start_time(microvm.vmm_pid)}", flush=True)
            raise KeyboardInterrupt
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "--agentbox-backend", vm_backend,
                                           "--agentbox-strict", timeout=1800)
    assert result.ret == pytest.ExitCode.INTERRUPTED, result.stdout.str()
    assert "leaked resources" not in result.stdout.str()
    assert not alive(vmm_pid(result.stdout.str())), "the interrupted run's VMM is gone"
    assert not mounts_under(pytester.path)
    assert not list(pytester.path.glob("**/microvm-tasks/*"))


def test_killed_vm_run_is_reaped_by_the_next_run(pytester: pytest.Pytester, vm_backend: str) -> None:
    pytester.makepyfile(test_die='''
        import os, signal
        from agentbox_runtime.microvm.task_reaper import start_time

        def test_killed(microvm):
            microvm.succeed("true", timeout=60)
            print(f"BOOTED VMM-PID {microvm.vmm_pid} {start_time(microvm.vmm_pid)}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    ''')
    killed = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "--agentbox-backend", vm_backend,
                                           timeout=1800)
    assert killed.ret == -9 and "BOOTED" in killed.stdout.str()
    vmm = vmm_pid(killed.stdout.str())
    assert list(pytester.path.glob("**/microvm-tasks/*")), "the killed run left its task dir"
    pytester.makepyfile(test_die="def test_nothing():\n    pass\n")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert not alive(vmm), "the next run reaped the killed run's VMM"
    assert not mounts_under(pytester.path)
    assert not list(pytester.path.glob("**/microvm-tasks/*"))


def test_shared_microvm_boots_once_per_module_and_resets_between_tests(pytester: pytest.Pytester,
                                                                       vm_backend: str) -> None:
    pytester.makepyfile(test_shared='''
        BOOT = []

        def test_first(shared_microvm, shared_workspace):
            BOOT.append(shared_microvm.succeed("cat /run/agentbox/instance-id", timeout=60))
            shared_microvm.succeed("setsid -f sleep 600; echo x > /tmp/left; echo y > /workspace/left",
                                   timeout=60)
            assert (shared_workspace.path / "left").exists()

        def test_second(shared_microvm, shared_workspace):
            assert shared_microvm.succeed("cat /run/agentbox/instance-id", timeout=60) == BOOT[0]
            assert shared_microvm.fail("pgrep -u dev -x sleep", timeout=60)
            assert shared_microvm.fail("test -e /tmp/left", timeout=60)
            assert not (shared_workspace.path / "left").exists()
            shared_microvm.succeed("nix-store --version", timeout=60)
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--agentbox-backend", vm_backend,
                                           "--agentbox-strict", timeout=1800)
    result.assert_outcomes(passed=2)
    assert "leaked resources" not in result.stdout.str()


def test_wait_ready_reports_what_is_missing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_ready='''
        import pytest
        from agentbox_harness import MachineError

        def test_ready(microvm_factory):
            ok = microvm_factory("ok")
            status = ok.wait_ready()
            assert status.ready and status.missing == () and status.parts["nix"] == "ready"
            ok.ready_checks["marker"] = "test -e /tmp/marker"
            assert ok.ready_status().missing == ("marker: test -e /tmp/marker exited 1",)
            ok.succeed("touch /tmp/marker")
            assert ok.wait_ready().ready

        def test_blocked_nix(microvm_factory):
            blocked = microvm_factory("blocked", extra_env=("AGENTBOX_LIBKRUN_NIX_DISK_LABEL=NO_SUCH_DISK",
                                                            "AGENTBOX_LIBKRUN_NIX_DISK_ID=no-such-disk"))
            with pytest.raises(MachineError, match="not ready: nix: failed"):
                blocked.wait_ready(timeout=30)
            status = blocked.ready_status()
            assert not status.ready and status.missing[0].startswith("nix: failed")
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--agentbox-backend", "qemu", timeout=1800)
    result.assert_outcomes(passed=2)


def container_vmm_pids(names: set[str]) -> dict[str, tuple[int, str | None]]:
    """The running process of each named container (with its start time): the VM itself under crun
    with libkrun, the stand-in runtime's shim here. Never found by a ``qemu`` name."""
    pids = {}
    for name in names:
        out = subprocess.run(["podman", "inspect", "--format", "{{.State.Pid}}", name], capture_output=True,
                             text=True, timeout=120).stdout.strip()
        if out.isdigit() and int(out) > 0:
            pids[name] = (int(out), start_time(int(out)))
    return pids


def harness_containers() -> set[str]:
    out = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}", "--filter",
                          "label=io.agentbox.harness.run"], capture_output=True, text=True, timeout=120).stdout
    return set(out.split())


def test_a_harness_killed_during_a_libkrun_mode_boot_is_reaped_by_the_next_run(pytester: pytest.Pytester) -> None:
    """SIGKILL of the harness while a krun-podman guest boots leaves the container and its QEMU
    running; the next run's reaper removes both."""
    if os.geteuid() != 0:
        pytest.skip("krun-podman through agentbox-krun-runtime needs root here")
    pytester.makepyfile(test_boot='''
        def test_boot(krun_task_factory):
            krun_task_factory("t")
    ''')
    before = harness_containers()
    child = pytester.popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", "test_boot.py"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    vmms: dict[str, tuple[int, str | None]] = {}
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not vmms:
            assert child.poll() is None, "the harness run ended before its krun guest started booting"
            vmms = container_vmm_pids(harness_containers() - before)
            time.sleep(0.2)
        assert vmms, "no krun guest started booting within 600 s"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(60)
    time.sleep(2)
    assert harness_containers() - before, "the container went away with the killed harness: nothing to reap"
    pytester.makepyfile(test_boot="def test_nothing():\n    pass\n")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert not harness_containers() - before
    deadline = time.monotonic() + 30
    while any(alive(vmm) for vmm in vmms.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(alive(vmm) for vmm in vmms.values())


def agentbox_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2], env=env)


def in_attached_shell(gid: str, env: dict[str, str], command: str, expected: str, root: bool = False) -> None:
    """``agentbox attach <gid> [--root]`` driven with pexpect: wait for the prompt, run ``command``,
    expect ``expected``, exit."""
    import pexpect

    shell = pexpect.spawn(sys.executable, ["-m", "agentbox_runtime.cli", "attach", gid, *(["--root"] if root else [])],
                          env=env, timeout=120, encoding="utf-8", codec_errors="replace",
                          cwd=str(Path(__file__).resolve().parents[2]))
    try:
        shell.expect(r"root@.*# " if root else r"dev@.*\$ ")  # typed-ahead input could be dropped before it
        shell.sendline(command)
        shell.expect(expected)
        shell.sendline("exit")
        shell.expect(pexpect.EOF)
    finally:
        shell.close(force=True)


def test_a_failed_test_under_preserve_debug_leaves_a_live_guest_to_attach_to(pytester: pytest.Pytester,
                                                                            tmp_path: Path) -> None:
    """--preserve-debug keeps a failed test's qemu guest running; `agentbox ps` lists it, `agentbox attach`
    (driven with pexpect) gets a shell in it, a later run's reaper leaves it alone, `agentbox rm` removes it."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    pytester.makepyfile(test_kept='''
        def test_kept(microvm):
            microvm.succeed("echo left-by-the-test > /tmp/marker")
            assert False, "fail on purpose"
    ''')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_STATE_HOME", env["XDG_STATE_HOME"])
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--agentbox-backend", "qemu",
                                               "--preserve-debug", timeout=1800)
        result.assert_outcomes(failed=1)
        out = result.stdout.str()
        guest_id = re.search(r"agentbox attach (qemu-[0-9a-f]+)", out)
        assert guest_id, out
        gid = guest_id[1]
        try:
            assert f"agentbox rm {gid}" in out
            listed = agentbox_cli("ps", env=env)
            assert gid in listed.stdout and "preserved" in listed.stdout, listed.stdout
            # a later run reaps what dead runs left, but not a preserved guest
            pytester.makepyfile(test_kept="def test_nothing():\n    pass\n")
            pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_kept.py").assert_outcomes(passed=1)
            assert "preserved" in agentbox_cli("ps", env=env).stdout
            in_attached_shell(gid, env, "echo $(cat /tmp/marker) as $(id -un)", "left-by-the-test as dev")
        except BaseException:
            agentbox_cli("rm", gid, env=env)  # a failed check must not leave a preserved guest running
            raise
        removed = agentbox_cli("rm", gid, env=env)
        assert removed.returncode == 0, removed.stderr
        assert gid not in agentbox_cli("ps", env=env).stdout
        assert not qemu_backend_processes(pytester.path)
        assert not mounts_under(pytester.path)


def test_a_failed_krun_podman_task_under_preserve_debug_can_be_attached_to(pytester: pytest.Pytester,
                                                                            tmp_path: Path) -> None:
    """krun-podman: the agent lingers after the harness went away, `agentbox attach` reaches it on its
    token-guarded published port (as dev and as root), and `agentbox rm` removes the container."""
    if os.geteuid() != 0:
        pytest.skip("krun-podman through agentbox-krun-runtime needs root here")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    pytester.makepyfile(test_kept='''
        def test_kept(krun_task):
            krun_task.succeed("echo left-in-krun > /tmp/marker")
            assert False, "fail on purpose"
    ''')
    before = harness_containers()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_STATE_HOME", env["XDG_STATE_HOME"])
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--preserve-debug", timeout=1800)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    guest_id = re.search(r"agentbox attach (krun-podman-[0-9a-f]+)", out)
    assert guest_id, out
    gid = guest_id[1]
    try:
        kept = container_vmm_pids(harness_containers() - before)
        assert kept, "the failed test's krun task is kept running"
        listed = agentbox_cli("ps", env=env)
        assert gid in listed.stdout and "preserved" in listed.stdout, listed.stdout
        in_attached_shell(gid, env, "echo $(cat /tmp/marker) as $(id -un)", "left-in-krun as dev")
        in_attached_shell(gid, env, "id -un", "root", root=True)
    except BaseException:
        agentbox_cli("rm", gid, env=env)
        raise
    removed = agentbox_cli("rm", gid, env=env)
    assert removed.returncode == 0, removed.stderr
    assert gid not in agentbox_cli("ps", env=env).stdout
    assert not harness_containers() - before
    assert not any(alive(vmm) for vmm in kept.values())


def test_pytest_pdb_at_a_failure_leaves_the_guest_reachable_with_agentbox_attach(pytester: pytest.Pytester,
                                                                                  tmp_path: Path) -> None:
    import pexpect

    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    pytester.makepyfile(test_pdb='''
        def test_pdb(microvm):
            microvm.succeed("echo seen-from-pdb > /tmp/marker")
            assert False, "stop here"
    ''')
    run = pexpect.spawn(sys.executable, ["-m", "pytest", "-p", "no:cacheprovider", "--agentbox-backend", "qemu",
                                         "--pdb", "test_pdb.py"], env=env, cwd=str(pytester.path), timeout=900,
                        encoding="utf-8", codec_errors="replace")
    try:
        run.expect(r"agentbox attach (qemu-[0-9a-f]+)")
        gid = run.match[1]
        run.expect(r"\(Pdb\)")
        in_attached_shell(gid, env, "cat /tmp/marker", "seen-from-pdb")
        run.sendline("c")
        run.expect(pexpect.EOF)
    finally:
        run.close(force=True)
    assert not qemu_backend_processes(pytester.path)


def test_preserve_debug_keeps_only_what_failed(pytester: pytest.Pytester) -> None:
    """Under --preserve-debug a passing test's guest, task rootfs mount and task dir go as they do
    without the flag; only the failing test's are kept (issue 26: they leaked, and pytest's tmp
    clean-up then failed with EBUSY)."""
    pytester.makepyfile(test_mixed='''
        def test_passes(microvm):
            microvm.succeed("true", timeout=60)

        def test_fails(microvm):
            microvm.succeed("true", timeout=60)
            assert False, "fail on purpose"
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--agentbox-backend", "qemu",
                                           "--preserve-debug", timeout=1800)
    result.assert_outcomes(passed=1, failed=1)
    gid = re.search(r"agentbox rm (qemu-[0-9a-f]+)", result.stdout.str())
    assert gid, result.stdout.str()[-3000:]
    try:
        mounts = mounts_under(pytester.path)
        tasks = [str(p) for p in pytester.path.glob("**/microvm-tasks/*")]
        assert not [m for m in mounts if "test_passes" in m], mounts
        assert not [t for t in tasks if "test_passes" in t], tasks
        assert [t for t in tasks if "test_fails" in t], f"the failing test's task dir is kept: {tasks}"
    finally:
        assert agentbox_cli("rm", gid[1]).returncode == 0
    assert not mounts_under(pytester.path)
