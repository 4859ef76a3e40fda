"""Nested rootless Podman in the guest (reference 12.2, all eight items), and the way its users
use it beyond them."""

import pytest

from enter_session import enter_identity

pytestmark = pytest.mark.vm

SOCKET_STATE = 'if test -S "$XDG_RUNTIME_DIR/podman/podman.sock"; then echo present; else echo absent; fi'
"""Whether dev's API socket exists, as a word (so it shares a shell with the checks beside it)."""
MAKE_IMAGE = ("set -e; d=$(mktemp -d); cp /bin/busybox $d/busybox; "
              "tar -C $d -cf - busybox | podman import --change 'CMD [\"/busybox\",\"sh\"]' - localhost/smoke-bb:latest")


@pytest.mark.krun_podman_too
def test_nested_rootless_podman_checklist(guest):
    m = guest
    # 1-2: the shell is dev (the user enter drops to); podman waits for prep, then reports rootless + btrfs
    assert enter_identity(m).user == m.image_user.user  # dev in the stock image
    m.wait_for_prep("podman", timeout=120)
    info = m.succeed("podman info --format '{{.Host.Security.Rootless}} {{.Store.GraphDriverName}}'", timeout=120)
    assert info.split() == ["true", "btrfs"]
    # 3: DOCKER_HOST points at the rootless socket, which does not exist yet (one shell: uid, the
    # variable, and whether the socket exists)
    uid, docker_host, socket = m.succeed(f"id -u; echo $DOCKER_HOST; {SOCKET_STATE}", timeout=30).splitlines()
    assert docker_host == f"unix:///run/user/{uid}/podman/podman.sock"
    assert socket == "absent"
    # 4: docker info starts the API socket and reports the same storage; podman --remote works over it
    assert m.succeed("docker info --format '{{.Store.GraphDriverName}}'", timeout=120).strip() == "btrfs"
    assert m.succeed(f"{SOCKET_STATE}; podman --remote --url \"$DOCKER_HOST\" info --format "
                     "'{{.Store.GraphDriverName}}'", timeout=60).split() == ["present", "btrfs"]
    # 5: /dev/net/tun; podman run and docker run of a locally made image; docker-compose answers
    m.succeed(f"set -e; test -c /dev/net/tun; {MAKE_IMAGE}", timeout=120)
    assert m.succeed("podman run --rm --network none localhost/smoke-bb /busybox echo hello", timeout=120).strip() == "hello"
    assert m.succeed("docker run --rm --network none localhost/smoke-bb /busybox echo hello", timeout=120).strip() == "hello"
    m.succeed("docker-compose version", timeout=60)
    # 6: images persist across a restart; state under the dev storage; Docker paths absent
    m.restart()
    m.wait_for_prep("podman", timeout=120)
    m.succeed("podman image exists localhost/smoke-bb", timeout=60)
    # one podman info for the graph root (6) and the graph options (8): a podman process costs seconds
    graph, options = m.succeed("podman info --format '{{.Store.GraphRoot}}\n{{.Store.GraphOptions}}'",
                               timeout=60).split("\n", 1)
    assert graph == f"{m.image_user.containers_storage}/storage"
    m.succeed("test ! -e /var/lib/docker && test ! -e /var/lib/containerd && test ! -e ~/.local/share/docker",
              timeout=30)
    # 7: prep status and log files where the reference says
    assert "state=ready" in m.succeed("test -f /run/agentbox/podman-prep.log && cat /run/agentbox/podman-prep.status",
                                      timeout=30)
    # 8: no fuse-overlayfs in the rootless setup
    m.fail("grep -ri fuse ~/.config/containers/storage.conf ~/.config/containers/containers.conf", timeout=30)
    assert "fuse" not in options


WEB_IMAGE = ("set -e; d=$(mktemp -d); cp /bin/busybox $d/busybox; mkdir $d/www; echo hello-web > $d/www/index.html; "
             "tar -C $d -cf - busybox www | podman import --change 'CMD [\"/busybox\",\"sh\"]' - localhost/smoke-web:latest")


