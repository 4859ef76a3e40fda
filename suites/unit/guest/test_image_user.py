"""The image user (/etc/agentbox/image-user): parsing, what is refused, and the guest steps that
follow it (passwd entries, home, shell env, Podman storage, subids)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from agentbox_guest_init.env import GuestEnv
from agentbox_guest_init.errors import GuestError
from agentbox_guest_init.home import materialize_home
from agentbox_guest_init.identity import Identity, dev_identity, resolve_identity
from agentbox_guest_init.image_user import ImageUser, load
from agentbox_guest_init.podman_prep import rewrite_subids, storage_conf
from agentbox_guest_init.shell_env import shell_env

AGENT = ImageUser(user="agent", uid=2000, gid=2001, workdir="/work")


def _image(root: Path, text: str) -> None:
    (root / "etc/agentbox").mkdir(parents=True, exist_ok=True)
    (root / "etc/agentbox/image-user").write_text(text)


def test_defaults_are_the_stock_image() -> None:
    d = ImageUser()
    assert (d.user, d.uid, d.gid, d.home, d.workdir) == ("dev", 1000, 1000, "/home/dev", "/workspace")
    assert d.is_default and not AGENT.is_default
    assert d.containers_storage == "/home/dev/.local/share/containers"


def test_file_text_labels_and_fields_round_trip() -> None:
    assert AGENT.file_text() == "user=agent\nuid=2000\ngid=2001\nworkdir=/work\n"
    assert ImageUser.from_text(AGENT.file_text()) == AGENT
    assert ImageUser.from_labels({**AGENT.labels(), "io.agentbox.recipe": "x"}) == AGENT
    assert ImageUser.from_labels({}) == ImageUser()
    assert ImageUser.from_text("# comment\n\nuser = agent\n") == ImageUser(user="agent")
    assert AGENT.exec_env() == {"HOME": "/home/agent", "USER": "agent", "LOGNAME": "agent",
                                "NIX_REMOTE": "unix:///nix/var/nix/daemon-socket/socket",
                                "XDG_CONFIG_HOME": "/home/agent/.config", "XDG_DATA_HOME": "/home/agent/.local/share",
                                "XDG_STATE_HOME": "/home/agent/.local/state", "XDG_CACHE_HOME": "/home/agent/.cache"}


@pytest.mark.parametrize(("fields", "says"), [
    ({"user": "root"}, "invalid user name 'root'"),
    ({"user": "Agent"}, "invalid user name 'Agent'"),
    ({"user": "a" * 33}, "invalid user name"),
    ({"user": "ag:ent"}, "invalid user name"),
    ({"uid": "0"}, "invalid uid 0"),
    ({"uid": "999"}, "invalid uid 999"),
    ({"gid": "60000"}, "invalid gid 60000"),
    ({"uid": "-1"}, "invalid uid '-1'"),
    ({"uid": "1e3"}, "invalid uid '1e3'"),
    ({"workdir": "work"}, "invalid workdir 'work'"),
    ({"workdir": "/"}, "invalid workdir '/'"),
    ({"workdir": "/work/"}, "invalid workdir '/work/'"),
    ({"workdir": "/a/../etc"}, "invalid workdir '/a/../etc'"),
    ({"workdir": "/a b"}, "invalid workdir '/a b'"),
    ({"workdir": "/etc/x"}, "invalid workdir '/etc/x'"),
    ({"workdir": "/nix"}, "invalid workdir '/nix'"),
    ({"workdir": "/home"}, "invalid workdir '/home'"),
    ({"workdir": "/home/dev"}, "invalid workdir '/home/dev'"),
    ({"workdir": "/home/other/x"}, "invalid workdir '/home/other/x'"),
    ({"shell": "/bin/sh"}, "unknown field(s) shell"),
])
def test_bad_values_are_refused_with_what_is_accepted(fields: dict[str, str], says: str) -> None:
    with pytest.raises(ValueError) as info:
        ImageUser.from_fields(fields)
    assert says in str(info.value) and "expected" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_workdir_below_the_home_is_allowed() -> None:
    assert ImageUser(user="agent", workdir="/home/agent/project").workdir == "/home/agent/project"
    assert ImageUser(workdir="/srv2/x/y").workdir == "/srv2/x/y"


def test_load_reads_the_file_or_gives_the_defaults(tmp_path: Path) -> None:
    assert load(tmp_path) == ImageUser()
    _image(tmp_path, AGENT.file_text())
    assert load(tmp_path) == AGENT


def test_load_names_the_file_of_a_bad_image_user(tmp_path: Path) -> None:
    _image(tmp_path, "user=agent\nuid=abc\n")
    with pytest.raises(GuestError, match="bad image user file .*image-user: invalid uid 'abc'"):
        load(tmp_path)
    _image(tmp_path, "just text\n")
    with pytest.raises(GuestError, match="line 1: expected key=value"):
        load(tmp_path)


def test_load_never_follows_a_symlink_or_reads_a_huge_file(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text(AGENT.file_text())
    root = tmp_path / "root"
    (root / "etc/agentbox").mkdir(parents=True)
    (root / "etc/agentbox/image-user").symlink_to(outside)
    with pytest.raises(GuestError, match="cannot read the image user file"):
        load(root)
    (root / "etc/agentbox/image-user").unlink()
    (root / "etc/agentbox").rmdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/image-user").write_text(AGENT.file_text())
    (root / "etc/agentbox").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(GuestError, match="must be a regular file .* inside the image"):
        load(root)
    (root / "etc/agentbox").unlink()
    _image(root, "user=agent\n" + "#" * 5000 + "\n")
    with pytest.raises(GuestError, match="at most 4096 bytes"):
        load(root)


def test_guest_steps_follow_the_image_user(tmp_path: Path) -> None:
    _image(tmp_path, AGENT.file_text())
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nagent:x:2000:2001::/home/agent:/usr/bin/fish\n")
    (tmp_path / "etc/group").write_text("root:x:0:\nagent:x:2001:\n")
    ident = dev_identity(GuestEnv(host_uid=4321, host_gid=4322), tmp_path)
    assert ident == Identity(4321, 4322, "/usr/bin/fish", AGENT)
    assert dev_identity(GuestEnv(), tmp_path) == Identity(2000, 2001, "/usr/bin/fish", AGENT)
    assert resolve_identity(GuestEnv(host_uid=5000, host_gid=5001), "fish", euid=0, egid=0,
                            root=tmp_path).name == "agent"
    if os.geteuid() == 0:
        materialize_home(ident, tmp_path)
        assert (tmp_path / "etc/passwd").read_text().splitlines()[-1] == \
            "agent:x:4321:4322:dev user:/home/agent:/usr/bin/fish"
        assert (tmp_path / "etc/group").read_text().splitlines()[-1] == "agent:x:4322:"
        assert os.stat(tmp_path / "home/agent/.config").st_uid == 4321
    env = shell_env(ident, GuestEnv(containers_storage=True), "/usr/bin")
    assert (env["USER"], env["HOME"], env["XDG_CACHE_HOME"], env["TMPDIR"]) == \
        ("agent", "/home/agent", "/home/agent/.cache", "/home/agent/.cache/tmp")
    assert tomllib.loads(storage_conf(ident))["storage"]["graphroot"] == "/home/agent/.local/share/containers/storage"
    subuid = tmp_path / "etc/subuid"
    subuid.write_text("dev:100000:65536\nagent:1:2\n")
    rewrite_subids(subuid, ident.name)
    assert subuid.read_text() == "dev:100000:65536\nagent:100000:65536\n"
