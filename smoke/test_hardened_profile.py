"""The hardened profile (opt-in: ``hardened=True``), in the guest and in container mode: each
property proven by trying what it forbids, as dev.

- a read-only root: writing to ``/`` fails with EROFS (even as root);
- no mounts: dev's ``mount`` is refused, and so is the way around it (the guest: a user
  namespace of dev's own; container mode: root, which has no capabilities);
- no new privileges: a setuid-root binary runs with dev's ids;
- ``dmesg`` is restricted: dev cannot read the kernel log.

One machine per mode for the module (``shared_machine_factory``)."""

import pytest

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module", params=["guest", "container"])
def hardened(request, shared_machine_factory, agentbox_session):
    if request.param == "guest":
        backend = agentbox_session.backend
        if backend not in ("qemu", "krun-direct"):
            pytest.skip(f"the guest profile needs the qemu or krun-direct backend, not {backend}")
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
