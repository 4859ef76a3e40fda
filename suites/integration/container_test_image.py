"""A minimal sidecar-capable test image built from the host's own binaries.

Used by the container-mode integration tests when ``localhost/agentbox:latest``
is not built yet (or ``AGENTBOX_TEST_IMAGE`` names another image). It holds
what the sidecar contract of reference 8.3 needs: Debian's ``nix`` (with its
libraries), bash, socat, busybox, ``/nix/store``, and the two in-image scripts
``/bin/agentbox-nix-sidecar-entrypoint`` and ``/bin/agentbox-sidecar-proxy``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

TAG = "localhost/agentbox-ctmode-test:latest"
HOST_BINARIES = ("/usr/bin/nix", "/bin/bash", "/usr/bin/socat", "/bin/busybox")
BUSYBOX_APPLETS = ("sh", "mktemp", "seq", "sleep", "cat", "ls", "mkdir", "tail", "kill", "id",
                   "echo", "test", "rm", "env", "grep", "awk", "touch", "stat", "true", "false")

FILES = Path(__file__).resolve().parents[2] / "agentbox_runtime" / "images" / "files"
PROXY = (FILES / "agentbox-sidecar-proxy").read_text()
ENTRYPOINT = (FILES / "agentbox-nix-sidecar-entrypoint").read_text()


def _libs(binary: str) -> list[str]:
    # ldd exits 1 for a static binary ("not a dynamic executable"): no libraries
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    return [w for line in out.splitlines() for w in line.split() if w.startswith("/")]


def _populate(root: Path) -> None:
    for d in ("bin", "usr/bin", "usr/lib/nix", "etc/nix", "nix/store", "nix/var/nix",
              "tmp", "root", "home/dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    for binary in HOST_BINARIES:
        for path in (binary, *_libs(binary)):
            dest = root / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), dest)
    for lib in Path("/usr/lib/nix").glob("*.so"):
        shutil.copy2(lib, root / "usr/lib/nix" / lib.name)
    for name in ("nix-daemon", "nix-store", "nix-build", "nix-env", "nix-hash"):
        (root / "usr/bin" / name).symlink_to("nix")
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/nix/nix.conf").write_text("sandbox = false\nbuild-users-group =\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                     "dev:x:1000:1000:dev:/home/dev:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\ndev:x:1000:\n")
    for name, text in (("agentbox-sidecar-proxy", PROXY),
                       ("agentbox-nix-sidecar-entrypoint", ENTRYPOINT)):
        (root / "bin" / name).write_text(text)
        (root / "bin" / name).chmod(0o755)


def build_test_image(tag: str = TAG, rebuild: bool = False) -> str:
    """Build the test image with buildah (kept and reused unless ``rebuild``); its tag."""
    exists = subprocess.run(["podman", "image", "exists", tag], capture_output=True)
    if exists.returncode == 0 and not rebuild:
        return tag
    def buildah(*args: str) -> str:
        return subprocess.run(["buildah", *args], capture_output=True, text=True, check=True,
                              timeout=300).stdout.strip()
    ctr = buildah("from", "scratch")
    try:
        root = Path(buildah("mount", ctr))
        _populate(root)
        buildah("umount", ctr)
        buildah("config", "--env", "PATH=/usr/bin:/bin", "--cmd", "/bin/bash", ctr)
        buildah("commit", "--quiet", ctr, tag)
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True, check=False)
    return tag
