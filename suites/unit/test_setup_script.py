"""scripts/setup.sh on Debian 12/13 and Ubuntu 22.04/24.04, driven with fake package tools.

The real script runs from a copy of the repo's set-up files in a temporary
directory, with ``PATH`` holding only fakes of ``apt-get``, ``apt-cache``,
``dpkg-query`` and ``sudo`` plus the few real tools the script uses (so a real
apt is never reached), and ``AGENTBOX_PYTHON`` naming fake interpreters. The
fakes keep their state in files: what apt offers (after ``apt-get update``,
as on a fresh host), what is installed, and a log of every call.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

COMMON = ["python3", "python3-venv", "git", "gcc", "podman", "buildah", "crun", "runc", "conmon", "uidmap",
          "slirp4netns", "fuse-overlayfs", "btrfs-progs", "util-linux", "kmod", "socat", "qemu-system-x86",
          "qemu-system-common", "qemu-utils", "debootstrap", "busybox-static", "nix-bin", "zstd", "make", "pkgconf",
          "libseccomp-dev", "libcap-dev", "libyajl-dev", "libsystemd-dev"]


@dataclass(frozen=True)
class Distro:
    """What apt offers on one release: the packages whose presence or name differs, versions, python3."""

    name: str
    offers: tuple[str, ...]
    versions: dict[str, str] = field(default_factory=dict)
    python: str = "3.11.2"


DISTROS = {
    "debian-12": Distro("debian-12", ("libarchive13", "passt", "virtiofsd", "python3.11"),
                        {"podman": "4.3.1+ds1-8+deb12u1", "crun": "1.8.1-1+deb12u1"}, "3.11.2"),
    "debian-13": Distro("debian-13", ("libarchive13t64", "passt", "virtiofsd", "python3.13"),
                        {"podman": "5.4.2+ds1-2+b2", "crun": "1.21-1"}, "3.13.5"),
    # no passt before Ubuntu 22.10; virtiofsd is a file of qemu-system-common there; python3.11 in universe
    "ubuntu-22.04": Distro("ubuntu-22.04", ("libarchive13", "python3.11"),
                           {"podman": "3.4.4+ds1-1ubuntu1.22.04.2", "crun": "0.17+dfsg-1.1ubuntu0.1"}, "3.10.12"),
    "ubuntu-24.04": Distro("ubuntu-24.04", ("libarchive13t64", "passt", "virtiofsd", "python3.12"),
                           {"podman": "4.9.3+ds1-1ubuntu0.2", "crun": "1.14.1-1"}, "3.12.3"),
}

REAL_TOOLS = ("bash", "env", "cat", "sha256sum", "cut", "readlink", "grep", "id", "sort", "head", "sed", "rm",
              "mkdir", "cp", "basename", "dirname", "touch", "tail")

APT_GET = r"""#!/bin/sh
echo "apt-get $*" >> "$FAKE_HOST/calls"
case " $* " in
  *" update "*) touch "$FAKE_HOST/updated"; echo "Hit:1 http://deb.example/debian main InRelease" ;;
  *" install "*)
    i=0
    while [ $i -lt 300 ]; do echo "Unpacking package-$i (1.0-1) ..."; i=$((i + 1)); done
    if [ -e "$FAKE_HOST/fail-install" ]; then echo "E: Sub-process /usr/bin/dpkg returned an error code (1)"; exit 100; fi
    for arg; do
      case "$arg" in
        -*|install) ;;
        *) echo "$arg $(grep "^$arg " "$FAKE_HOST/offers" | cut -d' ' -f2)" >> "$FAKE_HOST/installed" ;;
      esac
    done ;;
esac
"""

APT_CACHE = r"""#!/bin/sh
# apt-cache policy NAME: a candidate only for what apt offers, and only after apt-get update
echo "apt-cache $*" >> "$FAKE_HOST/calls"
[ "$1" = policy ] || exit 1
shift
for name; do
  line=$(grep "^$name " "$FAKE_HOST/offers") || continue
  [ -e "$FAKE_HOST/updated" ] || continue
  printf '%s:\n  Installed: (none)\n  Candidate: %s\n  Version table:\n' "$name" "${line#* }"
  cat "$FAKE_HOST/version-table"  # long, like a real one with many sources: more than a pipe holds
