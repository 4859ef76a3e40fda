"""Build the Debian root of the guest image (the base stage).

``debootstrap --variant=minbase`` from the mirror apt uses, then ``apt-get
install --no-install-recommends`` inside the root (debootstrap's --include does
not resolve virtual packages), then users: ``dev`` (uid 1000) and the
``nixbld`` group with its builders. Output of every step goes to a log file;
a failure names the step and shows the log tail.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import AgentboxError
from runtime.images import recipe

STEP_TIMEOUT_S = 1800.0


def apt_mirror(sources: Sequence[Path] = (Path("/etc/apt/sources.list"),
                                          Path("/etc/apt/sources.list.d"))) -> str:
    """The Debian mirror this host's apt uses (deb822 or one-line format)."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files += sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources"))
        elif src.is_file():
            files.append(src)
    for f in files:
        text = f.read_text(errors="replace")
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            if "security" not in m.group(1):
                return m.group(1).rstrip("/")
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", text, re.M):
            if "security" not in m.group(1):
                return m.group(1).rstrip("/")
    return recipe.DEFAULT_MIRROR


def log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def step(name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run one build step, output appended to ``log``; progress on stderr."""
    started = time.monotonic()
    print(f"agentbox image: {name} ...", file=sys.stderr, flush=True)
    with open(log, "ab") as out:
        out.write(f"\n==> {name}: {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env, timeout=STEP_TIMEOUT_S)
        except FileNotFoundError:
            raise AgentboxError(f"image build step '{name}' needs {argv[0]}, which is not installed; "
                                "run scripts/setup.sh") from None
        except subprocess.TimeoutExpired:
            raise AgentboxError(f"image build step '{name}' timed out after {STEP_TIMEOUT_S:.0f}s; "
                                f"log {log}:\n{log_tail(log)}") from None
    if proc.returncode != 0:
        raise AgentboxError(f"image build step '{name}' failed with status {proc.returncode}; "
                            f"log {log}:\n{log_tail(log)}")
    print(f"agentbox image: {name} done in {time.monotonic() - started:.1f}s", file=sys.stderr,
          flush=True)


@contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev inside ``root`` for the apt step; always unmounted."""
    mounted: list[Path] = []
    try:
        for fstype, src, target, opts in (("proc", "proc", "proc", None), ("sysfs", "sys", "sys", None),
                                          (None, "/dev", "dev", "bind"), (None, "/dev/pts", "dev/pts", "bind")):
            dest = root / target
            dest.mkdir(parents=True, exist_ok=True)
            argv = ["mount"] + (["-t", fstype] if fstype else []) + (["-o", opts] if opts else [])
            subprocess.run(argv + [src, str(dest)], check=True, timeout=60, capture_output=True)
            mounted.append(dest)
        yield
    finally:
        for dest in reversed(mounted):
            subprocess.run(["umount", "-l", str(dest)], check=False, timeout=60, capture_output=True)


def build_root(root: Path, log: Path) -> None:
    """Create the full Debian root at ``root`` (which must not exist yet)."""
    mirror = apt_mirror()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    step("debootstrap minbase", ["debootstrap", "--variant=minbase", recipe.SUITE, str(root), mirror],
         log, env)
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    (root / "etc/apt/apt.conf.d/90agentbox").write_text(
        'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n')
    with chroot_mounts(root):
        step("apt-get update", ["chroot", str(root), "apt-get", "update", "-q"], log, env)
        step(f"apt-get install ({len(recipe.PACKAGES)} packages)",
             ["chroot", str(root), "apt-get", "install", "-y", "-q", *recipe.PACKAGES], log, env)
        users = (f"getent group nixbld >/dev/null || groupadd -g {recipe.NIXBLD_GID} nixbld; "
                 f"for i in $(seq 1 {recipe.NIXBLD_USERS}); do id nixbld$i >/dev/null 2>&1 || "
                 f"useradd -r -M -N -g nixbld -G nixbld -d /var/empty -s /usr/sbin/nologin nixbld$i; done; "
                 f"id dev >/dev/null 2>&1 || useradd -m -u {recipe.DEV_UID} -U -s /usr/bin/fish dev; "
                 "apt-get clean; rm -rf /var/lib/apt/lists/*")
        step("users and cleanup", ["chroot", str(root), "sh", "-c", users], log, env)
    policy.unlink()
    (root / "etc/machine-id").write_text("")
    for d in ("workspace", "nix/store", "nix/var/nix"):
        (root / d).mkdir(parents=True, exist_ok=True)
