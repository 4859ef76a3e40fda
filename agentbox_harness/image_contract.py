"""The image contract, reusable: what an agent's shell must find in an image, checked in a running
guest or container-mode task, with every failure named.

Point it at any image built on the agentbox contract (its own guest-init inside), in your own
tests, by parametrizing ``agentbox_image``::

    import pytest
    from agentbox_harness.image_contract import DEFAULT_TOOLS, ImageContract, ImageContractTests

    @pytest.mark.parametrize("agentbox_image", ["localhost/my-agent:latest"], indirect=True)
    class TestMyAgentImage(ImageContractTests):
        contract = ImageContract(tools=(*DEFAULT_TOOLS, "node"), nix=False)

That collects two tests, one in a guest of the chosen VM backend (``microvm``) and one in
container mode (``container_task``). Or call :meth:`ImageContract.check` on any machine.

An image built for another user (``agentbox image build --tag localhost/my-agent:latest --user
agent --uid 2000 --gid 2000 --workdir /work``) is checked against that user::

    contract = ImageContract.for_image_user(ImageUser(user="agent", uid=2000, gid=2000, workdir="/work"))

(``from agentbox_guest_init.image_user import ImageUser``). As root, the ``workspace`` fixture
gives the workspace to the image's ids, read from the image's labels.

What is checked (each expectation is a field of :class:`ImageContract`, defaults in brackets):

- ``user``, ``uid``, ``gid`` [dev, 1000, 1000]: the shell runs as that user, and the image's
  passwd says the same;
- ``home`` [/home/dev]: ``$HOME`` and the passwd home;
- ``workdir`` [/workspace]: where a shell starts;
- ``xdg`` [the four XDG base dirs]: each variable is set to a directory under ``home`` that
  ``user`` owns;
- keep-id (when a workspace is given): a file the user writes in ``workdir``
  belongs to the workspace's owner on the host;
- ``tools`` [:data:`DEFAULT_TOOLS`]: each is on ``PATH``;
- ``base_tools`` [:data:`BASE_TOOLS`: coreutils, findutils, grep, sed, tar, gzip]: each package's
  commands are on ``PATH`` and work together: a round trip writes a file, edits it with ``sed``,
  matches it with ``grep``, packs it with ``tar -z``, tests it with ``gzip -t``, unpacks it and
  reads it back through ``find | xargs | sort -u | wc``, naming the first step that fails;
- ``ca_bundle`` [``/etc/ssl/certs/ca-certificates.crt``, None to skip]: the CA bundle is there,
  not empty, and parses into at least one certificate (with ``openssl`` where the image has it,
  else python's ``ssl`` ``load_verify_locations``, else counting its PEM blocks);
- ``init_binary`` [True]: Podman's init (catatonit), so that ``podman run --init`` works;
- ``nix`` [True]: nix is present and usable: its prep is ready and the user can add a path to
  the store (through the daemon where the image uses one).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentbox_guest_init import contract as c
from agentbox_guest_init.image_user import ImageUser

DEFAULT_TOOLS = ("git", "rg", "jq", "curl", "less", "which", "gawk", "diff")
BASE_TOOLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("coreutils", ("cat", "cp", "mv", "rm", "ls", "ln", "mkdir", "mktemp", "chmod", "chown", "stat", "head", "tail",
                   "sort", "uniq", "wc", "tr", "cut", "env", "date", "sha256sum")),
    ("findutils", ("find", "xargs")),
    ("grep", ("grep",)),
    ("sed", ("sed",)),
    ("tar", ("tar",)),
    ("gzip", ("gzip", "gunzip", "zcat")),
)
"""The base tools an agent's shell scripts assume, as (Debian package, its commands) pairs; add
your own with ``base_tools=(*BASE_TOOLS, ("unzip", ("unzip",)))``."""
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
XDG_DIRS = ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME")
INIT_PATHS = ("/usr/libexec/podman/catatonit", "/usr/bin/catatonit", "/usr/libexec/catatonit/catatonit")
PROBE_TIMEOUT_S = 60.0
NIX_TIMEOUT_S = 180.0


class ImageContractError(AssertionError):
    """The image broke its contract; the message lists every failure, one per line."""


def _probe_script(contract: ImageContract) -> str:
    xdg = " ".join(contract.xdg)
    tools = " ".join(shlex.quote(t) for t in contract.tools)
    inits = " ".join(INIT_PATHS)
    return f"""