@pytest.mark.krun_podman_too
def test_nested_podman_as_its_users_use_it(guest, host_http):
    """Beyond the reference's eight items: --init, detached containers through podman and docker,
    a user-defined network where containers reach each other by name, a published port, and a
    nested container reaching a server outside the guest."""
    m = guest
    m.wait_for_prep("podman")
    m.succeed(WEB_IMAGE, timeout=120)
    assert m.succeed("podman run --rm --init --network none localhost/smoke-web /busybox echo init-ok",
                     timeout=120).strip() == "init-ok"
    for cli in ("podman", "docker"):
        m.succeed(f"{cli} run -d --name {cli}-bg --network none localhost/smoke-web /busybox sleep 600", timeout=120)
        assert f"{cli}-bg" in m.succeed(f"{cli} ps --format '{{{{.Names}}}}'", timeout=60).split()
        # -t 0: the container's PID 1 (sleep) ignores SIGTERM, so any grace period is waited out in full
        m.succeed(f"{cli} stop -t 0 {cli}-bg && {cli} rm {cli}-bg", timeout=120)
        assert f"{cli}-bg" not in m.succeed(f"{cli} ps -a --format '{{{{.Names}}}}'", timeout=60).split()
    m.succeed("podman network create smoke-net", timeout=60)
    m.succeed("podman run -d --name web --network smoke-net localhost/smoke-web /busybox httpd -f -p 8080 -h /www",
              timeout=120)
    assert m.wait_until_succeeds("podman run --rm --network smoke-net localhost/smoke-web "
                                 "/busybox wget -qO- http://web:8080/", timeout=60).strip() == "hello-web"
    m.succeed("podman run -d --name pub -p 18081:8080 localhost/smoke-web /busybox httpd -f -p 8080 -h /www",
              timeout=120)
    assert m.wait_until_succeeds("busybox wget -qO- http://127.0.0.1:18081/", timeout=60).strip() == "hello-web"
    ip = host_http.outward_ip()  # a nested container's 10.0.2.2 is the guest itself (slirp4netns)
    url = f"http://{ip}:{host_http.serve(ip)}/"
    assert m.wait_until_succeeds(f"podman run --rm localhost/smoke-web /busybox wget -qO- {url}",
                                 timeout=60) == host_http.reply


STATUS = "/run/agentbox/podman-prep.status"
WRAPPER = ("printf '#!/bin/sh\\nexec agentbox-guest-init libkrun podman \"$@\"\\n' > /tmp/podman-wrapper && "
           "chmod 755 /tmp/podman-wrapper")
"""An agentbox compatibility wrapper (it names ``agentbox-guest-init libkrun podman``), which
``service-wait`` must never start as the API service."""


SERVICE_PIDS = "pgrep -u $(id -u) -f '^[^ ]*podman system service '"
"""dev's API service processes (rootless podman may re-exec itself, so one or two), not this shell."""


@pytest.mark.krun_podman_too
def test_podman_wait_and_service_wait(guest):
    """Item 7's user waits, run as dev in the guest:

    - ``libkrun podman wait`` returns once the prep is ready, and fails at once, naming the status
      file, when the prep never started (its status moved away for the call);
    - ``libkrun podman service-wait`` refuses a compatibility wrapper as the real podman, then
      starts the rootless API service as dev: its socket answers ``podman --remote``; a second call
      finds it live and starts no other."""
    m = guest
    m.succeed("agentbox-guest-init libkrun podman wait", timeout=180)
    assert "state=ready" in m.succeed(f"cat {STATUS}", timeout=30).splitlines()
    m.succeed(f"mv {STATUS} {STATUS}.aside", user="root", timeout=30)
    try:
        missing = m.execute("agentbox-guest-init libkrun podman wait", timeout=60)
    finally:
        m.succeed(f"mv {STATUS}.aside {STATUS}", user="root", timeout=30)
    assert missing.exit_status == 1, missing
    assert f"rootless Podman prep has not started; missing status at {STATUS}" in missing.stderr, missing.stderr

    uid = m.succeed("id -u", timeout=30).strip()
    sock = f"/run/user/{uid}/podman/podman.sock"
    m.fail(f"test -S {sock}", timeout=30)  # nothing started the API service yet
    m.succeed(WRAPPER, timeout=30)
    wrapped = m.execute("agentbox-guest-init libkrun podman service-wait", timeout=120,
                        env={"AGENTBOX_REAL_PODMAN": "/tmp/podman-wrapper"})
    assert wrapped.exit_status == 1, wrapped
    assert ("refusing to start Podman API service through compatibility wrapper /tmp/podman-wrapper"
            in wrapped.stderr), wrapped.stderr
    m.fail(f"test -S {sock}", timeout=30)

    m.succeed("agentbox-guest-init libkrun podman service-wait", timeout=180)
    assert m.succeed(f"stat -c %U {sock}", timeout=30).strip() == m.image_user.user
    service = m.succeed(SERVICE_PIDS, timeout=30).split()
    assert service, "no podman system service runs as dev"
    assert m.succeed(f"podman --remote --url unix://{sock} info --format '{{{{.Host.Security.Rootless}}}}'",
                     timeout=120).strip() == "true"
    m.succeed("agentbox-guest-init libkrun podman service-wait", timeout=60)
    assert m.succeed(SERVICE_PIDS, timeout=30).split() == service