done
"""

DPKG_QUERY = r"""#!/bin/sh
# dpkg-query -W -f=FORMAT NAME
for arg; do case "$arg" in -W) ;; -f=*) fmt=${arg#-f=} ;; *) name=$arg ;; esac; done
line=$(grep "^$name " "$FAKE_HOST/installed") || { echo "dpkg-query: no packages found matching $name" >&2; exit 1; }
case "$fmt" in *Status*) printf 'install ok installed' ;; *Version*) printf '%s' "${line#* }" ;; esac
"""

SUDO = """#!/bin/sh
exec "$@"
"""

PYTHON = r"""#!/bin/sh
# a fake python @VERSION@: answers the calls scripts/setup.sh makes
echo "python $0 $*" >> "$FAKE_HOST/calls"
case "$1 $2" in
  "-c "*version_info*) echo @VERSION@ ;;
  "-c "*ensurepip*) exit @ENSUREPIP_RC@ ;;
  "-m venv") mkdir -p "$3/bin"; [ @VENV_RC@ -eq 0 ] && cp "$0" "$3/bin/python"; exit @VENV_RC@ ;;
  "-m pip") ;;
  *) echo "fake python: unexpected call: $*" >&2; exit 3 ;;
esac
"""


class FakeHost:
    """A temporary repo copy plus fake package tools; ``run()`` runs its scripts/setup.sh."""

    def __init__(self, root: Path, distro: Distro, apt: bool = True) -> None:
        self.root, self.distro = root, distro
        self.repo = root / "repo"
        (self.repo / "scripts").mkdir(parents=True)
        for name in ("scripts/setup.sh", "pyproject.toml", "requirements.lock"):
            shutil.copy(REPO / name, self.repo / name)
        self.venv = self.repo / ".venv"
        self.state = root / "state"
        self.state.mkdir()
        self.bin = root / "bin"
        self.bin.mkdir()
        for tool in REAL_TOOLS:
            real = shutil.which(tool)
            assert real, f"{tool} not found on this host"
            (self.bin / tool).symlink_to(real)
        fakes = {"dpkg-query": DPKG_QUERY, "sudo": SUDO}
        if apt:
            fakes |= {"apt-get": APT_GET, "apt-cache": APT_CACHE}
        for name, text in fakes.items():
            self.script(self.bin / name, text)
        offers = [*COMMON, *distro.offers]
        (self.state / "offers").write_text(
            "".join(f"{name} {distro.versions.get(name, '1.0-1')}\n" for name in offers))
        self.set_installed(["util-linux"])  # what a minbase root already has
        (self.state / "calls").write_text("")
        (self.state / "version-table").write_text("     1.0-1 500\n        500 http://deb.example/debian main\n" * 4000)
        self.python = self.fake_python(distro.python)

    @staticmethod
    def script(path: Path, text: str) -> Path:
        path.write_text(text)
        path.chmod(0o755)
        return path

    def fake_python(self, version: str, name: str = "python3", ensurepip: bool = True, venv: bool = True) -> Path:
        """A fake interpreter reporting ``version``, at pythons/<version>/<name>."""
        text = (PYTHON.replace("@VERSION@", version).replace("@ENSUREPIP_RC@", "0" if ensurepip else "1")
                .replace("@VENV_RC@", "0" if venv else "1"))
        (self.root / "pythons" / version).mkdir(parents=True, exist_ok=True)
        return self.script(self.root / "pythons" / version / name, text)

    def set_installed(self, names: list[str]) -> None:
        offered = dict(line.split(" ", 1) for line in (self.state / "offers").read_text().splitlines())
        (self.state / "installed").write_text("".join(f"{n} {offered.get(n, '1.0-1')}\n" for n in names))

    def install_everything(self) -> None:
        """Mark every package this distro offers as installed (apt's lists are there too)."""
        (self.state / "installed").write_text((self.state / "offers").read_text())
        (self.state / "updated").touch()

    def run(self, *pythons: Path) -> subprocess.CompletedProcess[str]:
        (self.state / "calls").write_text("")
        env = {"PATH": str(self.bin), "FAKE_HOST": str(self.state), "HOME": str(self.root),
               "AGENTBOX_PYTHON": " ".join(str(p) for p in (pythons or (self.python,)))}
        return subprocess.run([str(self.bin / "bash"), str(self.repo / "scripts/setup.sh")], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    def calls(self, prefix: str = "") -> list[str]:
        return [c for c in (self.state / "calls").read_text().splitlines() if c.startswith(prefix)]

    def installs(self) -> list[list[str]]:
        """The package lists of each ``apt-get install``."""
        return [[a for a in c.split()[1:] if not a.startswith("-") and a != "install"]
                for c in self.calls("apt-get") if " install " in f" {c} "]

    def venv_python_version(self) -> str:
        text = (self.venv / "bin" / "python").read_text()
        found = re.search(r"# a fake python (\S+):", text)
        assert found, text
        return found[1]


PHASE_TIME = re.compile(r" \(\d+\.\d s\)|\(\d+\.\d s; ")


def setup_lines(stderr: str) -> list[str]:
    """The script's own lines, with each phase's time taken out (``(1.2 s)``)."""
    return [PHASE_TIME.sub(lambda m: "(" if m[0].startswith("(") else "", line)
            for line in stderr.splitlines() if line.startswith("setup: ")]


def assert_one_error_line(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    """The error is the last line, alone: before it only the package step's own lines, nothing else."""
    lines = setup_lines(proc.stderr)
    assert len(lines) == len(proc.stderr.splitlines()), proc.stderr
    assert lines[-1] == expected
    assert all(line == "setup: system packages present" or line.startswith("setup: note: ") for line in lines[:-1]), lines


@pytest.fixture()
def host(tmp_path: Path, request: pytest.FixtureRequest) -> FakeHost:
    distro = getattr(request, "param", "debian-12")
    return FakeHost(tmp_path, DISTROS[distro])


EXPECTED_INSTALL = {
    "debian-12": ["libarchive13", "passt"],
    "debian-13": ["libarchive13t64", "passt"],
    "ubuntu-22.04": ["libarchive13"],
    "ubuntu-24.04": ["libarchive13t64", "passt"],
}


@pytest.mark.parametrize("distro", sorted(DISTROS))
def test_packages_are_resolved_per_distribution_on_a_fresh_host(tmp_path: Path, distro: str) -> None:
    host = FakeHost(tmp_path, DISTROS[distro])
    proc = host.run()
    installs = host.installs()
    assert len(installs) == 1, proc.stderr
    wanted = installs[0]
    assert {"podman", "qemu-system-x86", "python3-venv", "nix-bin", "busybox-static"} <= set(wanted)
    assert "util-linux" not in wanted  # already installed
    for name in ("libarchive13", "libarchive13t64", "passt"):
        assert (name in wanted) == (name in EXPECTED_INSTALL[distro]), f"{name} on {distro}: {wanted}"
    assert "virtiofsd" not in wanted and "qemu-system-common" not in wanted  # 9p; pulled in by qemu-system-x86
    assert host.calls("apt-get")[0] == "apt-get update -q"
    lines = setup_lines(proc.stderr)
    assert any("note: apt offers no passt here; skipped" in line for line in lines) == (distro == "ubuntu-22.04")
    old = [line for line in lines if "older than the oldest tested" in line]
    if distro == "ubuntu-22.04":
        assert old == ["setup: note: podman 3.4.4 is older than the oldest tested (4.3, Debian 12's); "
                       "if a backend that uses it fails, install a newer podman",
                       "setup: note: crun 0.17 is older than the oldest tested (1.8, Debian 12's); "
                       "if a backend that uses it fails, install a newer crun"]
        assert proc.returncode == 2 and "Python >= 3.11, but" in lines[-1]
    else:
        assert old == []
        assert proc.returncode == 0, proc.stderr
        assert host.venv_python_version() == DISTROS[distro].python


def test_an_installed_name_of_an_alternative_counts(host: FakeHost) -> None:
    host.set_installed(["util-linux", "libarchive13t64"])
    proc = host.run()
    assert proc.returncode == 0, proc.stderr
    assert not {"libarchive13", "libarchive13t64"} & set(host.installs()[0])


def test_a_missing_optional_package_costs_no_apt_update_on_later_runs(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, DISTROS["ubuntu-24.04"])
    host.install_everything()
    offers = (host.state / "offers").read_text().splitlines()
    (host.state / "offers").write_text("".join(f"{line}\n" for line in offers if not line.startswith("passt ")))
    (host.state / "installed").write_text((host.state / "offers").read_text())
    proc = host.run()
    assert proc.returncode == 0, proc.stderr
    assert host.calls("apt-get") == []
    assert setup_lines(proc.stderr)[:2] == [
        "setup: note: apt offers no passt here; skipped (the features that need it say so: agentbox doctor)",
        "setup: system packages present"]


def test_nothing_missing_asks_apt_nothing(host: FakeHost) -> None:
    host.install_everything()
    proc = host.run()
    assert proc.returncode == 0, proc.stderr
    assert host.calls("apt-get") == [] and host.calls("apt-cache") == []
    assert "setup: system packages present" in setup_lines(proc.stderr)


def test_a_required_package_apt_does_not_offer_stops_with_one_line(host: FakeHost) -> None:
    offers = (host.state / "offers").read_text().splitlines()
    (host.state / "offers").write_text("".join(f"{line}\n" for line in offers
                                               if line.split()[0] not in ("podman", "buildah")))
    proc = host.run()
    assert proc.returncode == 1
    assert setup_lines(proc.stderr) == [
        "setup: apt offers no package for: podman buildah (on Ubuntu enable the universe component: "
        "add-apt-repository universe); nothing was installed"]
    assert host.installs() == [] and not host.venv.exists()


@pytest.mark.parametrize("apt_has_python311", [True, False])
def test_a_too_old_python_is_one_line_naming_the_version_and_the_fix(tmp_path: Path, apt_has_python311: bool) -> None:
    host = FakeHost(tmp_path, DISTROS["ubuntu-22.04"])
    host.install_everything()
    if not apt_has_python311:
        offers = (host.state / "offers").read_text().splitlines()
        (host.state / "offers").write_text("".join(f"{line}\n" for line in offers if not line.startswith("python3.11 ")))
    proc = host.run()
    assert proc.returncode == 2
    uv = "'uv python install 3.11' and re-run with AGENTBOX_PYTHON=\"$(uv python find 3.11)\""
    fix = f"apt-get install python3.11 python3.11-venv, or {uv}" if apt_has_python311 else uv
    assert_one_error_line(proc, f"setup: agentbox-harness needs Python >= 3.11, but {host.python} is 3.10.12; fix: {fix}")
    assert not host.venv.exists() and host.calls("python") == [f"python {host.python} -c "
                                                                 "import sys; print(*sys.version_info[:3], sep=\".\")"]


def test_the_first_new_enough_candidate_is_used(host: FakeHost) -> None:
    old = host.fake_python("3.10.12")
    new = host.fake_python("3.11.9", name="python3.11")
    proc = host.run(old, new)
    assert proc.returncode == 0, proc.stderr
    assert f"setup: creating virtualenv {host.venv} with {new} (3.11.9)" in setup_lines(proc.stderr)
    assert host.venv_python_version() == "3.11.9"
    pips = host.calls(f"python {host.venv}/bin/python -m pip install")
    assert len(pips) == 2 and "--require-hashes" in pips[0] and "--no-deps -e" in pips[1]


def test_a_missing_candidate_is_passed_over(host: FakeHost) -> None:
    proc = host.run(host.root / "no-such-python", host.python)
    assert proc.returncode == 0, proc.stderr


def test_no_python_at_all_is_one_line(host: FakeHost) -> None:
    host.install_everything()
    proc = host.run(host.root / "no-such-python")
    assert proc.returncode == 2
    assert_one_error_line(proc, (
        f"setup: agentbox-harness needs Python >= 3.11, but no python3 was found ({host.root}/no-such-python); "
        "fix: apt-get install python3.11 python3.11-venv, or 'uv python install 3.11' and re-run with "
        "AGENTBOX_PYTHON=\"$(uv python find 3.11)\""))


def test_a_python_without_the_venv_module_is_one_line_naming_the_package(host: FakeHost) -> None:
    host.install_everything()
    python = host.fake_python("3.13.5", name="python3.13", ensurepip=False)
    proc = host.run(python)
    assert proc.returncode == 2
    assert_one_error_line(proc, (
        f"setup: {python} (3.13.5) has no venv module (ensurepip); fix: apt-get install python3.13-venv "
        "(or use another Python with AGENTBOX_PYTHON=...), then re-run"))
    assert not host.venv.exists()


def test_the_venv_is_rebuilt_when_the_interpreter_version_changes(host: FakeHost) -> None:
    host.install_everything()
    assert host.run().returncode == 0
    (host.venv / "lib-marker").write_text("made by 3.11")
    newer = host.fake_python("3.13.5")
    proc = host.run(newer)
    assert proc.returncode == 0, proc.stderr
    assert f"setup: recreating {host.venv}: it was made with Python 3.11.2, this is 3.13.5" in setup_lines(proc.stderr)
    assert host.venv_python_version() == "3.13.5" and not (host.venv / "lib-marker").exists()
    assert len(host.calls(f"python {host.venv}/bin/python -m pip install")) == 2
    again = host.run(newer)
    assert "setup: virtualenv up to date" in setup_lines(again.stderr)
    assert host.calls(f"python {host.venv}/bin/python -m pip") == []


def test_the_venv_is_rebuilt_when_the_interpreter_file_changes(host: FakeHost) -> None:
    host.install_everything()
    assert host.run().returncode == 0
    other = host.fake_python("3.11.2", name="python3.11")
    proc = host.run(other)
    assert proc.returncode == 0, proc.stderr
    assert (f"setup: recreating {host.venv}: it was made with 3.11.2 {host.python}, this is 3.11.2 {other}"
            in setup_lines(proc.stderr))


def test_a_venv_whose_interpreter_is_gone_is_rebuilt(host: FakeHost) -> None:
    host.install_everything()
    assert host.run().returncode == 0
    (host.venv / "bin" / "python").unlink()
    (host.venv / "bin" / "python").symlink_to(host.root / "removed-python")
    proc = host.run()
    assert proc.returncode == 0, proc.stderr
    assert (f"setup: recreating {host.venv}: its interpreter does not run (Python upgraded or removed?)"
            in setup_lines(proc.stderr))
    assert host.venv_python_version() == "3.11.2"


def test_other_dependencies_reinstall_into_the_same_venv(host: FakeHost) -> None:
    host.install_everything()
    assert host.run().returncode == 0
    (host.venv / "kept").write_text("")
    with (host.repo / "requirements.lock").open("a") as lock:
        lock.write("# changed\n")
    proc = host.run()
    assert proc.returncode == 0, proc.stderr
    assert (host.venv / "kept").exists() and not any("recreating" in line for line in setup_lines(proc.stderr))
    assert len(host.calls(f"python {host.venv}/bin/python -m pip install")) == 2


def test_a_failed_venv_creation_keeps_nothing(host: FakeHost) -> None:
    host.install_everything()
    proc = host.run(host.fake_python("3.12.3", venv=False))
    assert proc.returncode == 1
    assert not host.venv.exists()
    assert setup_lines(proc.stderr)[-1].endswith("-m venv " + f"{host.venv}' failed (see above); nothing was kept")


def test_a_host_without_apt_gets_the_list_and_exit_2(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, DISTROS["debian-12"], apt=False)
    proc = host.run()
    assert proc.returncode == 2
    lines = setup_lines(proc.stderr)
    assert lines[0] == ("setup: this host has no apt-get; install these (Debian names) with your package manager, "
                        "then re-run:")
    listed = lines[1].removeprefix("setup:   ").split(", ")
    assert listed[:2] == ["python3 (>= 3.11)", "python3's venv module"]
    assert {"podman", "qemu-system-x86", "passt (optional)", "libarchive13t64 or libarchive13", "zstd"} <= set(listed)
    assert len(lines) == 2 and host.calls() == [] and not host.venv.exists()


def test_the_minimum_python_is_pyprojects_requires_python() -> None:
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    found = re.search(r"^min_python=(\S+)$", (REPO / "scripts" / "setup.sh").read_text(), re.M)
    assert found and requires == f">={found[1]}"


def test_the_fakes_are_what_runs(host: FakeHost) -> None:
    """The script resolves apt-get to the fake (a real apt would be a disaster here)."""
    proc = subprocess.run([str(host.bin / "bash"), "-c", "command -v apt-get"], env={"PATH": str(host.bin)},
                          capture_output=True, text=True, check=False)
    assert proc.stdout.strip() == str(host.bin / "apt-get") and os.access(host.bin / "apt-get", os.X_OK)


def test_each_phase_is_one_timed_line_and_apt_and_pip_write_to_the_log(host: FakeHost) -> None:
    proc = host.run()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines == [line for line in lines if line.startswith("setup: ")], proc.stderr  # nothing of apt's
    log = host.repo / "results" / "setup.log"
    installed = [line for line in lines if line.startswith("setup: system packages installed (")]
    assert len(installed) == 1 and re.search(r"\(\d+\.\d s\): .*podman.* \(apt's output: ", installed[0]), lines
    assert installed[0].endswith(f"(apt's output: {log})")
    pip = [line for line in lines if line.startswith("setup: Python dependencies installed")]
    assert len(pip) == 1 and re.search(r"\(\d+\.\d s; ", pip[0]), lines
    text = log.read_text()
    assert "Unpacking package-299 (1.0-1) ..." in text and "$ env DEBIAN_FRONTEND=noninteractive apt-get install" in text


def test_a_failed_apt_install_is_one_line_and_the_log_tail(host: FakeHost) -> None:
    (host.state / "fail-install").touch()
    proc = host.run()
    assert proc.returncode == 1
    log = host.repo / "results" / "setup.log"
    lines = proc.stderr.splitlines()
    failed = [i for i, line in enumerate(lines) if " failed (exit 100); the last lines of " in line]
    assert len(failed) == 1 and lines[failed[0]].startswith("setup: apt-get install ") and lines[failed[0]].endswith(f"{log}:")
    tail = lines[failed[0] + 1:]
    assert tail[-1] == "  | E: Sub-process /usr/bin/dpkg returned an error code (1)" and len(tail) == 20
    assert not host.venv.exists()