echo "uid=$(id -u)"; echo "gid=$(id -g)"; echo "name=$(getent passwd "$(id -u)" | cut -d: -f1)"
echo "passwd=$(getent passwd {shlex.quote(contract.user)})"
echo "home=$HOME"; echo "pwd=$(pwd)"
for v in {xdg}; do eval "p=\\${{$v:-}}"; o=; [ -n "$p" ] && o=$(stat -c %U:%u "$p" 2>/dev/null); echo "xdg=$v|$p|$o"; done
for t in {tools}; do command -v "$t" >/dev/null 2>&1 || echo "missing=$t"; done
for p in {inits}; do [ -x "$p" ] && echo "init=$p"; done
command -v nix-store >/dev/null 2>&1 && echo "nix=present"
true
"""


ROUND_TRIP = """
d=$(mktemp -d) || {{ echo "roundtrip=mktemp -d: no temporary directory"; exit 0; }}
step() {{ name=$1; shift; "$@" >"$d/out" 2>"$d/err" && return 0
  echo "roundtrip=$name: $(cat "$d/err" "$d/out" | head -c 300 | tr '\\n' ' ')"; rm -rf "$d"; exit 0; }}
cd "$d"
step "printf > file" sh -c 'printf "alpha\\nbeta\\n" > a'
step "sed" sh -c "sed 's/beta/gamma/' a > b"
step "grep" grep -qx gamma b
step "tar -cz" tar -czf t.tgz a b
step "gzip -t" gzip -t t.tgz
step "mkdir" mkdir x
step "tar -xz" tar -xzf t.tgz -C x
step "find | xargs | sort | wc" sh -c 'n=$(find x -type f -print0 | xargs -0 cat | sort -u | wc -l) && [ "$n" -eq 3 ]'
step "zcat | tar -t" sh -c 'zcat t.tgz | tar -t | sort | tr "\\n" " " | grep -qx "a b "'
cd / && rm -rf "$d" && echo "roundtrip=ok"
"""
"""Exercise the base tools together (each step named; printf's escapes pass through .format)."""

CA_PROBE = """
b={bundle}
if [ ! -e "$b" ]; then echo "ca=missing"
elif [ ! -s "$b" ]; then echo "ca=empty"
elif command -v openssl >/dev/null 2>&1; then
  echo "ca=openssl:$(openssl crl2pkcs7 -nocrl -certfile "$b" 2>/dev/null | openssl pkcs7 -print_certs -noout \
    2>/dev/null | grep -c '^subject=')"
elif command -v python3 >/dev/null 2>&1; then
  echo "ca=python ssl:$(python3 -c 'import ssl, sys
c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
c.load_verify_locations(sys.argv[1])
print(c.cert_store_stats()["x509_ca"])' "$b" 2>/dev/null || echo 0)"
else echo "ca=PEM blocks:$(grep -c -- '-----BEGIN CERTIFICATE-----' "$b")"
fi
"""
"""How many certificates the CA bundle parses into, and with what."""


def _base_script(contract: ImageContract) -> str:
    commands = " ".join(shlex.quote(f"{pkg}:{cmd}") for pkg, cmds in contract.base_tools for cmd in cmds)
    script = f"""
for pc in {commands}; do command -v "${{pc#*:}}" >/dev/null 2>&1 || echo "basemissing=$pc"; done
"""
    if contract.ca_bundle:
        script += CA_PROBE.format(bundle=shlex.quote(contract.ca_bundle))
    if contract.base_tools:
        script += ROUND_TRIP.format()
    return script


def _fields(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out.setdefault(key, []).append(value)
    return out


@dataclass(frozen=True)
class ImageContract:
    """The expectations (see the module text); every field has the agentbox image's value."""

    user: str = c.DEV_USER
    uid: int = c.DEV_UID
    gid: int = c.DEV_GID
    home: str = c.DEV_HOME
    workdir: str = c.WORKSPACE
    xdg: tuple[str, ...] = XDG_DIRS
    tools: tuple[str, ...] = DEFAULT_TOOLS
    base_tools: tuple[tuple[str, tuple[str, ...]], ...] = BASE_TOOLS
    ca_bundle: str | None = CA_BUNDLE
    init_binary: bool = True
    nix: bool = True

    @classmethod
    def for_image_user(cls, user: ImageUser, **expectations: Any) -> ImageContract:
        """The contract of an image built with ``agentbox image build --user/--uid/--gid/--workdir``:
        ``user``'s name, ids, home and workdir, plus any other ``expectations`` (``tools=...``)."""
        return cls(user=user.user, uid=user.uid, gid=user.gid, home=user.home, workdir=user.workdir, **expectations)

    def failures(self, machine: Any, workspace: Any = None) -> list[str]:
        """Every way the running ``machine`` breaks the contract (empty when it keeps it).
        ``workspace`` (the fixture's object) adds the keep-id ownership check."""
        probe = machine.execute(_probe_script(self), timeout=PROBE_TIMEOUT_S)
        if not probe.ok:
            return [f"the contract probe failed (exit {probe.exit_status}): {probe.stderr.strip()[-300:]}"]
        f = _fields(probe.stdout)
        got = self._identity(f) + self._xdg(f)
        if f.get("missing"):
            got.append(f"tools: missing from PATH: {', '.join(f['missing'])}")
        if self.init_binary and not f.get("init"):
            got.append(f"init: no catatonit at {', '.join(INIT_PATHS)}: `podman run --init` fails "
                       "('container-init binary not found')")
        got += self.base_failures(machine)
        if self.nix:
            got += self._nix(machine, f)
        if workspace is not None:
            got += self._keep_id(machine, workspace)
        return got

    def _identity(self, f: dict[str, list[str]]) -> list[str]:
        """user, passwd entry, home and workdir, from the probe's fields."""
        got: list[str] = []
        uid, gid, name = f["uid"][0], f["gid"][0], f["name"][0]
        if (name, uid, gid) != (self.user, str(self.uid), str(self.gid)):
            got.append(f"user: the shell runs as {name or '(no passwd entry)'} (uid {uid}, gid {gid}); "
                       f"expected {self.user} (uid {self.uid}, gid {self.gid})")
        entry = f["passwd"][0].split(":")
        if len(entry) < 7:
            got.append(f"user: the image's passwd has no user {self.user}")
        elif (entry[2], entry[3], entry[5]) != (str(self.uid), str(self.gid), self.home):
            got.append(f"user: the image's passwd has {self.user} with uid {entry[2]}, gid {entry[3]}, home "
                       f"{entry[5]}; expected uid {self.uid}, gid {self.gid}, home {self.home}")
        if f["home"][0] != self.home:
            got.append(f"home: $HOME is {f['home'][0] or '(unset)'}; expected {self.home}")
        if f["pwd"][0] != self.workdir:
            got.append(f"workdir: a shell starts in {f['pwd'][0]}; expected {self.workdir}")
        return got

    def _xdg(self, f: dict[str, list[str]]) -> list[str]:
        got: list[str] = []
        for item in f.get("xdg", []):
            var, path, owner = item.split("|")
            name, _, owner_uid = owner.partition(":")
            if not path or not path.startswith(self.home.rstrip("/") + "/") or name != self.user:
                held = f"uid {owner_uid}" if name == "UNKNOWN" else (f"{name} (uid {owner_uid})" if owner else "")
                got.append(f"xdg: {var} is {path or '(unset)'} owned by {held or '(nothing there)'}; expected a "
                           f"directory under {self.home} owned by {self.user}")
        return got

    def base_failures(self, machine: Any) -> list[str]:
        """The ``base_tools`` and ``ca_bundle`` part of :meth:`failures` alone: each package's
        commands missing from ``PATH``, the first failed step of the round trip, and a CA bundle
        that is missing, empty or holds no certificate (empty when the image keeps them)."""
        if not self.base_tools and not self.ca_bundle:
            return []
        probe = machine.execute(_base_script(self), timeout=PROBE_TIMEOUT_S)
        if not probe.ok:
            return [f"base tools: the probe failed (exit {probe.exit_status}): {probe.stderr.strip()[-300:]}"]
        f = _fields(probe.stdout)
        got: list[str] = []
        missing: dict[str, list[str]] = {}
        for item in f.get("basemissing", []):
            pkg, _, cmd = item.partition(":")
            missing.setdefault(pkg, []).append(cmd)
        if missing:
            got.append("base tools: missing from PATH: " +
                       "; ".join(f"{pkg} ({', '.join(cmds)})" for pkg, cmds in missing.items()))
        if self.base_tools and f.get("roundtrip") != ["ok"]:
            failed = (f.get("roundtrip") or ["(no result)"])[0].strip()
            got.append(f"base tools: the round trip failed at {failed}")
        if self.ca_bundle:
            got += self._ca(f.get("ca", ["(no result)"])[0])
        return got

    def _ca(self, result: str) -> list[str]:
        if result in ("missing", "empty"):
            return [f"ca-certificates: the CA bundle {self.ca_bundle} is {result}: TLS clients (curl, git, pip) "
                    "cannot verify any server"]
        how, _, count = result.rpartition(":")
        if not count.strip().isdigit() or int(count) < 1:
            return [f"ca-certificates: the CA bundle {self.ca_bundle} holds no certificate {how or 'it'} can parse"]
        return []

    def _nix(self, machine: Any, f: dict[str, list[str]]) -> list[str]:
        """nix-store --add as the user; a guest whose nix prep still runs gets it waited for first."""
        if not f.get("nix"):
            return ["nix: nix-store is not on PATH"]
        add = "f=$(mktemp) && echo image-contract > $f && nix-store --add $f"
        added = machine.execute(add, timeout=NIX_TIMEOUT_S)
        if not added.ok:
            try:
                machine.wait_for_prep("nix", timeout=NIX_TIMEOUT_S)
            except AssertionError as exc:
                return [f"nix: {self.user} cannot add a path to the store, and its prep did not become ready: "
                        f"{str(exc).splitlines()[0]}"]
            added = machine.execute(add, timeout=NIX_TIMEOUT_S)
        if not added.ok or not added.stdout.strip().startswith("/nix/store/"):
            return [f"nix: {self.user} cannot add a path to the store: {(added.stderr or added.stdout).strip()[-300:]}"]
        return []

    def _keep_id(self, machine: Any, workspace: Any) -> list[str]:
        name = ".image-contract-keep-id"
        machine.execute(f"echo keep-id > {shlex.quote(self.workdir)}/{name}", timeout=PROBE_TIMEOUT_S)
        made, top = Path(workspace.path) / name, Path(workspace.path)
        try:
            st = made.stat()
        except OSError:
            return [f"keep-id: a file {self.user} wrote in {self.workdir} did not reach the host workspace"]
        finally:
            made.unlink(missing_ok=True)
        want = top.stat()
        if (st.st_uid, st.st_gid) != (want.st_uid, want.st_gid):
            return [f"keep-id: a file {self.user} wrote in {self.workdir} is {st.st_uid}:{st.st_gid} on the host; "
                    f"expected the workspace owner {want.st_uid}:{want.st_gid}"]
        return []

    def check(self, machine: Any, workspace: Any = None) -> None:
        """Fail (:class:`ImageContractError`) listing every failure of :meth:`failures`."""
        failures = self.failures(machine, workspace)
        if failures:
            raise ImageContractError(f"image contract: {len(failures)} failure(s)\n" +
                                     "\n".join(f"- {line}" for line in failures))


class ImageContractTests:
    """Subclass (as ``Test...``) to run :attr:`contract` in a guest and in container mode; set
    ``agentbox_image`` by parametrizing the class (see the module text)."""

    contract = ImageContract()

    def test_image_contract_in_the_guest(self, agentbox_image: str, microvm: Any, workspace: Any) -> None:
        self.contract.check(microvm, workspace)

    def test_image_contract_in_container_mode(self, agentbox_image: str, container_task: Any, workspace: Any) -> None:
        self.contract.check(container_task, workspace)
