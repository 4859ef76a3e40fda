"""Golden argv of the container Machine transport (podman exec, detached task)."""

from __future__ import annotations

from agentbox_runtime.container.machine_transport import ContainerTransport, detached_argv
from agentbox_runtime.podman import Podman


def test_exec_argv_string_runs_through_sh_with_defaults() -> None:
    box = ContainerTransport("t1", Podman(), user="dev", env={"A": "1"}, cwd="/workspace")
    assert box.exec_argv("echo hi") == [
        "podman", "exec", "--user", "dev", "--env", "A=1", "--workdir", "/workspace",
        "t1", "sh", "-c", "echo hi"]


def test_exec_argv_overrides_and_merges_env_and_keeps_a_sequence_as_is() -> None:
    box = ContainerTransport("t1", Podman(debug=True), user="dev", env={"A": "1"})
    assert box.exec_argv(["ls", "-l"], user="0", env={"A": "2", "B": "3"}, cwd="/",
                         stdin=True) == [
        "podman", "--log-level=debug", "exec", "-i", "--user", "0", "--env", "A=2",
        "--env", "B=3", "--workdir", "/", "t1", "ls", "-l"]


def test_detached_argv_swaps_tty_flags_and_command() -> None:
    argv = ["run", "--rm", "-it", "--name", "n", "img", "fish", "-l"]
    assert detached_argv(argv, "img") == ["run", "--rm", "-d", "--name", "n", "img",
                                          "sleep", "infinity"]
    assert detached_argv(["run", "--name", "n", "img"], "img", ["true"]) == [
        "run", "-d", "--name", "n", "img", "true"]
