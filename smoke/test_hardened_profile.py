"""The hardened profile (opt-in: ``hardened=True``), in the guest and in container mode: each
property proven by trying what it forbids, as dev.

- a read-only root: writing to ``/`` fails with EROFS (even as root);
- no mounts: dev's ``mount`` is refused, and so is the way around it (the guest: a user
  namespace of dev's own; container mode: root, which has no capabilities);
- no new privileges: a setuid-root binary runs with dev's ids;
- ``dmesg`` is restricted: dev cannot read the kernel log;
- the scratch places (``/var/run``, ``/var/log``, ``/var/log/supervisor``) are tmpfs of a fixed
  size: a write past it fails with ENOSPC;
- exceptions are additive: ``[security.exceptions.writable-root]`` in agentbox.toml re-allows
  writing the root, and only that.

One machine per mode for the module (``shared_machine_factory``)."""

from pathlib import Path

import pytest

from agentbox_guest_init.hardened_profile import SCRATCH
from agentbox_runtime.backend_caps import caps
from agentbox_runtime.config import default_config_path

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module", params=["guest", "container"])
def hardened(request, shared_machine_factory, agentbox_session):
    if request.param == "guest":
        backend = agentbox_session.backend
        can = caps(backend)
        if not (can.vm and can.hardened):
            pytest.skip(f"the guest profile needs a VM backend with the hardened capability, not {backend}")
    else:
        backend = "container"
    return shared_machine_factory(backend, "hardened", hardened=True)


def test_the_root_is_read_only(hardened):
    out = hardened.execute("touch /hardened-probe", user="root")
    assert not out.ok and "Read-only file system" in out.stderr, out.stderr
    mark = f"{hardened.image_user.workdir}/.hardened-writable"
    hardened.succeed(f"touch /tmp/writable $HOME/writable {mark} && rm {mark}")


def test_mounting_is_refused(hardened, request):
    """dev cannot mount. In the guest not even in a user namespace of its own (the profile's seccomp
    filter refuses namespaces); in container mode not even root can (no capabilities), while
    Podman's default seccomp profile leaves dev its own user namespace, whose mounts reach nothing
    outside it."""
    out = hardened.execute("mount -t tmpfs none /mnt")
    assert not out.ok, out.stdout + out.stderr
    if request.node.callspec.params["hardened"] == "guest":
        out = hardened.execute("unshare -rm sh -c 'mount -t tmpfs none /mnt && echo mounted'")
    else:
        out = hardened.execute("mount -t tmpfs none /mnt && echo mounted", user="root")
    assert not out.ok and "mounted" not in out.stdout, out.stdout + out.stderr


SETUID_ID = ("d=/run/suid-probe; mkdir -p $d && mount -t tmpfs -o mode=755 tmpfs $d 2>/dev/null || d=/tmp; "
             "cp /usr/bin/id $d/suid-id && chmod 4755 $d/suid-id && echo $d/suid-id")
"""A setuid-root copy of id(1), on a tmpfs that honours setuid where root may mount one (the
guest), else on /tmp."""


def test_a_setuid_binary_does_not_raise_privileges(hardened):
    suid_id = hardened.succeed(SETUID_ID, user="root").strip()
    assert hardened.succeed(f"stat -c %a:%u {suid_id}").strip() == "4755:0"
    assert hardened.succeed(f"{suid_id} -u").strip() == hardened.succeed("id -u").strip() != "0"
    assert "NoNewPrivs:\t1" in hardened.succeed("cat /proc/self/status")


def test_dev_cannot_read_the_kernel_log(hardened):
    out = hardened.execute("dmesg")
    assert not out.ok and "Operation not permitted" in out.stderr, out.stdout[-300:] + out.stderr


def test_the_scratch_places_are_size_limited_tmpfs(hardened):
    """Each scratch place (``/var/run`` resolved: ``/run`` in our image) is a tmpfs of its size, and
    the limit holds: writing one MiB more than it fails."""
    mounts = [line.split() for line in hardened.succeed("cat /proc/mounts", timeout=30).splitlines()]
    for path, size in SCRATCH:
        real = hardened.succeed(f"readlink -f {path}", timeout=30).strip()
        fstypes = [fields[2] for fields in mounts if fields[1] == real]
        assert fstypes and fstypes[-1] == "tmpfs", (path, real, fstypes)
        blocks, block_size = hardened.succeed(f"stat -f -c '%b %S' {real}", timeout=30).split()
        assert int(blocks) * int(block_size) == size, (path, blocks, block_size)
    limit = dict(SCRATCH)["/var/log/supervisor"]
    out = hardened.execute(f"head -c {limit + (1 << 20)} /dev/zero > /var/log/supervisor/fill", user="root",
                           timeout=60)
    hardened.succeed("rm -f /var/log/supervisor/fill", user="root", timeout=30)
    assert not out.ok and "No space left on device" in out.stderr, out.stderr


def grant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Point AGENTBOX_CONFIG at the config in force plus ``[security.exceptions.<name>]``."""
    current = default_config_path()
    text = current.read_text() if current.is_file() else ""
    cfg = tmp_path / "agentbox.toml"
    cfg.write_text(f'{text}\n[security.exceptions.{name}]\nreason = "smoke: both sides of the exception"\n')
    monkeypatch.setenv("AGENTBOX_CONFIG", str(cfg))


def root_mount_options(machine) -> set[str]:
    """The options of the mount at ``/`` (the last one: what a path resolves through)."""
    mounts = [line.split() for line in machine.succeed("cat /proc/mounts", timeout=30).splitlines()]
    return set([fields[3] for fields in mounts if fields[1] == "/"][-1].split(","))


def test_an_exception_in_config_re_allows_one_thing(hardened, request, tmp_path, monkeypatch):
    """Both sides, one mode at a time: the module's hardened machine (no exception) has a read-only
    root that refuses a write; a machine started with ``[security.exceptions.writable-root]`` in
    agentbox.toml has a writable root, while the rest of the profile stays (no mounts, no new
    privileges, the scratch tmpfs). In the guest root then writes ``/``; in container mode the write
    is no longer EROFS but still EACCES: root there has no capabilities, so not CAP_DAC_OVERRIDE."""
    assert "ro" in root_mount_options(hardened)
    refused = hardened.execute("touch /hardened-probe", user="root", timeout=30)
    assert not refused.ok and "Read-only file system" in refused.stderr, refused.stderr
    grant(tmp_path, monkeypatch, "writable-root")
    guest = request.node.callspec.params["hardened"] == "guest"
    if guest:
        excepted = request.getfixturevalue("microvm_factory")("excepted", hardened=True)
    else:
        excepted = request.getfixturevalue("shared_machine_factory")("container", "excepted", hardened=True)
    monkeypatch.undo()
    assert "rw" in root_mount_options(excepted)
    if guest:
        excepted.succeed("touch /hardened-probe && rm /hardened-probe", user="root", timeout=30)
    else:
        allowed = excepted.execute("touch /hardened-probe", user="root", timeout=30)
        assert not allowed.ok and "Permission denied" in allowed.stderr, allowed.stderr
    assert "NoNewPrivs:\t1" in excepted.succeed("cat /proc/self/status", timeout=30)
    assert not excepted.execute("mount -t tmpfs none /mnt", timeout=30).ok
    assert excepted.succeed("stat -f -c %T /var/log", timeout=30).strip() == "tmpfs"
