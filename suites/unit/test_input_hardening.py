"""Bad input stays bad input: config files that are not small regular files, sizes past off_t,
control characters in values — each one clear line, exit 2, nothing read forever."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentbox_runtime.config import MAX_CONFIG_BYTES, load_config
from agentbox_runtime.errors import InputError
from agentbox_runtime.size_grammar import MAX_SIZE, parse_resize_size

REPO = Path(__file__).resolve().parents[2]


def test_a_fifo_config_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "conf.fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is not a regular file"):
        load_config({"AGENTBOX_CONFIG": str(fifo)})


def test_a_device_config_is_refused_without_reading_it() -> None:
    with pytest.raises(InputError, match="'/dev/zero' is not a regular file"):
        load_config({"AGENTBOX_CONFIG": "/dev/zero"})


def test_an_oversized_config_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "agentbox.toml"
    big.write_text("#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(InputError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        load_config({"AGENTBOX_CONFIG": str(big)})


def test_a_newline_in_a_config_value_gives_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "agentbox.toml"
    conf.write_text('[state]\nlocation = "/no/such\\nplace"\n')
    work = tmp_path / "project"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "libkrun", "resize", "--target", "nix", "--size", "1G"],
                          cwd=work, env={**os.environ, "AGENTBOX_CONFIG": str(conf), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "/no/such\\nplace" in proc.stderr


@pytest.mark.parametrize("text", ["8388609T", "8388608T", str(1 << 40) + "T", "9223372036854775808G"])
def test_sizes_past_off_t_are_one_clear_error(text: str) -> None:
    with pytest.raises(InputError, match="size is too large .at most 9223372036854775807 bytes"):
        parse_resize_size(text)


def test_the_largest_size_below_off_t_parses() -> None:
    assert parse_resize_size("8388607T") == 8388607 << 40 <= MAX_SIZE


@pytest.mark.parametrize("spec", ["8080:80", "80", "127.0.0.1:8080:80", "127.0.0.1::80", "8000-8010:80-90",
                                  "[::1]:8080:80/udp", "8080:80/tcp"])
def test_publish_specs_podman_accepts_pass(spec: str) -> None:
    from agentbox_runtime.tasks.krun_podman_argv import validate_publish

    assert validate_publish([spec], False) == (spec,)


@pytest.mark.parametrize("spec", ["not-a-port", "0:80", "8080:70000", "999.0.0.1:80:80", "80/icmp", "--privileged",
                                  "90-80:80", "8080:80:80:80"])
def test_bad_publish_specs_are_one_clear_error(spec: str) -> None:
    from agentbox_runtime.tasks.krun_podman_argv import validate_publish

    with pytest.raises(InputError, match="invalid publish spec .*; accepted: \\[\\[ip:\\]\\[hostPort\\]:\\]containerPort"):
        validate_publish([spec], False)


@pytest.mark.parametrize("ref", ["--privileged", "-it", "UPPER/case", "a b", "x\ny", "", "a" * 300,
                                 "localhost/agentbox:latest@sha256:short"])
def test_bad_image_refs_are_refused(ref: str) -> None:
    from agentbox_runtime.podman import validate_image_ref

    with pytest.raises(InputError, match="invalid image reference"):
        validate_image_ref(ref)


@pytest.mark.parametrize("ref", ["localhost/agentbox:latest", "ghcr.io/zeroqn/agentbox:latest", "debian",
                                 "localhost:5000/a/b:v1.2", "docker.io/library/alpine@sha256:" + "a" * 64])
def test_image_refs_pass(ref: str) -> None:
    from agentbox_runtime.podman import validate_image_ref

    assert validate_image_ref(ref) == ref


def _agentbox(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    work = tmp_path / "project"
    work.mkdir(exist_ok=True)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(tmp_path / "state"),
                "HOME": str(tmp_path / "home"), **(env or {})}
    full_env.pop("AGENTBOX_CONFIG", None)
    full_env.pop("AGENTBOX_KRUN_RUNTIME", None)
    return subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", *args], cwd=work, env=full_env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args,env,needle", [
    (["libkrun", "--image=--privileged"], {}, "invalid image reference '--privileged' from --image"),
    (["libkrun", "-p", "not-a-port"], {}, "invalid publish spec 'not-a-port'"),
    (["libkrun"], {"AGENTBOX_IMAGE": "-it"}, "invalid image reference '-it' from AGENTBOX_IMAGE"),
    (["microvm", "--image", "Bad Ref", "--", "true"], {}, "invalid image reference 'Bad Ref'"),
    (["microvm", "--", "true"], {"AGENTBOX_IMAGE": "--privileged"}, "from AGENTBOX_IMAGE"),
])
def test_bad_input_exits_2_with_one_line_and_nothing_written(tmp_path: Path, args: list[str], env: dict[str, str],
                                                             needle: str) -> None:
    proc = _agentbox(tmp_path, *args, env=env)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "state").exists() and not (tmp_path / "home").exists()


def test_a_non_utf8_workspace_path_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    work = Path(os.fsdecode(bytes(tmp_path) + b"/proj\xff"))
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(tmp_path / "state"),
           "HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "libkrun", "resize", "--target", "nix", "--size", "1G"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "is not valid UTF-8" in proc.stderr, proc.stderr
    assert not (tmp_path / "state").exists()
