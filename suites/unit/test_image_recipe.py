"""The guest image recipe: stage hashes, the guest_init install layout, launcher, config, tag input."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agentbox_guest_init import contract
from agentbox_guest_init.image_user import ImageUser
from agentbox_runtime.errors import InputError
from agentbox_runtime.images import recipe
from agentbox_runtime.images.commit import config_argv
from agentbox_runtime.images.install import in_root, install_guest_init
from agentbox_runtime.images.rootfs import apt_mirror, users_script

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def pkg_copy(tmp_path: Path) -> Path:
    """A copy of the guest_init package that a test may edit."""
    dest = tmp_path / "src" / "agentbox_guest_init"
    shutil.copytree(recipe.guest_init_dir(), dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_hashes_are_stable_hex() -> None:
    assert recipe.recipe_hash() == recipe.recipe_hash()
    assert recipe.guest_init_hash() == recipe.guest_init_hash()
    for h in (recipe.recipe_hash(), recipe.guest_init_hash()):
        assert len(h) == 64 and int(h, 16) >= 0


def test_copy_of_guest_init_hashes_like_the_original(pkg_copy: Path) -> None:
    assert recipe.guest_init_hash(pkg_copy) == recipe.guest_init_hash()


def test_changing_a_guest_init_file_changes_only_the_guest_init_hash(pkg_copy: Path) -> None:
    recipe_before, gi_before = recipe.recipe_hash(), recipe.guest_init_hash(pkg_copy)
    with open(pkg_copy / "enter.py", "a") as f:
        f.write("\n# edited\n")
    assert recipe.guest_init_hash(pkg_copy) != gi_before
    assert recipe.recipe_hash() == recipe_before


def test_adding_or_renaming_a_guest_init_file_changes_the_hash(pkg_copy: Path) -> None:
    before = recipe.guest_init_hash(pkg_copy)
    (pkg_copy / "wrappers" / "extra").write_text("#!/bin/sh\n")
    added = recipe.guest_init_hash(pkg_copy)
    assert added != before
    (pkg_copy / "wrappers" / "extra").rename(pkg_copy / "wrappers" / "extra2")
    assert recipe.guest_init_hash(pkg_copy) not in (before, added)


def test_bytecode_caches_do_not_change_the_guest_init_hash(pkg_copy: Path) -> None:
    before = recipe.guest_init_hash(pkg_copy)
    (pkg_copy / "__pycache__").mkdir()
    (pkg_copy / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"\0\1")
    (pkg_copy / "stray.pyc").write_bytes(b"\0")
    assert recipe.guest_init_hash(pkg_copy) == before


def test_guest_init_hash_follows_the_in_image_scripts(pkg_copy: Path, tmp_path: Path) -> None:
    files = tmp_path / "files"
    shutil.copytree(recipe.FILES_DIR, files)
    assert recipe.guest_init_hash(pkg_copy, files) == recipe.guest_init_hash()
    (files / "agentbox-sidecar-proxy").write_text("#!/bin/sh\nexit 0\n")
    assert recipe.guest_init_hash(pkg_copy, files) != recipe.guest_init_hash()


def test_recipe_hash_follows_the_root_builder_source(tmp_path: Path) -> None:
    edited = tmp_path / "rootfs.py"
    edited.write_bytes((REPO / "agentbox_runtime/images/rootfs.py").read_bytes())
    assert recipe.recipe_hash(edited) == recipe.recipe_hash()
    edited.write_bytes(edited.read_bytes() + b"\n# another step\n")
    assert recipe.recipe_hash(edited) != recipe.recipe_hash()


def test_store_dir_name_is_nix_shaped() -> None:
    name = recipe.store_dir_name(recipe.guest_init_hash())
    digest, rest = name[:32], name[32:]
    assert set(digest) <= set(recipe.NIX_BASE32)
    assert rest == f"-agentbox-guest-init-{recipe.GUEST_INIT_VERSION}"
    assert recipe.store_dir_name("a" * 64) != recipe.store_dir_name("b" * 64)


def test_launcher_text_golden() -> None:
    assert recipe.launcher_text(Path("/nix/store/x-agentbox-guest-init-0.1.0/lib")) == (
        "#!/usr/bin/python3 -I\n"
        "import sys\n"
        "sys.path.insert(0, '/nix/store/x-agentbox-guest-init-0.1.0/lib')\n"
        "from agentbox_guest_init.cli import main\n"
        "sys.exit(main())\n")


def test_launcher_imports_guest_init_from_its_lib_dir_first(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    (lib / "agentbox_guest_init").mkdir(parents=True)
    (lib / "agentbox_guest_init" / "__init__.py").write_text("")
    (lib / "agentbox_guest_init" / "cli.py").write_text(
        "import sys\n"
        "def main():\n"
        "    print(__file__, sys.argv[1:])\n"
        "    return 7\n")
    launcher = tmp_path / "agentbox-guest-init"
    launcher.write_text(recipe.launcher_text(lib))
    # run with this interpreter (the shebang names the guest's /usr/bin/python3); -I as in the shebang
    proc = subprocess.run([sys.executable, "-I", str(launcher), "libkrun", "enter"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.strip() == f"{lib / 'agentbox_guest_init' / 'cli.py'} ['libkrun', 'enter']"


def _debian_like_root(root: Path, absolute_bin: bool) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("/usr/bin" if absolute_bin else "usr/bin")


@pytest.mark.parametrize("absolute_bin", [False, True], ids=["bin->usr/bin", "bin->/usr/bin"])
def test_install_layout_matches_the_microvm_contract(tmp_path: Path, absolute_bin: bool) -> None:
    root = tmp_path / "root"
    _debian_like_root(root, absolute_bin)
    gi_hash = recipe.guest_init_hash()
    store = install_guest_init(root, gi_hash)
    assert store == Path("/nix/store") / recipe.store_dir_name(gi_hash)
    launchers = [p for p in (root / "nix/store").glob("*/bin/agentbox-guest-init")
                 if p.is_file() and os.access(p, os.X_OK)]
    assert launchers == [root / store.relative_to("/") / "bin/agentbox-guest-init"]
    assert launchers[0].read_text() == recipe.launcher_text(store / "lib")
    assert (root / store.relative_to("/") / "lib/agentbox_guest_init/cli.py").is_file()
    link = root / "usr/bin" / Path(contract.GUEST_INIT_PATH).name
    assert os.readlink(link) == str(store / "bin/agentbox-guest-init")
    for script in ("agentbox-nix-sidecar-entrypoint", "agentbox-sidecar-proxy"):
        assert stat.S_IMODE((root / "usr/bin" / script).stat().st_mode) == 0o755
    for wrapper in (recipe.guest_init_dir() / "wrappers").iterdir():
        assert (root / "usr/local/bin" / wrapper.name).read_bytes() == wrapper.read_bytes()
        assert os.access(root / "usr/local/bin" / wrapper.name, os.X_OK)


def test_reinstall_keeps_exactly_one_guest_init(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _debian_like_root(root, False)
    install_guest_init(root, "1" * 64)
    store = install_guest_init(root, "2" * 64)
    assert [p.name for p in (root / "nix/store").iterdir()] == [store.name]
    assert os.readlink(root / "usr/bin/agentbox-guest-init") == str(store / "bin/agentbox-guest-init")


def test_in_root_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _debian_like_root(root, True)
    assert in_root(root, "/bin") == root / "usr/bin"
    assert in_root(root, "/usr/local/bin") == root / "usr/local/bin"


def test_image_config_and_buildah_argv() -> None:
    config = recipe.image_config("r" * 64, "g" * 64)
    assert config.entrypoint == ("/bin/agentbox-guest-init", "default", "enter", "--")
    assert config.cmd == ("fish", "-l")
    assert config.workdir == "/workspace"
    assert dict(config.env) == {"SHELL": "/usr/bin/fish", "AGENTBOX_REAL_PODMAN": "/usr/bin/podman"}
    assert config_argv(config) == [
        "--entrypoint", '["/bin/agentbox-guest-init", "default", "enter", "--"]',
        "--cmd", '["fish", "-l"]', "--workingdir", "/workspace",
        "--env", "SHELL=/usr/bin/fish", "--env", "AGENTBOX_REAL_PODMAN=/usr/bin/podman",
        "--label", f"io.agentbox.recipe={'r' * 64}", "--label", f"io.agentbox.guest-init={'g' * 64}",
        "--label", "io.agentbox.user=dev", "--label", "io.agentbox.uid=1000", "--label", "io.agentbox.gid=1000",
        "--label", "io.agentbox.workdir=/workspace"]
    assert recipe.base_tag("ab" * 32) == "localhost/agentbox-base:" + "ab" * 8


def test_an_image_user_sets_the_workdir_labels_and_its_own_final_hash() -> None:
    agent = ImageUser(user="agent", uid=2000, gid=2001, workdir="/work")
    config = recipe.image_config("r" * 64, "g" * 64, agent)
    assert config.workdir == "/work"
    labels = dict(config.labels)
    assert ImageUser.from_labels(labels) == agent
    assert {k: labels[k] for k in ("io.agentbox.user", "io.agentbox.uid", "io.agentbox.gid", "io.agentbox.workdir")} \
        == {"io.agentbox.user": "agent", "io.agentbox.uid": "2000", "io.agentbox.gid": "2001",
            "io.agentbox.workdir": "/work"}
    stock = recipe.guest_init_hash()
    assert recipe.guest_init_hash(user=agent) != stock
    assert recipe.guest_init_hash(user=ImageUser(workdir="/work")) not in (stock, recipe.guest_init_hash(user=agent))
    assert recipe.guest_init_hash(user=ImageUser()) == stock


def test_package_list_holds_what_the_guest_needs() -> None:
    needed = {"python3", "podman", "crun", "runc", "conmon", "netavark", "aardvark-dns", "passt",
              "slirp4netns", "uidmap", "fuse-overlayfs", "btrfs-progs", "util-linux", "mount", "kmod",
              "busybox-static", "nix-bin", "fish", "bash", "iproute2", "socat", "ca-certificates",
              "procps", "linux-image-amd64"}
    assert needed <= set(recipe.PACKAGES)
    assert len(set(recipe.PACKAGES)) == len(recipe.PACKAGES)


def test_users_script_creates_nixbld_and_dev() -> None:
    script = users_script()
    assert "groupadd -g 30000 nixbld" in script
    assert "useradd -m -u 1000 -g dev -d /home/dev -s /usr/bin/fish dev" in script
    assert "groupadd -g 1000 dev" in script and "apt-get clean" in script


@pytest.mark.parametrize(("files", "expected"), [
    ({"sources.list": "# c\ndeb http://mirror.example/debian bookworm main\n"}, "http://mirror.example/debian"),
    ({"sources.list": "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian/ bookworm main\n"},
     "http://m.example/debian"),
    ({"sources.list.d/debian.sources": "Types: deb\nURIs: http://deb.debian.org/debian-security\n\n"
                                       "Types: deb\nURIs: http://local.example/debian\nSuites: bookworm\n"},
     "http://local.example/debian"),
    ({"sources.list.d/x.list.disabled": "deb http://nope.example/debian bookworm main\n"},
     recipe.DEFAULT_MIRROR),
    ({}, recipe.DEFAULT_MIRROR),
])
def test_apt_mirror(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert apt_mirror((tmp_path / "sources.list", tmp_path / "sources.list.d")) == expected


@pytest.mark.parametrize("good", ["localhost/agentbox:latest", "agentbox", "localhost:5000/a/b:v1.2",
                                  "ghcr.io/x/y_z:1.0-rc"])
def test_check_tag_accepts(good: str) -> None:
    assert recipe.check_tag(good) == good


@pytest.mark.parametrize("bad", ["Localhost/Agentbox", "x:", "a@sha256:00", "", "a b", "a/:t"])
def test_check_tag_refuses(bad: str) -> None:
    with pytest.raises(InputError, match="invalid image tag"):
        recipe.check_tag(bad)


def test_cli_bad_tag_is_one_line_exit_2(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "image", "build", "--tag", "Not Valid"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "agentbox: invalid image tag 'Not Valid': expected NAME[:TAG] such as localhost/agentbox:latest "
        "(lowercase name components; a tag of letters, digits, '_', '.', '-')"]
    assert not (tmp_path / "cache").exists()


def _accounts_root(root: Path) -> None:
    """A root with the base image's accounts (the users script's result, trimmed)."""
    _debian_like_root(root, False)
    etc = root / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nnixbld1:x:999:30000::/var/empty:/usr/sbin/nologin\n"
                                "dev:x:1000:1000::/home/dev:/usr/bin/fish\n")
    (etc / "group").write_text("root:x:0:\nnixbld:x:30000:nixbld1\ndev:x:1000:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\ndev:!:19000:0:99999:7:::\n")
    (etc / "shadow").chmod(0o640)
    (etc / "gshadow").write_text("root:*::\ndev:!::\n")
    (etc / "subuid").write_text("dev:100000:65536\n")
    (etc / "subgid").write_text("dev:100000:65536\n")
    (root / "home/dev/.config/fish").mkdir(parents=True)
    (root / "home/dev/.config/fish/config.fish").write_text("# dev's\n")
    if os.geteuid() == 0:  # useradd -m made dev's home dev's
        for path in [root / "home/dev", *(root / "home/dev").rglob("*")]:
            os.lchown(path, 1000, 1000)


def test_install_makes_the_base_dev_account_the_image_user(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _accounts_root(root)
    agent = ImageUser(user="agent", uid=2000, gid=2001, workdir="/work")
    install_guest_init(root, recipe.guest_init_hash(user=agent), user=agent)
    etc = root / "etc"
    assert etc.joinpath("passwd").read_text().splitlines()[-1] == "agent:x:2000:2001::/home/agent:/usr/bin/fish"
    assert "nixbld1:x:999:30000:" in etc.joinpath("passwd").read_text()
    assert etc.joinpath("group").read_text().splitlines()[-1] == "agent:x:2001:"
    assert etc.joinpath("shadow").read_text().splitlines()[-1] == "agent:!:19000:0:99999:7:::"
    assert stat.S_IMODE(etc.joinpath("shadow").stat().st_mode) == 0o640
    for name in ("gshadow", "subuid", "subgid"):
        assert "dev:" not in etc.joinpath(name).read_text() and "agent:" in etc.joinpath(name).read_text()
    assert not (root / "home/dev").exists()
    assert (root / "home/agent/.config/fish/config.fish").read_text() == "# dev's\n"
    for xdg in agent.xdg_dirs().values():
        assert (root / xdg.lstrip("/")).is_dir()
        if os.geteuid() == 0:
            assert (os.stat(root / xdg.lstrip("/")).st_uid, os.stat(root / xdg.lstrip("/")).st_gid) == (2000, 2001)
    if os.geteuid() == 0:
        st = os.stat(root / "home/agent/.config/fish/config.fish")
        assert (st.st_uid, st.st_gid) == (2000, 2001)
    assert (root / "work").is_dir()
    assert (root / "etc/agentbox/image-user").read_text() == "user=agent\nuid=2000\ngid=2001\nworkdir=/work\n"
    from agentbox_guest_init.image_user import load

    assert load(root) == agent


@pytest.mark.parametrize(("user", "taken"), [
    (ImageUser(user="nixbld1"), "account nixbld1 (uid 999) already has that name or uid"),
    (ImageUser(user="agent", gid=30000), "group nixbld (gid 30000) already has that name or gid"),
    (ImageUser(user="root2", uid=1000, gid=1000), None),
], ids=["name of a system account", "gid of nixbld", "free"])
def test_install_refuses_an_image_user_that_collides_with_a_base_account(
        tmp_path: Path, user: ImageUser, taken: str | None) -> None:
    root = tmp_path / "root"
    _accounts_root(root)
    before = (root / "etc/passwd").read_text()
    if taken is None:
        install_guest_init(root, "0" * 64, user=user)
        assert (root / "etc/passwd").read_text().splitlines()[-1].startswith("root2:x:1000:1000:")
        return
    with pytest.raises(InputError, match=re.escape(taken)):
        install_guest_init(root, "0" * 64, user=user)
    assert (root / "etc/passwd").read_text() == before, "nothing is changed before the check"


def test_cli_image_user_options_refuse_bad_values_in_one_line(tmp_path: Path) -> None:
    for option, value, says in (("--user", "Root", "invalid user name 'Root'"), ("--uid", "0", "invalid uid 0"),
                                ("--gid", "x", "invalid gid 'x'"), ("--workdir", "/usr/work", "invalid workdir"),
                                ("--workdir", "work", "invalid workdir 'work'")):
        proc = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "image", "build", option, value],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0] and "expected" in lines[0], proc.stderr
