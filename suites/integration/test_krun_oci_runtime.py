"""``agentbox-krun-runtime`` under Podman itself: krun containers boot as QEMU guests (TCG here).

Each test runs ``podman run --runtime <agentbox-krun-runtime>`` with the krun handler
annotation, as ``agentbox libkrun`` does, and checks what a crun + libkrun user would:
stdio and exit codes, ``podman logs``/``stop``/``kill``/``rm -f``, published ports, the
command taken from ``/.krun_config.json`` in the container's own live mount tree, the krun
disk annotations, a terminal, a non-krun container handed to runc, and bundle errors
reported by Podman and by the runtime's own command line.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbox_runtime.container import host_conf
from agentbox_runtime.oci.locate import runtime_path
from agentbox_runtime.vmm.krun_guest import libkrun_disk_serial

pytestmark = [pytest.mark.vm, pytest.mark.slow]

IMAGE = "localhost/agentbox:latest"
PLAIN_IMAGE = "localhost/agentbox-ctmode-test:latest"
TIMEOUT_S = 600
KRUN = ["--annotation", "run.oci.handler=krun", "--annotation", "krun.ram_mib=1024"]


@pytest.fixture(scope="module")
def runtime() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root: the runtime wires the guest into the container's network namespace")
    if shutil.which("qemu-system-x86_64") is None or shutil.which("podman") is None:
        pytest.skip("needs podman and qemu-system-x86_64")
    if subprocess.run(["podman", "image", "exists", IMAGE], timeout=60).returncode != 0:
        pytest.skip(f"needs the guest image {IMAGE} (agentbox image build)")
    return runtime_path()


@pytest.fixture()
def names() -> Iterator[list[str]]:
    """Containers a test creates; removed afterwards whatever happened."""
    created: list[str] = []
    yield created
    for name in created:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, timeout=120)


def podman(*args: str, stdin: str | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.setdefault(host_conf.ENV, str(host_conf.ensure()))  # runc inside this host's limits (non-krun runs)
    proc = subprocess.run(["podman", *args], input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env, stdin=None if stdin is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def qemu_serving(container_ids: list[str]) -> list[str]:
    """The qemu processes still serving one of these containers' trees (their root share is
    ``<runtime root>/agentbox-krun/<id>/root``); other guests on the machine are not ours to judge."""
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if any(f"/agentbox-krun/{cid}/" in line for cid in container_ids)]


def status_of(name: str) -> tuple[str, int]:
    out = podman("inspect", name, "--format", "{{.State.Status}} {{.State.ExitCode}}", check=True).stdout.split()
    return out[0], int(out[1])


def wait_for(name: str, text: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    logs = ""
    while time.monotonic() < deadline:
        logs = podman("logs", name).stdout
        if text in logs:
            return logs
        time.sleep(1)
    pytest.fail(f"{name}: {text!r} never appeared in podman logs; last seen:\n{logs[-2000:]}")


def http_get(url: str) -> tuple[str, str]:
    """The body (empty on any error) and the error seen."""
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.read().decode(), ""
    except OSError as exc:
        return "", str(exc)


def test_stdin_stdout_stderr_and_the_exit_code_pass_through(runtime: str) -> None:
    proc = podman("run", "--rm", "-i", "--runtime", runtime, *KRUN, "--entrypoint", "sh", IMAGE, "-c",
                  "read line; echo \"got $line from $(uname -r)\"; echo to-stderr >&2; exit 7",
                  stdin="hello\n")
    assert proc.returncode == 7, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith("got hello from "), proc.stdout
    assert "to-stderr" in proc.stderr


def test_a_missing_command_is_127_as_with_libkrun(runtime: str) -> None:
    proc = podman("run", "--rm", "--runtime", runtime, *KRUN, "--entrypoint", "/no/such/thing", IMAGE)
    assert proc.returncode == 127, proc.stderr[-2000:]
    assert proc.stdout == "Couldn't execute '/no/such/thing' inside the vm: No such file or directory\n"


def test_logs_stop_kill_and_rm_force_of_a_running_guest(runtime: str, names: list[str]) -> None:
    for name in ("krun-stop", "krun-kill", "krun-rm"):
        names.append(name)
        podman("run", "-d", "--name", name, "--runtime", runtime, *KRUN, "--entrypoint", "sh", IMAGE, "-c",
               "echo guest-up; exec sleep 1000", check=True)
    ids = [podman("inspect", name, "--format", "{{.Id}}", check=True).stdout.strip() for name in names]
    for name in names:
        wait_for(name, "guest-up")
        assert status_of(name)[0] == "running"
    assert len(qemu_serving(ids)) == 3
    podman("stop", "-t", "10", "krun-stop", check=True)
    assert status_of("krun-stop") == ("exited", 143)
    podman("kill", "krun-kill", check=True)
    podman("wait", "krun-kill")
    assert status_of("krun-kill") == ("exited", 137)
    podman("rm", "-f", "krun-rm", check=True)
    assert podman("container", "exists", "krun-rm").returncode == 1
    for name in ("krun-stop", "krun-kill"):
        podman("rm", name, check=True)
    names.clear()
    assert qemu_serving(ids) == []


def test_podman_exec_into_a_guest_is_refused_with_one_clear_line(runtime: str, names: list[str]) -> None:
    names.append("krun-exec")
    podman("run", "-d", "--name", "krun-exec", "--runtime", runtime, *KRUN, "--entrypoint", "sh", IMAGE, "-c",
           "echo guest-up; exec sleep 1000", check=True)
    wait_for("krun-exec", "guest-up")
    proc = podman("exec", "krun-exec", "true")
    assert proc.returncode != 0
    assert "'exec' is not supported for krun guest" in proc.stderr, proc.stderr


def test_a_published_port_reaches_a_server_in_the_guest(runtime: str, names: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    names.append("krun-web")
    podman("run", "-d", "--name", "krun-web", "-p", f"127.0.0.1:{port}:8000", "--runtime", runtime, *KRUN,
           "--entrypoint", "sh", IMAGE, "-c",
           "echo served-by-the-guest > /tmp/index.html; cd /tmp; exec python3 -m http.server 8000", check=True)
    deadline = time.monotonic() + 300
    body, last = "", ""
    while time.monotonic() < deadline and not body:
        body, last = http_get(f"http://127.0.0.1:{port}/index.html")
        time.sleep(0.5)
    assert body.strip() == "served-by-the-guest", f"{last}\n{podman('logs', 'krun-web').stdout[-1000:]}"


def _read_until(proc: subprocess.Popen[str], text: str, timeout: float = 300) -> str:
    """What ``proc`` printed on stdout up to and including the line ``text``."""
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.strip() == text:
                return "".join(seen)
    proc.kill()
    pytest.fail(f"{text!r} never came; stdout so far: {''.join(seen)[-2000:]}")


# The guest's command: what it got from /.krun_config.json, then (after the host changed the
# volume and the bound file) what it sees of them, then its own writes. No double quotes and no
# backslashes: libkrun v1.18.0's init decodes those escapes differently from later versions.
# Go's encoder writes & as \u0026, which every version decodes.
TREE_PROBE = ("echo args=$0,$1 && echo uid=$(id -u) cwd=$(pwd) && echo home=$HOME term=$TERM probe=$PROBE && "
              "echo host=$(hostname) && stat -c config=%a /.krun_config.json && echo ready && read go && "
              "cat /data/late /etc/live-file && echo from-guest >> /etc/live-file && echo guest > /data/from-guest && "
              "echo serial=$(cat /sys/block/vda/serial) && stat -c data-owner=%U /data && "
              "ls -A /etc/skel | grep -c profile && echo scratch > /scratch/s && cat /scratch/s && "
              "echo dir-mounts=$(cut -d' ' -f2 /proc/mounts | grep -cx -e /data -e /scratch -e /etc/skel) && "
              "echo file-mounts=$(cut -d' ' -f2 /proc/mounts | grep -cx /etc/live-file)")


def test_the_guest_runs_the_config_command_as_root_in_the_containers_live_tree(runtime: str,
                                                                               tmp_path: Path) -> None:
    """crun's krun handler: the command, env and directory reach the guest only through
    /.krun_config.json (libkrun's init reads it; --user is not applied: the guest runs it as root);
    the root is the container's own tree, so a volume and a bind-mounted file are live both ways
    (the host writes after the guest started, the guest's writes land on the host as root's),
    tmpfs mounts are crun's (tmpcopyup brings the image's files), directory mounts show in the
    guest's /proc/mounts as virtio-fs submounts do (a file bind does not), and a disk's serial is
    its image file's."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, 1000, 1000)
    live = tmp_path / "live-file"
    live.write_text("host-1\n")
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    env = dict(os.environ)
    env.setdefault(host_conf.ENV, str(host_conf.ensure()))
    proc = subprocess.Popen(["podman", "run", "-i", "--rm", "--runtime", runtime, *KRUN,
                             "--annotation", f"krun.disk.0.path={disk}", "--annotation", "krun.disk.0.id=agentbox-test",
                             "--annotation", "krun.disk.0.readonly=false", "-v", f"{shared}:/data",
                             "-v", f"{live}:/etc/live-file", "--tmpfs", "/etc/skel", "--tmpfs", "/scratch",
                             "--user", "1000:1000", "-w", "/data", "-e", "PROBE=from-env", "-e", "HOME=/probe-home",
                             "--hostname", "probe-host", "--entrypoint", "sh", IMAGE, "-c", TREE_PROBE, "arg-zero", "arg-one"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        before = _read_until(proc, "ready").split()
        (shared / "late").write_text("late-from-host\n")
        with open(live, "a") as f:
            f.write("host-2\n")
        out, err = proc.communicate("go\n", timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert before == ["args=arg-zero,arg-one", "uid=0", "cwd=/data", "home=/probe-home", "term=xterm", "probe=from-env",
                      "host=probe-host", "config=444", "ready"]
    assert out.split() == ["late-from-host", "host-1", "host-2", f"serial={libkrun_disk_serial(disk)}",
                           "data-owner=dev", "1", "scratch", "dir-mounts=3", "file-mounts=0"]
    assert live.read_text() == "host-1\nhost-2\nfrom-guest\n"
    st = (shared / "from-guest").stat()
    assert (shared / "from-guest").read_text() == "guest\n" and (st.st_uid, st.st_gid) == (0, 0)


def test_a_terminal_reaches_the_guest_command(runtime: str) -> None:
    if shutil.which("script") is None:
        pytest.skip("needs script(1) (bsdutils) to give podman a terminal")
    command = (f"podman run --rm -it --runtime {runtime} {' '.join(KRUN)} --entrypoint sh {IMAGE} "
               "-c 'tty; exit 4'")
    proc = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True,
                          timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert proc.returncode == 4, proc.stdout[-2000:]
    assert "/dev/hvc0" in proc.stdout


def test_a_container_without_the_krun_handler_goes_to_runc(runtime: str) -> None:
    if podman("image", "exists", PLAIN_IMAGE).returncode != 0:
        pytest.skip(f"needs {PLAIN_IMAGE} (made by the container-mode tests)")
    proc = podman("run", "--rm", "--runtime", runtime, PLAIN_IMAGE, "sh", "-c",
                  "echo kernel $(uname -r); exit 5")
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"kernel {os.uname().release}"  # the host's kernel: no VM


def test_a_bad_krun_annotation_is_one_clear_error_reported_by_podman(runtime: str, tmp_path: Path) -> None:
    """As crun: a resource annotation fails the started container (exit 1, its stderr); a disk
    annotation the fork refuses fails create. Neither boots anything."""
    proc = podman("run", "--rm", "--runtime", runtime, "--annotation", "run.oci.handler=krun",
                  "--annotation", "krun.ram_mib=lots", "--entrypoint", "true", IMAGE)
    assert proc.returncode == 1
    assert "krun annotation krun.ram_mib='lots' cannot be converted to an integer" in proc.stderr, proc.stderr
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * 512)
    proc = podman("run", "--rm", "--runtime", runtime, "--annotation", "run.oci.handler=krun",
                  "--annotation", f"krun.disk.1.path={disk}", "--annotation", "krun.disk.1.id=x",
                  "--entrypoint", "true", IMAGE)
    assert proc.returncode != 0
    assert "krun disk annotation indexes must be contiguous from 0: missing index 0" in proc.stderr, proc.stderr


def test_a_missing_or_corrupt_bundle_fails_create_with_one_line(runtime: str, tmp_path: Path) -> None:
    log = tmp_path / "runtime.log"
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    for bundle, words in ((tmp_path / "missing", "has no config.json"), (tmp_path / "corrupt", "is not valid JSON")):
        proc = subprocess.run([runtime, "--root", str(tmp_path / "root"), "--log", str(log), "--log-format", "json",
                               "create", "--bundle", str(bundle), "x1"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["level"] for e in entries] == ["error", "error"] and "config.json" in entries[0]["msg"]
    assert not (tmp_path / "root" / "agentbox-krun" / "x1").exists()


def test_state_kill_and_delete_of_an_unknown_container_go_to_runc(runtime: str, tmp_path: Path) -> None:
    for command in (["state"], ["kill"], ["delete"]):
        proc = subprocess.run([runtime, "--root", str(tmp_path), *command, "no-such-container"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode != 0 and "container does not exist" in proc.stderr, proc.stderr  # runc's answer


def test_the_runtime_answers_version_and_features(runtime: str) -> None:
    version = subprocess.run([runtime, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "spec: 1.0.2" in version.stdout
    features = json.loads(subprocess.run([runtime, "features"], capture_output=True, text=True, timeout=60).stdout)
    assert features["annotations"]["run.oci.handler"] == "krun"


def test_the_runtime_runs_from_its_console_script() -> None:
    assert Path(runtime_path()).name == "agentbox-krun-runtime"
    proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.oci.krun_runtime_cli", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
