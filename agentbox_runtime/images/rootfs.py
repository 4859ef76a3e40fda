"""Build the Debian root of the guest image (the base stage).

``debootstrap --variant=minbase`` from the mirror apt uses, then ``apt-get
install --no-install-recommends`` inside the root (debootstrap's ``--include``
does not resolve virtual packages such as podman's ``container-network-stack``),
then users: ``dev`` (uid/gid 1000, home /home/dev, shell fish) and the
``nixbld`` group (gid 30000) with its builders. /proc, /sys and /dev are
mounted into the root only for the apt step and always unmounted. Output of
every step goes to the build log; a failure names the step and shows the log
tail.

The content of this file is part of the recipe hash: editing it rebuilds the base.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.images import recipe
from agentbox_runtime.images.steps import step

MOUNT_TIMEOUT_S = 60.0
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
APT_CONF = 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'


def apt_mirror(sources: Sequence[Path] = (Path("/etc/apt/sources.list"),
                                          Path("/etc/apt/sources.list.d"))) -> str:
    """The Debian mirror this host's apt uses (one-line or deb822 format).

    Security archives are skipped; with nothing found the default is
    http://deb.debian.org/debian."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files += sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources"))
        elif src.is_file():
            files.append(src)
    for f in files:
        text = f.read_text(errors="replace")
        uris: list[str] = re.findall(r"^URIs:\s*(\S+)", text, re.M)
        uris += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", text, re.M)
        for uri in uris:
            if "security" not in uri:
                return uri.rstrip("/")
    return recipe.DEFAULT_MIRROR


@contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys, /dev and /dev/pts inside ``root``; always unmounted afterwards."""
    mounted: list[Path] = []
    try:
        for fstype, src, target in (("proc", "proc", "proc"), ("sysfs", "sys", "sys"),
                                    (None, "/dev", "dev"), (None, "/dev/pts", "dev/pts")):
            dest = root / target
            dest.mkdir(parents=True, exist_ok=True)
            argv = ["mount", *(["-t", fstype] if fstype else ["--bind"]), src, str(dest)]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S,
                                  check=False)
            if proc.returncode != 0:
                raise AgentboxError(f"image build: failed to mount {src} at {dest}: {proc.stderr.strip()}")
            mounted.append(dest)
        yield
    finally:
        for dest in reversed(mounted):
            subprocess.run(["umount", "-l", str(dest)], capture_output=True, timeout=MOUNT_TIMEOUT_S,
                           check=False)


def users_script() -> str:
    """Shell run in the root after apt: nixbld group and builders, the dev user, apt cleanup."""
    gid, n, uid = recipe.NIXBLD_GID, recipe.NIXBLD_USERS, recipe.DEV_UID
    return (f"set -e; getent group nixbld >/dev/null || groupadd -g {gid} nixbld; "
            f"for i in $(seq 1 {n}); do id nixbld$i >/dev/null 2>&1 || "
            f"useradd -r -M -N -g nixbld -G nixbld -d /var/empty -s /usr/sbin/nologin nixbld$i; done; "
            f"getent group dev >/dev/null || groupadd -g {uid} dev; "
            f"id dev >/dev/null 2>&1 || useradd -m -u {uid} -g dev -d /home/dev -s /usr/bin/fish dev; "
            "apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin")


def build_root(root: Path, log: Path) -> None:
    """Create the full Debian root at ``root`` (which must not exist yet)."""
    mirror = apt_mirror()
    # INITRD=No: the kernel's postinst hook skips update-initramfs (minutes under
    # load); the qemu backend builds its own small initramfs from the modules.
    env = {"PATH": CHROOT_PATH, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C", "HOME": "/root",
           "INITRD": "No"}
    step(f"debootstrap {recipe.SUITE} minbase from {mirror}",
         ["debootstrap", "--variant=minbase", recipe.SUITE, str(root), mirror], log, env)
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")  # no service starts inside the chroot
    policy.chmod(0o755)
    (root / "etc/apt/apt.conf.d/90agentbox").write_text(APT_CONF)
    with chroot_mounts(root):
        step("apt-get update", ["chroot", str(root), "apt-get", "update", "-q"], log, env)
        step(f"apt-get install ({len(recipe.PACKAGES)} packages)",
             ["chroot", str(root), "apt-get", "install", "-y", "-q", "--no-install-recommends",
              *recipe.PACKAGES], log, env)
        step("users and apt cleanup", ["chroot", str(root), "sh", "-c", users_script()], log, env)
    policy.unlink()
    (root / "etc/machine-id").write_text("")
    for d in ("workspace", "nix/store", "nix/var/nix"):
        (root / d).mkdir(parents=True, exist_ok=True)
