"""A throw-away Debian root made with debootstrap, for testing set-up on a fresh machine.

``FreshRoot(path, suite, mirror)`` makes a ``--variant=minbase`` root of a Debian
suite (plus ``ca-certificates``), copies a repo's working tree into it, and
runs commands inside it. Every command runs in its own mount and PID namespace
(``unshare --mount --pid --fork --kill-child``): the root is bind-mounted onto
itself with ``/proc``, ``/sys`` and ``/dev`` inside, made the namespace's root
with ``pivot_root`` (a plain ``chroot`` would do for most things, but the kernel
refuses ``unshare(CLONE_NEWUSER)`` to a chrooted process, and the unit tier
id-maps shares through a user namespace), and the host's root is unmounted.
So nothing mounted for a command outlives it, and no process started inside
outlives it either (PID 1 of the namespace ends, the kernel ends the rest).
``policy-rc.d`` forbids service starts. The host's resolv.conf and its CA bundle
(as ``PIP_CERT``, for hosts behind a TLS-intercepting proxy) are copied in, and
proxy variables passed through.

``destroy()`` lazily unmounts anything
left mounted under the root in reverse order, and deletes the root; it refuses
to delete while anything is still mounted under it.

Caching (``cache_dir``): debootstrap's downloaded packages and apt's archive
(``/var/cache/apt/archives``, bind-mounted) are kept per suite, so a rerun
downloads only what changed; the first run works from nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEBOOTSTRAP_SCRIPTS = Path("/usr/share/debootstrap/scripts")
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_CA_INSIDE = "/etc/ssl/certs/host-ca-certificates.crt"
PASSED_THROUGH = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "PIP_INDEX_URL")
COPY_EXCLUDED = (".venv", "results", "build", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis")

# Runs as PID 1 of the new namespaces: $1 the root, $2 the apt archive to bind (or ""), then the command.
# It waits for the command instead of exec'ing it, so that orphans inside are reaped.
ENTER = r"""
set -eu
root=$1 archives=$2
shift 2
mount --make-rprivate /
mount --rbind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
if [ -n "$archives" ]; then mount --bind "$archives" "$root/var/cache/apt/archives"; fi
mkdir -p "$root/.host-root"
cd "$root"
pivot_root . .host-root
umount -l /.host-root
rmdir /.host-root
set +e
chroot / "$@"
"""


def debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The host's Debian archive (``$AGENTBOX_DEBIAN_MIRROR`` first): the first ``deb`` source whose
    URI ends in ``/debian`` (one-line ``sources.list`` files and deb822 ``*.sources``), else
    deb.debian.org."""
    if os.environ.get("AGENTBOX_DEBIAN_MIRROR"):
        return os.environ["AGENTBOX_DEBIAN_MIRROR"].rstrip("/")
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list")),
             *sorted((sources / "sources.list.d").glob("*.sources"))]
    for file in files:
        try:
            text = file.read_text()
        except OSError:
            continue
        if file.suffix == ".sources":
            uris = []
            for stanza in re.split(r"\n\s*\n", text):
                fields = {k.lower(): v.strip() for k, v in re.findall(r"^([\w-]+):(.*)$", stanza, re.M)}
                if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
                    uris += fields.get("uris", "").split()
        else:
            uris = [m[1] for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M)]
        for uri in uris:
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def probe_mirror(mirror: str, suite: str, timeout: float = 5.0) -> str | None:
    """None when ``<mirror>/dists/<suite>/InRelease`` answers, else why not (one line)."""
    url = f"{mirror}/dists/{suite}/InRelease"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as reply:
            return None if reply.status == 200 else f"{url} answered {reply.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} unreachable: {getattr(exc, 'reason', exc)}"


