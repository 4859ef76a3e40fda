"""nix-sidecar.state parsing, rendering and the stale-state notice (reference 8.4)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from agentbox_runtime.container.state_file import (
    MountMode, SidecarState, StateParseError, load_state, parse_state, write_state,
)
from agentbox_runtime.errors import AgentboxError

FULL = """\
image=localhost/agentbox:latest
image_id=abc123
image_mount_path=/var/lib/containers/storage/overlay/x/merged
sidecar_name=agentbox-nix-sidecar-proj-0123456789abcdef
mount_mode=unshare
proxy_port=40001
"""


def test_full_state_parses_every_field() -> None:
    st = parse_state(FULL, "f")
    assert st == SidecarState(
        image="localhost/agentbox:latest", image_id="abc123",
        image_mount_path="/var/lib/containers/storage/overlay/x/merged",
        sidecar_name="agentbox-nix-sidecar-proj-0123456789abcdef",
        mount_mode=MountMode.UNSHARE, proxy_port=40001, native_config=True,
    )


def test_render_round_trips_in_reference_key_order() -> None:
    st = parse_state(FULL, "f")
    assert st.render() == FULL
    assert parse_state(st.render(), "f") == st


def test_missing_mount_mode_means_direct_and_port_is_optional() -> None:
    text = "\n".join(FULL.splitlines()[:4]) + "\n"
    st = parse_state(text, "f")
    assert st.mount_mode is MountMode.DIRECT
    assert st.proxy_port is None
    assert "proxy_port" not in st.render()


def test_blank_comment_and_unknown_lines_are_ignored_and_values_trimmed() -> None:
    text = "# header\n\n  unknown=1\n" + "\n".join(f"  {line}  " for line in FULL.splitlines())
    assert parse_state(text, "f") == parse_state(FULL, "f")


@pytest.mark.parametrize(("extra", "native"), [
    ("runtime_mode=native\nnetwork_mode=passt\n", True),
    ("runtime_mode=libkrun\n", False),
    ("network_mode=tsi\n", False),
])
def test_legacy_configuration_is_flagged(extra: str, native: bool) -> None:
    assert parse_state(FULL + extra, "f").native_config is native


@pytest.mark.parametrize(("line", "message"), [
    ("mount_mode=sideways", "unsupported mount_mode 'sideways' in '/s/f'"),
    ("proxy_port=70000", "invalid proxy_port '70000' in '/s/f'"),
    ("proxy_port=abc", "invalid proxy_port 'abc' in '/s/f'"),
])
def test_invalid_values_give_reference_errors(line: str, message: str) -> None:
    key = line.split("=")[0]
    text = "\n".join(x for x in FULL.splitlines() if not x.startswith(key)) + "\n" + line
    with pytest.raises(StateParseError) as err:
        parse_state(text, "/s/f")
    assert str(err.value) == message


@pytest.mark.parametrize("missing", ["image", "image_id", "image_mount_path", "sidecar_name"])
def test_missing_required_field_is_incomplete(missing: str) -> None:
    text = "\n".join(x for x in FULL.splitlines() if not x.startswith(missing + "="))
    with pytest.raises(StateParseError) as err:
        parse_state(text, "/s/f")
    assert str(err.value) == "'/s/f' is incomplete"


def test_matches_compares_image_id_and_name() -> None:
    st = parse_state(FULL, "f")
    assert st.matches(st.image, st.image_id, st.sidecar_name)
    assert not st.matches(st.image, "other", st.sidecar_name)
    assert not st.matches("other", st.image_id, st.sidecar_name)
    assert not st.matches(st.image, st.image_id, "other")


def test_load_absent_file_is_none(fs) -> None:  # type: ignore[no-untyped-def]
    assert load_state(Path("/state/nix-sidecar.state")) is None


def test_load_valid_file(fs) -> None:  # type: ignore[no-untyped-def]
    fs.create_file("/state/nix-sidecar.state", contents=FULL)
    st = load_state(Path("/state/nix-sidecar.state"))
    assert st is not None and st.proxy_port == 40001


def test_malformed_file_is_deleted_with_exact_notice(fs) -> None:  # type: ignore[no-untyped-def]
    path = Path("/state/nix-sidecar.state")
    fs.create_file(path, contents="mount_mode=bogus\n")
    err = io.StringIO()
    assert load_state(path, stderr=err) is None
    assert not path.exists()
    assert err.getvalue() == (
        "agentbox: ignored stale sidecar state '/state/nix-sidecar.state'; recreating sidecar "
        "stack (unsupported mount_mode 'bogus' in '/state/nix-sidecar.state')\n")


def test_incomplete_file_is_deleted_with_exact_notice(fs) -> None:  # type: ignore[no-untyped-def]
    path = Path("/state/nix-sidecar.state")
    fs.create_file(path, contents="image=x\n")
    err = io.StringIO()
    assert load_state(path, stderr=err) is None
    assert not path.exists()
    assert err.getvalue() == (
        "agentbox: ignored stale sidecar state '/state/nix-sidecar.state'; recreating sidecar "
        "stack ('/state/nix-sidecar.state' is incomplete)\n")


def test_non_utf8_file_is_stale(fs) -> None:  # type: ignore[no-untyped-def]
    path = Path("/state/nix-sidecar.state")
    fs.create_file(path, contents=b"\xff\xfe")
    err = io.StringIO()
    assert load_state(path, stderr=err) is None
    assert not path.exists()
    assert "recreating sidecar stack (failed to read" in err.getvalue()


def test_undeletable_stale_file_is_fatal(tmp_path: Path) -> None:
    # a directory where the file should be: unreadable as state and not unlinkable
    path = tmp_path / "nix-sidecar.state"
    path.mkdir()
    with pytest.raises(AgentboxError) as err:
        load_state(path, stderr=io.StringIO())
    assert str(err.value).startswith(f"failed to remove stale sidecar state '{path}'")


def test_write_state_is_0600_and_readable(fs) -> None:  # type: ignore[no-untyped-def]
    fs.create_dir("/state")
    path = Path("/state/nix-sidecar.state")
    st = parse_state(FULL, "f")
    write_state(path, st)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_state(path) == st
    assert os.listdir("/state") == ["nix-sidecar.state"]
