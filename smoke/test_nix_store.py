"""The /nix store on the persistent disk: prep, daemon, validity across restarts (items 4 and 6)."""

import pytest

pytestmark = pytest.mark.vm


@pytest.mark.krun_podman_too
def test_nix_store_content_survives_restart_and_stays_valid(guest):
    m = guest
    m.wait_for_prep("nix", timeout=120)
    m.succeed("mount | grep -q ' /nix type overlay'", timeout=30)
    m.succeed("test -S /nix/var/nix/daemon-socket/socket", timeout=30)
    path = m.succeed("echo smoke-$RANDOM > /tmp/f && nix-store --add /tmp/f", timeout=120).strip()
    assert path.startswith("/nix/store/")
    m.succeed(f"nix-store --check-validity {path}", timeout=60)
    m.restart()
    m.wait_for_prep("nix", timeout=120)
    m.succeed(f"test -f {path} && nix-store --check-validity {path}", timeout=60)
    m.succeed("nix-store --verify --check-contents", timeout=300, user="root")