def missing_prerequisite(suite: str) -> str | None:
    """What this host lacks to make and enter a root of ``suite`` (None: nothing)."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, mounts and namespaces)"
    if shutil.which("debootstrap") is None:
        return "needs debootstrap: apt-get install debootstrap"
    if not (DEBOOTSTRAP_SCRIPTS / suite).exists():
        return f"this debootstrap has no script for {suite}: install a newer debootstrap"
    if not DEBIAN_KEYRING.exists():
        return f"needs {DEBIAN_KEYRING}: apt-get install debian-archive-keyring"
    for tool in ("unshare", "pivot_root"):
        if shutil.which(tool) is None:
            return f"needs {tool}: apt-get install util-linux"
    return None


def host_ca_bundle() -> Path | None:
    """The CA bundle this host's pip trusts (``PIP_CERT``, ``SSL_CERT_FILE``, else Debian's)."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def working_tree_files(repo: Path) -> list[Path]:
    """The repo's files as a fresh clone would have them plus local edits: tracked and untracked,
    not ignored (``git ls-files``), or everything but caches and build output without git."""
    if (repo / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode()
        return sorted({Path(name) for name in out.split("\0") if name and os.path.lexists(repo / name)})
    return sorted(p.relative_to(repo) for p in repo.rglob("*")
                  if not p.is_dir() and not set(p.relative_to(repo).parts) & {*COPY_EXCLUDED, "__pycache__"})


class FreshRoot:
    """One debootstrapped root; see the module text."""

    def __init__(self, path: Path, suite: str, mirror: str, cache_dir: Path | None = None,
                 log_dir: Path | None = None) -> None:
        self.path, self.suite, self.mirror = path, suite, mirror
        self.cache = cache_dir / suite if cache_dir else None
        self.log_dir = log_dir

    def debootstrap(self, timeout: float = 1200) -> None:
        """Make the minimal root (``--variant=minbase --include=ca-certificates``) and prepare it to be entered."""
        argv = ["debootstrap", "--variant=minbase", "--include=ca-certificates"]
        if self.cache:
            (self.cache / "debootstrap").mkdir(parents=True, exist_ok=True)
            argv.append(f"--cache-dir={self.cache / 'debootstrap'}")
        argv += [self.suite, str(self.path), self.mirror]
        # its own mount namespace: whatever debootstrap mounts into the target goes away with it
        self._run(["unshare", "--mount", "--pid", "--fork", "--kill-child", *argv], "debootstrap", timeout)
        resolv = Path("/etc/resolv.conf")
        if resolv.exists():
            (self.path / "etc/resolv.conf").unlink(missing_ok=True)
            shutil.copy(resolv.resolve(), self.path / "etc/resolv.conf")
        policy = self.path / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\n# fresh-setup test root: no service starts\nexit 101\n")
        policy.chmod(0o755)
        ca = host_ca_bundle()
        if ca:
            shutil.copy(ca, self.path / HOST_CA_INSIDE.lstrip("/"))

    def copy_repo(self, repo: Path, inside: str = "/opt/agentbox-harness") -> str:
        """Copy the repo's working tree (see ``working_tree_files``) to ``inside``; return that path."""
        target = self.path / inside.lstrip("/")
        for rel in working_tree_files(repo):
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = repo / rel
            if source.is_symlink():
                dest.symlink_to(os.readlink(source))
            else:
                shutil.copy2(source, dest)
        return inside

    def environment(self) -> dict[str, str]:
        """The environment commands inside get: a clean login-like one plus proxies and the host's CAs."""
        env = {"PATH": INSIDE_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
               "DEBIAN_FRONTEND": "noninteractive"}
        env |= {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
        if (self.path / HOST_CA_INSIDE.lstrip("/")).exists():
            env["PIP_CERT"] = HOST_CA_INSIDE
        return env

    def run(self, command: str, stage: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run ``sh -c command`` inside the root (as root, in its own namespaces); fails on a non-zero exit."""
        archives = ""
        if self.cache:
            (self.cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
            archives = str(self.cache / "archives")
        env_args = [f"{k}={v}" for k, v in self.environment().items()]
        argv = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", ENTER, "enter",
                str(self.path), archives, "/usr/bin/env", "-i", *env_args, "sh", "-c", command]
        return self._run(argv, stage, timeout)

    def _run(self, argv: list[str], stage: str, timeout: float) -> subprocess.CompletedProcess[str]:
        log = self.log_dir / f"fresh-setup-{self.suite}-{stage}.log" if self.log_dir else None
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, LANG="C.UTF-8"), start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._end_session(proc.pid)
            out, _ = proc.communicate()
            out += f"\n[{stage} timed out after {timeout:.0f}s]"
        except BaseException:  # interrupted (Ctrl-C): the stage must not outlive the test
            self._end_session(proc.pid)
            proc.wait()
            raise
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(out)
        done = subprocess.CompletedProcess(argv, proc.returncode, out, "")
        if proc.returncode != 0:
            where = f"; full log {log}" if log else ""
            raise AssertionError(f"{stage} in the {self.suite} root exited {proc.returncode}{where}:\n{out[-4000:]}")
        return done

    @staticmethod
    def _end_session(pid: int) -> None:
        """SIGKILL the process group of a stage that is still running (its leader, unshare, not yet
        reaped, so the id is still ours); with --kill-child the namespace's PID 1 and so everything
        inside follow."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)

    def mounts_under(self) -> list[str]:
        """Mount points at or under the root in this (the host's) mount namespace, in mount order."""
        prefix = str(self.path)
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
        return found

    def destroy(self) -> None:
        """Unmount what is left (lazily, reverse order) and delete the root; raise if a mount stays.

        Nothing runs inside by then: every stage ran in its own PID namespace, which ended with it."""
        for point in reversed(self.mounts_under()):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        for _ in range(50):
            if not self.mounts_under():
                break
            time.sleep(0.1)
        left = self.mounts_under()
        if left:
            raise RuntimeError(f"still mounted under {self.path}, not deleting it: {left}")
        if self.path.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.path)], check=True)
