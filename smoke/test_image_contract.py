"""Image contract: who the shell is, where it starts, what the image carries (checklist item 7).

The checks only look, so they share one guest (``shared_microvm``: one boot for the module,
reset between tests)."""

import pytest

pytestmark = pytest.mark.vm

BASE_TOOLS = ("python3", "podman", "nix-store", "nix-daemon", "btrfs", "fish", "bash", "busybox",
              "fuse-overlayfs", "newuidmap", "blkid", "docker-compose", "agentbox-guest-init")


def test_shell_user_is_dev_and_owns_workspace_files(shared_microvm, shared_workspace):
    microvm, workspace = shared_microvm, shared_workspace
    assert microvm.succeed("id -un", timeout=30).strip() == "dev"
    uid = int(microvm.succeed("id -u", timeout=30))
    gid = int(microvm.succeed("id -g", timeout=30))
    assert uid != 0
    st = workspace.path.stat()
    assert (uid, gid) == (st.st_uid, st.st_gid), "dev must map to the owner of the host workspace"
    microvm.succeed("echo from-guest > /workspace/owned.txt", timeout=30)
    made = (workspace.path / "owned.txt").stat()
    assert (made.st_uid, made.st_gid) == (uid, gid)


def test_home_and_xdg_dirs_exist_and_belong_to_dev(shared_microvm):
    microvm = shared_microvm
    out = microvm.succeed('for d in "$HOME" "$XDG_CONFIG_HOME" "$XDG_DATA_HOME" "$XDG_STATE_HOME" '
                          '"$XDG_CACHE_HOME" "$TMPDIR"; do stat -c "%U %n" "$d"; done', timeout=30)
    lines = out.strip().splitlines()
    assert len(lines) == 6
    assert all(line.startswith("dev /home/dev") for line in lines), out


def test_working_directory_is_workspace(shared_microvm):
    microvm = shared_microvm
    cwd = microvm.succeed("readlink /proc/$(pgrep -f 'agentbox-guest-init agent' | head -n1)/cwd",
                          timeout=30, user="root").strip()
    assert cwd == "/workspace"
    assert microvm.succeed("pwd", timeout=30).strip() == "/workspace"


def test_base_tools_present(shared_microvm):
    microvm = shared_microvm
    missing = [t for t in BASE_TOOLS if not microvm.execute(["sh", "-c", f"command -v {t}"], timeout=30).ok]
    assert missing == []
