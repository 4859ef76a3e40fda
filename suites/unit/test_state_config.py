"""Slug, names, state layout and the TOML config (reference 3)."""

from pathlib import Path

import pytest

from agentbox_runtime.config import default_config_path, load_config
from agentbox_runtime.errors import InputError
from agentbox_runtime.state import (StateLayout, state_base, task_container_name, task_hostname,
                           workspace_slug)


@pytest.mark.parametrize("name,slug", [
    ("project", "project"), ("My repo.name!", "my-repo-name"), ("!!!", "workspace"),
    ("--a--b--", "a-b"), ("x" * 40, "x" * 32), ("Ünïcode", "n-code"),
])
def test_workspace_slug(name: str, slug: str) -> None:
    assert workspace_slug(Path("/tmp") / name) == slug


def test_names() -> None:
    name = task_container_name("proj")
    assert name.startswith("proj-") and len(name) == len("proj-") + 16
    int(name[5:], 16)
    assert task_container_name("proj") != name
    assert task_hostname("my-repo-name") == "my-repo-name-agentbox"


def test_state_base_prefers_xdg_then_home(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    assert state_base(env) == tmp_path / "home" / ".local" / "state"
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    assert state_base(env) == tmp_path / "state"
    with pytest.raises(InputError, match="HOME is not set"):
        state_base({"XDG_CONFIG_HOME": str(tmp_path)})


def test_config_location_overrides_and_appends_agentbox(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg" / "agentbox" / "agentbox.toml"
    cfg.parent.mkdir(parents=True)
    base = tmp_path / "base"
    base.mkdir()
    cfg.write_text(f'[state]\nlocation = "{base}"\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "HOME": str(tmp_path)}
    assert default_config_path(env) == cfg
    ws = tmp_path / "My Project"
    ws.mkdir()
    layout = StateLayout.resolve(ws, env)
    assert layout.state_root == base / "agentbox" / "my-project"
    assert layout.microvm_image_dir == base / "agentbox" / "microvm" / "images"
    assert not str(layout.microvm_image_dir).startswith(str(layout.state_root))
    assert layout.sccache_dir == base / "agentbox" / "sccache"


@pytest.mark.parametrize("text,message", [
    ('[state]\nlocation = "relative/path"\n', "must be an absolute path, got 'relative/path'"),
    ('[state]\nlocation = "/does/not/exist"\n', "does not exist or is not a directory"),
    ('[state]\nlocation = 5\n', "must be a string holding an absolute path, got int"),
    ('[state]\nplace = "/tmp"\n', r"unknown key \[state\].place"),
    ('[other]\nx = 1\n', r"unknown table \[other\]"),
    ('[state\nlocation = "/tmp"\n', "is not valid TOML"),
])
def test_config_errors_name_file_key_and_accepted(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "agentbox" / "agentbox.toml"
    cfg.parent.mkdir()
    cfg.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        load_config({"XDG_CONFIG_HOME": str(tmp_path)})
    assert str(cfg) in str(info.value)


def test_missing_config_is_fine(tmp_path: Path) -> None:
    assert load_config({"XDG_CONFIG_HOME": str(tmp_path)}).state_location is None


def test_ensure_refuses_symlinked_state_root(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    layout = StateLayout.under(tmp_path / "base", ws)
    layout.app_dir.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    layout.state_root.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="is a symlink"):
        layout.ensure()


def test_ensure_creates_private_dirs(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    layout = StateLayout.under(tmp_path / "base", ws).ensure()
    assert layout.state_root.stat().st_mode & 0o777 == 0o700


def test_relative_xdg_values_are_ignored(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": "rel/state", "XDG_CONFIG_HOME": "rel/cfg", "HOME": str(tmp_path)}
    assert state_base(env) == tmp_path / ".local" / "state"
    assert default_config_path(env) == tmp_path / ".config" / "agentbox" / "agentbox.toml"


def test_explicit_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="AGENTBOX_CONFIG names .* which does not exist"):
        load_config({"AGENTBOX_CONFIG": str(tmp_path / "none.toml"), "HOME": str(tmp_path)})
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[state]\nlocation = "{tmp_path}"\n')
    assert load_config({"AGENTBOX_CONFIG": str(cfg)}).state_location == tmp_path
