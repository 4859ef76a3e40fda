"""The Podman API path (podman-py) against real Podman: the service a session starts, the structured
reads next to what the ``podman`` CLI says, the reaper's label query, and the one-line failure.

Without ``CONTAINER_HOST`` and without a Podman socket of this user (none on the CI host; the tests
that need a started service skip where one exists), every scope here starts its own
``podman system service``.
Tests that start containers run under the shared lock (``flock /tmp/agentbox-vm.lock``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbox_guest_init.contract import LABEL_HARNESS_RUN
from agentbox_harness import run_reaper as reaper
from agentbox_runtime.container import podman_api
from agentbox_runtime.private_dir import runtime_dir
from agentbox_runtime.retry import retry
from container_test_image import build_test_image
from test_container_rootless import rootless_user  # noqa: F401  (the fixture)

TOOL_TIMEOUT_S = 120
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def own_service(monkeypatch: pytest.MonkeyPatch, podman_env: dict[str, str]) -> None:
    """No user socket to reuse: the scope must start its own service (in this test's environment)."""
    monkeypatch.delenv("CONTAINER_HOST", raising=False)
    monkeypatch.setenv("CONTAINERS_CONF", podman_env["CONTAINERS_CONF"])
    sock = podman_api.user_socket()
    if sock is not None and podman_api.answers(sock):
        pytest.skip(f"this user's Podman service answers on {sock}: sessions use it and start none")


def cli(*argv: str, env: dict[str, str], both: bool = False) -> str:
    """``podman <argv>``'s stdout (``both``: and its stderr after it); the test fails when it fails."""
    proc = subprocess.run(["podman", *argv], env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, f"podman {' '.join(argv)}: {proc.stderr.strip()[-500:]}"
    return proc.stdout + proc.stderr if both else proc.stdout


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.fixture()
def labelled(podman_env: dict[str, str]) -> Iterator[tuple[str, str, str]]:
    """A running container (run label, annotation, published port, one line on stdout and one on
    stderr) and a created one with the same run label; ``(run label, running id, created id)``."""
    label = f"pytest-api-{uuid.uuid4().hex[:10]}"
    image = build_test_image()
    running = cli("run", "-d", "--runtime", "runc", "--label", f"{LABEL_HARNESS_RUN}={label}",
                  "--annotation", "krun.disk.0.path=/tmp/api-test.raw", "--publish", "127.0.0.1::19876",
                  image, "sh", "-c", "echo to-stdout; echo to-stderr >&2; exec sleep 600", env=podman_env).strip()
    created = cli("create", "--runtime", "runc", "--label", f"{LABEL_HARNESS_RUN}={label}", image, "true",
                  env=podman_env).strip()
    try:
        yield label, running, created
    finally:
        for ref in (running, created):
            subprocess.run(["podman", "rm", "-f", "-t", "0", ref], env=podman_env, capture_output=True,
                           timeout=TOOL_TIMEOUT_S, check=False)


def python(script: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``script`` in a fresh interpreter (its own process, so its own scope and service: this
    pytest process's session scope is open around every test); the JSON it prints last."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env={**(env or os.environ),
                          "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


@pytest.mark.usefixtures("own_service")
def test_a_scope_starts_its_service_privately_and_stops_it() -> None:
    seen = python("""
        import json, os, stat
        from agentbox_runtime.container import podman_api
        with podman_api.service_scope() as conn:
            exists = podman_api.image_exists("localhost/agentbox-no-such-image:none")
            service = conn.service
            d, s = os.lstat(service.directory), os.lstat(service.socket)
            with podman_api.service_scope() as inner:  # nested: the same connection, nothing stopped at its end
                same = inner is conn
            answered = podman_api.answers(service.socket)
        print(json.dumps({"exists": exists, "dir": str(service.directory), "pid": service.proc.pid,
                          "dir_mode": stat.S_IMODE(d.st_mode), "dir_uid": d.st_uid, "is_dir": stat.S_ISDIR(d.st_mode),
                          "sock_mode": stat.S_IMODE(s.st_mode), "sock_uid": s.st_uid, "is_sock": stat.S_ISSOCK(s.st_mode),
                          "same": same, "answered_after_inner": answered}))
        """)
    assert seen["exists"] is False
    assert Path(str(seen["dir"])).parent == runtime_dir("podman-api", for_sockets=True)
    assert (seen["is_dir"], seen["dir_mode"], seen["dir_uid"]) == (True, 0o700, os.geteuid())
    assert (seen["is_sock"], seen["sock_mode"], seen["sock_uid"]) == (True, 0o600, os.geteuid())
    assert seen["same"] is True and seen["answered_after_inner"] is True
    assert gone(int(str(seen["pid"])))
    assert not Path(str(seen["dir"])).exists()


@pytest.mark.usefixtures("own_service")
def test_a_pytest_session_stops_the_service_it_started(tmp_path: Path, podman_env: dict[str, str]) -> None:
    """The plugin's session scope: a test's structured read starts the service; after the run it is gone."""
    out = tmp_path / "service.txt"
    (tmp_path / "test_reads.py").write_text(textwrap.dedent(f"""
        from agentbox_runtime.container import podman_api

        def test_read():
            assert podman_api.image_exists("localhost/agentbox-no-such-image:none") is False
            service = podman_api.connection().service
            assert podman_api.scope_open()  # the session's, not the at-exit fallback
            open({str(out)!r}, "w").write(f"{{service.proc.pid}} {{service.directory}}")
        """))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
                           str(tmp_path / "test_reads.py")], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    pid, directory = out.read_text().split(" ", 1)
    assert gone(int(pid))
    assert not Path(directory).exists()


@pytest.mark.usefixtures("own_service")
def test_structured_reads_say_what_the_cli_says(labelled: tuple[str, str, str], podman_env: dict[str, str]) -> None:
    label, running, created = labelled
    with podman_api.service_scope():
        attrs = podman_api.container_inspect(running)
        assert attrs is not None
        assert attrs["Id"] == cli("inspect", "--format", "{{.Id}}", running, env=podman_env).strip()
        assert attrs["Config"]["Labels"] == json.loads(
            cli("inspect", "--format", "{{json .Config.Labels}}", running, env=podman_env))
        assert podman_api.container_running(running) is True
        assert [attrs["State"]["ConmonPid"], attrs["State"]["Pid"]] == [int(p) for p in cli(
            "inspect", "--format", "{{.State.ConmonPid}} {{.State.Pid}}", running, env=podman_env).split()]
        assert podman_api.container_running(created) is False
        assert podman_api.container_inspect("agentbox-no-such-container") is None

        host, port = cli("port", running, "19876/tcp", env=podman_env).split()[0].rsplit(":", 1)
        assert podman_api.published_ports(running, 19876) == [(host, int(port))]

        assert sorted(podman_api.logs(running).split()) == sorted(cli("logs", running, env=podman_env,
                                                                      both=True).split()) == ["to-stderr", "to-stdout"]

        listed = {f"{c.id} {c.name}" for c in podman_api.containers({LABEL_HARNESS_RUN: label})}
        assert listed == set(cli("ps", "-a", "--filter", f"label={LABEL_HARNESS_RUN}={label}", "--format",
                                 "{{.ID}} {{.Names}}", env=podman_env).splitlines())
        assert len(listed) == 2
        assert [c.id for c in podman_api.containers({LABEL_HARNESS_RUN: label}, all_states=False)] == [running[:12]]
        assert podman_api.running_annotations()[running[:12]]["krun.disk.0.path"] == "/tmp/api-test.raw"

        image = build_test_image()
        image_attrs = podman_api.image_inspect(image)
        assert image_attrs is not None
        assert image_attrs["Id"] == cli("image", "inspect", "--format", "{{.Id}}", image, env=podman_env).strip()
        assert (image_attrs.get("Labels") or {}) == (json.loads(
            cli("image", "inspect", "--format", "{{json .Labels}}", image, env=podman_env)) or {})
        assert image in podman_api.image_tags(image.rpartition(":")[0])

        podman_api.kill(running, "KILL")  # crash(): the container dies at once
        retry(lambda _last: not podman_api.container_running(running), timeout=30, interval=0.1)
        assert cli("inspect", "--format", "{{.State.Running}}", running, env=podman_env).strip() == "false"


@pytest.mark.usefixtures("own_service")
def test_the_reaper_finds_and_removes_a_labelled_leftover(labelled: tuple[str, str, str],
                                                          podman_env: dict[str, str], tmp_path: Path) -> None:
    label, running, created = labelled
    with podman_api.service_scope():
        found = reaper.labelled_containers(label)
        assert {line.split()[0] for line in found} == {running[:12], created[:12]}
        reg = reaper.RunRegistry(tmp_path / "reg.json", label)
        assert any(line.startswith("container ") for line in reaper.leaks(reg))
        done = reaper.reap(reg)
        assert sorted(line.split()[0] for line in done) == ["container", "container"]
        assert reaper.labelled_containers(label) == []
    for ref in (running, created):
        assert subprocess.run(["podman", "container", "exists", ref], env=podman_env,
                              timeout=TOOL_TIMEOUT_S).returncode == 1


@pytest.mark.usefixtures("own_service")
def test_a_service_that_stops_answering_gives_one_line() -> None:
    seen = python("""
        import json, os, signal
        from agentbox_runtime.container import podman_api
        with podman_api.service_scope() as conn:
            podman_api.image_exists("localhost/agentbox-no-such-image:none")
            os.kill(conn.service.proc.pid, signal.SIGKILL)
            conn.service.proc.wait(30)
            try:
                podman_api.containers({"io.agentbox.harness.run": "x"})
            except podman_api.PodmanApiError as exc:
                print(json.dumps({"error": str(exc), "sock": str(conn.service.socket)}))
        """)
    text = str(seen["error"])
    assert "\n" not in text
    assert text.startswith("podman API: listing containers labelled label=io.agentbox.harness.run=x failed: ")
    assert text.endswith(f"(service {seen['sock']})")


@pytest.mark.usefixtures("own_service")
def test_no_podman_gives_one_line(tmp_path: Path) -> None:
    seen = python("""
        import json
        from agentbox_runtime.container import podman_api
        with podman_api.service_scope():
            try:
                podman_api.image_exists("localhost/agentbox:latest")
            except podman_api.PodmanApiError as exc:
                print(json.dumps({"error": str(exc)}))
        """, env={**os.environ, "PATH": str(tmp_path)})
    assert seen["error"] == ("podman API: starting 'podman system service' failed: podman is not installed "
                             "or not available on PATH")


def test_a_container_host_that_does_not_answer_gives_one_line(tmp_path: Path) -> None:
    """``CONTAINER_HOST`` makes the CLI a client of that service too: no private service replaces it."""
    host = f"unix://{tmp_path}/no-such.sock"
    seen = python("""
        import json
        from agentbox_runtime.container import podman_api
        with podman_api.service_scope() as conn:
            try:
                podman_api.containers()
            except podman_api.PodmanApiError as exc:
                print(json.dumps({"error": str(exc), "started": conn.service is not None}))
        """, env={**os.environ, "CONTAINER_HOST": host})
    assert seen == {"error": f"podman API: CONTAINER_HOST={host} does not answer (accepted: unix://<socket of ours> "
                             "of a running 'podman system service', or CONTAINER_HOST unset)", "started": False}


ROOTLESS_SCRIPT = """
import json, os, stat
from agentbox_runtime.container import podman_api
with podman_api.service_scope() as conn:
    rootless = podman_api.info()["host"]["security"]["rootless"]
    service = conn.service
    d, s = os.lstat(service.directory), os.lstat(service.socket)
print(json.dumps({"rootless": rootless, "pid": service.proc.pid, "dir": str(service.directory),
                  "dir_mode": stat.S_IMODE(d.st_mode), "dir_uid": d.st_uid, "sock_mode": stat.S_IMODE(s.st_mode),
                  "uid": os.geteuid(), "dir_after": service.directory.exists()}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("runuser") is None,
                    reason="creating a rootless test user needs root, useradd and runuser")
@pytest.mark.usefixtures("podman_env")
def test_a_rootless_user_gets_its_own_private_service(rootless_user: str) -> None:  # noqa: F811  (the fixture)
    home = Path(f"/home/{rootless_user}")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["runuser", "-u", rootless_user, "--", sys.executable, "-c", ROOTLESS_SCRIPT], env=env,
                          cwd=home, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0 and "newuidmap" in proc.stderr + proc.stdout:
        pytest.skip(f"rootless podman refused here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen["rootless"] is True and seen["uid"] != 0
    assert seen["dir"].startswith(f"{home}/.cache/agentbox/run/podman-api/")
    assert (seen["dir_mode"], seen["dir_uid"], seen["sock_mode"]) == (0o700, seen["uid"], 0o600)
    assert seen["dir_after"] is False
    assert gone(int(seen["pid"]))


@pytest.mark.usefixtures("own_service")
def test_an_agentbox_command_stops_the_service_it_started() -> None:
    """``agentbox doctor`` reads ``podman info`` and the guest image through the API: its service lives
    in ``podman-api/<the command's pid>`` and is gone, with its dir, when the command has ended."""
    proc = subprocess.Popen([str(Path(sys.executable).parent / "agentbox"), "doctor", "--no-probe", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ,
                                                                                           "PYTHONPATH": str(REPO)})
    out, err = proc.communicate(timeout=300)
    checks = {c["name"]: c for c in json.loads(out)["checks"]} if out.strip().startswith("{") else {}
    assert checks.get("podman", {}).get("status") == "ok", out[-2000:] + err[-2000:]
    directory = runtime_dir("podman-api", for_sockets=True) / str(proc.pid)
    assert not directory.exists()
    assert not [c for c in cmdlines() if str(directory).encode() in c]


def cmdlines() -> list[bytes]:
    """The command lines of the processes on this host now."""
    out = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            out.append(path.read_bytes())
    return out


def test_a_missing_image_or_container_reads_as_none_after_podman_errors_is_imported_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester's in-process runs restore ``sys.modules``, so ``podman.errors`` can be imported a second
    time while the client's modules keep the first: a missing image must still read as None (not an
    error), which ``except ImageNotFound`` of the new module would miss."""
    import sys

    with podman_api.service_scope():
        assert podman_api.image_inspect("localhost/agentbox-no-such-image:never") is None
        for name in [m for m in sys.modules if m == "podman.errors" or m.startswith("podman.errors.")]:
            monkeypatch.delitem(sys.modules, name)
        import podman.errors  # noqa: F401  (a fresh module: new exception classes)

        assert podman_api.image_inspect("localhost/agentbox-no-such-image:never") is None
        assert podman_api.container_inspect("agentbox-no-such-container-never") is None
