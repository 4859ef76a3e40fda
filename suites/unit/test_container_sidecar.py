"""Golden argv and texts of the sidecar stack (reference 8.3 and 8.5)."""

from __future__ import annotations

from pathlib import Path

from agentbox_runtime.container.health import ProbeAttempt, probe_argv, probe_script, render_failure, state_line
from agentbox_runtime.container.sidecar import sidecar_run_argv

NAME = "agentbox-nix-sidecar-proj-0123456789abcdef"


def test_sidecar_run_argv_reference_form() -> None:
    assert sidecar_run_argv(NAME, Path("/s/nix-merged"), "localhost/agentbox:latest") == [
        "run", "-d", "--name", NAME, "--user", "0:0", "--volume", "/s/nix-merged:/nix",
        "--publish", "19876", "--entrypoint", "/bin/agentbox-nix-sidecar-entrypoint",
        "localhost/agentbox:latest"]


def test_sidecar_run_argv_puts_the_harness_label_just_before_the_image() -> None:
    argv = sidecar_run_argv(NAME, Path("/s/nix-merged"), "img", run_label="run-7")
    assert argv[-3:] == ["--label", "io.agentbox.harness.run=run-7", "img"]


def test_state_line_prints_the_inspect_state_as_podman_inspect_format_does() -> None:
    state = {"Running": False, "Status": "exited", "ExitCode": 137, "Error": "", "OOMKilled": True}
    assert state_line(state) == "running=false status=exited exit_code=137 error= oom_killed=true"
    assert state_line({}) == "running= status= exit_code= error= oom_killed="


def test_probe_argv_rootless_uses_keep_id_and_rootful_does_not() -> None:
    rootless = probe_argv("img", 40000, rootless=True)
    assert rootless[:4] == ["run", "--rm", "--userns", "keep-id"]
    assert rootless[4:7] == ["img", "bash", "-lc"]
    rootful = probe_argv("img", 40000, run_label="r1", rootless=False)
    assert rootful[:5] == ["run", "--rm", "--label", "io.agentbox.harness.run=r1", "img"]


def test_probe_script_targets_the_published_port_and_pings_the_store() -> None:
    script = probe_script(40000)
    assert "TCP:host.containers.internal:40000" in script
    assert "/tmp/agentbox-nix-health." in script
    assert "store ping --store \"unix://$sock\"" in script


LAST = ProbeAttempt(socket_exists=True, port_listening=False, ok=False, output="refused")


def test_failure_text_after_clean_cleanup_with_logs() -> None:
    text = render_failure(NAME, "/s/nix-merged", LAST, None, 0, "log line", "running=false")
    assert text.startswith(
        "nix-daemon proxy for socket '/nix/var/nix/daemon-socket/socket' was not connectable "
        f"after startup for sidecar '{NAME}'; ")
    assert (" Automatic cleanup completed; retrying should not require manual "
            "'/s/nix-merged' removal.\nrecent sidecar logs:\nlog line\n") in text
    assert text.endswith("\nsidecar state: running=false\nsocket probe failure: refused"
                         "\nhost socket path exists: yes\nproxy port 19876 listening: no")


def test_failure_text_when_cleanup_failed_and_logs_unavailable() -> None:
    text = render_failure(NAME, "/s/m", LAST, "busy", 125, "no such container", "gone")
    assert (" The merged mount '/s/m' could not be cleaned automatically; remove it before "
            "retrying.") in text
    assert ("\nsidecar logs unavailable (no such container); this usually means the sidecar "
            "terminated before logs could be collected.") in text
