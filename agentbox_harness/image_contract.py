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
        for item in f.get("xdg", []):
            var, path, owner = item.split("|")
            name, _, owner_uid = owner.partition(":")
            if not path or not path.startswith(self.home.rstrip("/") + "/") or name != self.user:
                held = f"uid {owner_uid}" if name == "UNKNOWN" else (f"{name} (uid {owner_uid})" if owner else "")
                got.append(f"xdg: {var} is {path or '(unset)'} owned by {held or '(nothing there)'}; expected a "
                           f"directory under {self.home} owned by {self.user}")
        if f.get("missing"):
            got.append(f"tools: missing from PATH: {', '.join(f['missing'])}")
        if self.init_binary and not f.get("init"):
            got.append(f"init: no catatonit at {', '.join(INIT_PATHS)}: `podman run --init` fails "
                       "('container-init binary not found')")
        if self.nix:
            got += self._nix(machine, f)
        if workspace is not None:
            got += self._keep_id(machine, workspace)
        return got

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
