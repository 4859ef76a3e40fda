"""Upstream crun, fetched from Debian's source archive and built ``--with-libkrun`` (cached).

``python -m suites.standins.crun.build`` prints the path of a crun runtime for
``podman run --runtime``: a real crun with its krun handler, whose ``libkrun.so.1`` is the
QEMU-backed stand-in of ``suites/standins/libkrun``::

    podman run --runtime "$(.venv/bin/python -m suites.standins.crun.build)" \\
        --annotation run.oci.handler=krun IMAGE COMMAND

Steps, each cached under ``$XDG_CACHE_HOME/agentbox/crun`` (default ``~/.cache``) and done by
one process at a time (an ``flock``, so parallel test workers wait instead of building twice):

1. **Source** (:func:`fetch_source`): ``apt-get source --download-only --tar-only crun`` with a
   private apt configuration (its own sources list with one ``deb-src`` line for
   :data:`DEFAULT_SUITE`, lists and cache dirs under the cache dir, removed afterwards): the
   host's apt configuration and state are never touched. Debian's ``crun_<version>.orig.tar.gz``
   is upstream's release tarball; its SHA-256 is checked against the one apt printed from the
   signed index.
2. **Build** (:func:`build_crun`): ``./configure --with-libkrun --disable-criu
   CPPFLAGS=-I<suites/standins/libkrun>`` (this project's own ``libkrun.h``: crun's configure
   only checks that the header exists, its handler dlopens ``libkrun.so.1``), then ``make crun``.
   Cached by the tarball's hash, the header and this recipe. Build dependencies come from
   ``scripts/setup.sh``.
3. **Runtime** (:func:`runtime`): a wrapper script named ``crun`` that puts the stand-in first
   on ``LD_LIBRARY_PATH`` as ``libkrun.so.1`` and sets ``KRUN_STANDIN_CRUN=1`` (which makes the
   stand-in serve crun's handler, ``crun_bridge.c``). On a host with the hybrid cgroup layout
   (cgroup2 at ``/sys/fs/cgroup/unified`` with controllers), which crun refuses, crun runs in a
   mount namespace of its own without that mount: on the cgroup v1 hierarchies.

Failures outside this project's control (no apt, no Debian keyring, no network to the archive,
missing build dependencies, a compiler error elsewhere in crun) raise :class:`CrunUnavailable`;
a failure that points at this project's header or stand-in raises :class:`CrunBuildBroken`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agentbox_runtime.hostcheck.parsers import cgroup_layout
from agentbox_runtime.retry import WaitTimeout, retry

HERE = Path(__file__).resolve().parent
HEADER_DIR = HERE.parent / "libkrun"
HEADER = HEADER_DIR / "libkrun.h"
DEFAULT_SUITE = "trixie"
"""Debian 13, whose crun is 1.21 (Debian 12's, 1.8.1, predates the handler this project reads)."""
ENV_SUITE = "AGENTBOX_CRUN_SUITE"
MIRROR = "http://deb.debian.org/debian"
ENV_MIRROR = "AGENTBOX_DEBIAN_MIRROR"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
CONFIGURE_ARGS = ("--with-libkrun", "--disable-criu")
RECIPE = "1"
"""Bump when the build steps change, so cached binaries are rebuilt."""
LOCK_TIMEOUT_S = 3600.0
APT_TIMEOUT_S = 600
CONFIGURE_TIMEOUT_S = 900
MAKE_TIMEOUT_S = 3600
PASS_ENV = ("XDG_CACHE_HOME", "XDG_RUNTIME_DIR", "AGENTBOX_QEMU_ACCEL")
"""Variables of the process writing the wrapper that the wrapper sets for crun (Podman gives its
runtime a small environment): where the stand-in's VMM side keeps its cache and sockets."""
UNIFIED = Path("/sys/fs/cgroup/unified")


class CrunUnavailable(RuntimeError):
    """crun cannot be fetched or built here for a reason outside this project (the message says which)."""


class CrunBuildBroken(RuntimeError):
    """The build failed where this project is at fault: its ``libkrun.h`` or stand-in."""


@dataclass(frozen=True)
class Source:
    """Upstream's release tarball as Debian's archive serves it."""

    path: Path
    version: str
    sha256: str
    suite: str


@dataclass(frozen=True)
class CrunBuild:
    """A crun binary built ``--with-libkrun``."""

    binary: Path
    version_text: str  # ``crun --version``
    source: Source
    seconds: float  # how long this call took (the build itself, or finding it cached)
    cached: bool

    @property
    def version(self) -> str:
        """The release (``1.21``) from ``crun --version``."""
        m = re.search(r"crun version (\S+)", self.version_text)
        return m[1] if m else "unknown"


@dataclass(frozen=True)
class Runtime:
    """The ``--runtime`` path (the wrapper), the crun it runs and the stand-in it loads."""

    wrapper: Path
    crun: CrunBuild
    standin: Path
    hides_unified_cgroup: bool


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/agentbox/crun`` (default ``~/.cache/agentbox/crun``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agentbox" / "crun"


@contextlib.contextmanager
def locked(timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the cache's exclusive lock (waiting at most ``timeout`` for another builder)."""
    top = cache_dir()
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def taken(_last_try: bool) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    try:
        try:
            retry(taken, timeout=timeout, interval=1.0, describe=lambda: f"another process holds {top / 'lock'}")
        except WaitTimeout as exc:
            raise CrunUnavailable(f"waiting for the crun build lock: {exc}") from None
        yield
    finally:
        os.close(fd)


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(argv: list[str], *, cwd: Path | None = None, timeout: float, log: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; its output is returned (and appended to ``log``). A missing program or a
    timeout is :class:`CrunUnavailable`."""
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise CrunUnavailable(f"{argv[0]} is not installed (scripts/setup.sh installs the build dependencies)") from None
    except subprocess.TimeoutExpired:
        raise CrunUnavailable(f"{' '.join(argv[:3])} did not finish within {timeout:.0f} s") from None
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(argv)}\n{proc.stdout}{proc.stderr}\n[exit {proc.returncode}]\n")
    return proc


# -- 1. source ------------------------------------------------------------------------------------


def _apt_options(apt: Path) -> list[str]:
    """apt-get/apt-cache options for a private configuration and state under ``apt``."""
    opts = {
        "Dir::Etc::SourceList": apt / "sources.list",
        "Dir::Etc::SourceParts": apt / "sources.list.d",
        "Dir::Etc::Preferences": apt / "preferences",
        "Dir::Etc::PreferencesParts": apt / "preferences.d",
        "Dir::State::Lists": apt / "lists",
        "Dir::Cache": apt / "cache",
        "Acquire::Languages": "none",
    }
    out = [arg for key, value in opts.items() for arg in ("-o", f"{key}={value}")]
    if os.geteuid() == 0:
        out += ["-o", "APT::Sandbox::User=root"]  # apt's _apt user cannot enter root's private cache dir
    return out


PRINT_URI = re.compile(r"'(?P<uri>[^']+)' (?P<name>crun_(?P<version>[^_\s]+)\.orig\.tar\.[a-z0-9]+) (?P<size>\d+) "
                       r"SHA256:(?P<sha>[0-9a-f]{64})")


def fetch_source(suite: str | None = None) -> Source:
    """Debian's ``crun_<version>.orig.tar.*`` for ``suite`` (default :data:`DEFAULT_SUITE`, or
    ``$AGENTBOX_CRUN_SUITE``), from the cache or fetched with apt's own client; caller holds the lock."""
    suite = suite or os.environ.get(ENV_SUITE) or DEFAULT_SUITE
    if not re.fullmatch(r"[a-z0-9-]+", suite):
        raise CrunUnavailable(f"invalid Debian suite {suite!r} (accepted: a suite name such as trixie)")
    store = cache_dir() / "src" / suite
    cached = _cached_source(store, suite)
    if cached is not None:
        return cached
    if shutil.which("apt-get") is None:
        raise CrunUnavailable("this host has no apt-get to fetch crun's source from Debian's archive")
    if not KEYRING.is_file():
        raise CrunUnavailable(f"{KEYRING} is missing (apt-get install debian-archive-keyring): Debian's index "
                              "cannot be verified")
    mirror = os.environ.get(ENV_MIRROR) or MIRROR
    apt = cache_dir() / "apt" / suite
    shutil.rmtree(apt, ignore_errors=True)
    for sub in ("sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(f"deb-src [signed-by={KEYRING}] {mirror} {suite} main\n")
    try:
        return _download_source(apt, mirror, suite, store)
    finally:
        shutil.rmtree(apt, ignore_errors=True)  # the private apt state is not kept


def _cached_source(store: Path, suite: str) -> Source | None:
    """A tarball of ``store`` whose recorded sha256 still matches it, if any."""
    for tarball in sorted(store.glob("crun_*.orig.tar.*")) if store.is_dir() else []:
        if tarball.name.endswith(".sha256"):
            continue
        want = Path(f"{tarball}.sha256")
        if want.is_file() and want.read_text().strip() == _sha256(tarball):
            version = tarball.name.removeprefix("crun_").split(".orig.tar.")[0]
            return Source(tarball, version, want.read_text().strip(), suite)
    return None


def _download_source(apt: Path, mirror: str, suite: str, store: Path) -> Source:
    """apt-get update, then the orig tarball the signed index lists, checked against its sha256 and
    size and moved into ``store`` with its sha256 recorded beside it."""
    opts = _apt_options(apt)
    proc = _run(["apt-get", *opts, "-q", "update"], timeout=APT_TIMEOUT_S)
    if proc.returncode != 0 or "Err:" in proc.stdout:
        raise CrunUnavailable(f"apt-get update for deb-src {mirror} {suite} failed: {_tail(proc.stdout + proc.stderr)}")
    proc = _run(["apt-get", *opts, "-qq", "source", "--print-uris", "--tar-only", "crun"], timeout=APT_TIMEOUT_S,
                cwd=apt)
    m = PRINT_URI.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        raise CrunUnavailable(f"Debian's {suite} index lists no crun orig tarball: {_tail(proc.stdout + proc.stderr)}")
    download = Path(tempfile.mkdtemp(prefix="download.", dir=apt))
    proc = _run(["apt-get", *opts, "-q", "source", "--download-only", "--tar-only", "crun"], timeout=APT_TIMEOUT_S,
                cwd=download)
    got = download / m["name"]
    if not got.is_file():
        raise CrunUnavailable(f"apt-get source could not fetch {m['uri']}: {_tail(proc.stdout + proc.stderr)}")
    sha = _sha256(got)
    if sha != m["sha"] or got.stat().st_size != int(m["size"]):
        raise CrunUnavailable(f"{m['name']} from {m['uri']} does not match Debian's signed index "
                              f"(sha256 {sha}, expected {m['sha']})")
    store.mkdir(parents=True, exist_ok=True)
    os.replace(got, store / m["name"])
    Path(f"{store / m['name']}.sha256").write_text(sha + "\n")
    return Source(store / m["name"], m["version"], sha, suite)


# -- 2. build -------------------------------------------------------------------------------------


def build_key(source: Source) -> str:
    """The cache key of a build: recipe, tarball hash, the header and the configure arguments."""
    h = hashlib.sha256(f"{RECIPE}\0{source.sha256}\0{' '.join(CONFIGURE_ARGS)}\0".encode())
    h.update(HEADER.read_bytes())
    return h.hexdigest()[:16]


def _version_text(binary: Path) -> str | None:
    try:
        proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    return proc.stdout if proc.returncode == 0 and "+LIBKRUN" in proc.stdout else None


def _ours(log: str) -> bool:
    """Whether a build failure points at this project's header (configure cannot use it, or crun's
    krun handler does not compile against it)."""
    return "Missing libkrun headers" in log or bool(re.search(r"(handlers/krun\.c|libkrun\.h):\d+:\d+: error", log))


def build_crun(source: Source) -> CrunBuild:
    """crun built ``--with-libkrun`` from ``source`` against :data:`HEADER`; cached. Caller holds the lock."""
    started = time.monotonic()
    out = cache_dir() / "build" / build_key(source)
    binary = out / "crun"
    text = _version_text(binary) if binary.is_file() else None
    if text is not None:
        return CrunBuild(binary, text, source, time.monotonic() - started, cached=True)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    log.write_text(f"crun {source.version} from {source.path} (sha256 {source.sha256}), header {HEADER}\n")
    work = Path(tempfile.mkdtemp(prefix="work.", dir=out))
    try:
        proc = _run(["tar", "-xf", str(source.path), "--no-same-owner", "-C", str(work)], timeout=300, log=log)
        tops = [p for p in work.iterdir() if p.is_dir()]
        if proc.returncode != 0 or len(tops) != 1 or not (tops[0] / "configure").is_file():
            raise CrunUnavailable(f"{source.path.name} is not a crun release tarball with configure ({_tail(proc.stderr)})")
        src = tops[0]
        proc = _run(["./configure", *CONFIGURE_ARGS, f"CPPFLAGS=-I{HEADER_DIR}"], cwd=src, timeout=CONFIGURE_TIMEOUT_S,
                    log=log)
        if proc.returncode != 0:
            errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]
            why = errors[-1] if errors else _tail(proc.stdout + proc.stderr)
            if _ours(proc.stdout + proc.stderr):
                raise CrunBuildBroken(f"crun's configure cannot use {HEADER}: {why} (log: {log})")
            raise CrunUnavailable(f"crun's configure failed: {why}; scripts/setup.sh installs the build "
                                  f"dependencies (log: {log})")
        jobs = str(max(1, len(os.sched_getaffinity(0))))
        for target in (["git-version.h"], ["-j", jobs, "crun"]):
            proc = _run(["make", *target], cwd=src, timeout=MAKE_TIMEOUT_S, log=log)
            if proc.returncode != 0:
                errors = [line for line in proc.stderr.splitlines() if "error" in line]
                why = errors[0] if errors else _tail(proc.stderr)
                if _ours(proc.stderr):
                    raise CrunBuildBroken(f"crun's krun handler does not build against {HEADER}: {why} (log: {log})")
                raise CrunUnavailable(f"make {' '.join(target)} failed in crun {source.version}: {why} (log: {log})")
        built = src / "crun"
        text = _version_text(built)
        if text is None:
            raise CrunBuildBroken(f"the crun built from {source.path.name} does not list +LIBKRUN (log: {log})")
        tmp = out / f".crun.{os.getpid()}"
        shutil.copy2(built, tmp)
        os.replace(tmp, binary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return CrunBuild(binary, text, source, time.monotonic() - started, cached=False)


# -- 3. runtime -----------------------------------------------------------------------------------


def hybrid_cgroups(mountinfo: str | None = None) -> bool:
    """Whether crun would refuse this host's cgroups: cgroup v1 controllers plus a cgroup2 mount at
    ``/sys/fs/cgroup/unified`` that has controllers (crun 1.21 ``libcrun_cgroup_enter``)."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    if cgroup_layout(mountinfo) != "hybrid":
        return False
    try:
        return bool((UNIFIED / "cgroup.controllers").read_text().strip())
    except OSError:
        return False


def wrapper_text(crun: CrunBuild, libdir: Path, hide_unified: bool, env: dict[str, str]) -> str:
    """The ``crun`` wrapper script Podman runs as the OCI runtime."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        f"# crun {crun.version} built --with-libkrun from Debian's {crun.source.path.name} (sha256 {crun.source.sha256})",
        "# by suites/standins/crun/build.py; its libkrun.so.1 is the QEMU-backed stand-in (suites/standins/libkrun).",
        f"LD_LIBRARY_PATH={q(str(libdir))}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}",
        "KRUN_STANDIN_CRUN=1",
        "export LD_LIBRARY_PATH KRUN_STANDIN_CRUN",
    ]
    for key, value in sorted(env.items()):
        lines += [f"{key}={q(value)}", f"export {key}"]
    if hide_unified:
        lines += [
            "# This host mounts cgroup2 at /sys/fs/cgroup/unified with controllers (the hybrid layout), which",
            "# crun refuses; crun runs in a mount namespace of its own without that mount (cgroup v1 only).",
            f"exec unshare --mount --propagation slave -- /bin/sh -c 'umount -l {UNIFIED} && exec \"$0\" \"$@\"' "
            f"{q(str(crun.binary))} \"$@\"",
        ]
    else:
        lines.append(f"exec {q(str(crun.binary))} \"$@\"")
    return "\n".join(lines) + "\n"


def runtime(standin: Path | None = None, suite: str | None = None) -> Runtime:
    """The crun runtime for ``podman run --runtime``: fetched, built and wrapped as needed (see the
    module docstring). ``standin`` is the stand-in library (default: built now)."""
    if standin is None:
        from suites.standins.libkrun.build import build

        standin = build()
    with locked():
        crun = build_crun(fetch_source(suite))
        hide = hybrid_cgroups()
        env = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
        key = hashlib.sha256(f"{crun.binary}\0{standin}\0{hide}\0{sorted(env.items())}".encode()).hexdigest()[:16]
        top = cache_dir() / "runtime" / key
        (top / "lib").mkdir(parents=True, exist_ok=True)
        (top / "bin").mkdir(parents=True, exist_ok=True)
        link = top / "lib" / "libkrun.so.1"
        if not link.is_symlink() or os.readlink(link) != str(standin):
            tmp_link = top / "lib" / f".libkrun.so.1.{os.getpid()}"
            tmp_link.unlink(missing_ok=True)
            tmp_link.symlink_to(standin)
            os.replace(tmp_link, link)
        wrapper = top / "bin" / "crun"
        text = wrapper_text(crun, top / "lib", hide, env)
        if not wrapper.is_file() or wrapper.read_text() != text:
            tmp = top / "bin" / f".crun.{os.getpid()}"
            tmp.write_text(text)
            tmp.chmod(0o755)
            os.replace(tmp, wrapper)
    return Runtime(wrapper, crun, standin, hide)


if __name__ == "__main__":
    try:
        rt = runtime()
    except (CrunUnavailable, CrunBuildBroken) as exc:
        print(f"crun: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, CrunUnavailable) else 1)
    print(f"crun {rt.crun.version} ({'cached' if rt.crun.cached else 'built'} in {rt.crun.seconds:.1f} s)",
          file=sys.stderr)
    print(rt.wrapper)
