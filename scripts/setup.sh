#!/usr/bin/env bash
# Install what agentbox-harness needs on a Debian/Ubuntu host, idempotently.
#
#   scripts/setup.sh            system packages (apt) + .venv with the Python deps
#
# Safe to re-run: packages already installed are skipped, and the virtualenv is
# re-installed only when pyproject.toml, requirements.lock or the interpreter
# changed. Needs root (or sudo) for apt.
#
# Distributions (Debian 12 and 13, Ubuntu 22.04 and 24.04): package names are
# resolved by asking apt, not by a table of releases:
#   - "a|b" installs the first of a, b that apt offers (t64 renames: Debian 13 and
#     Ubuntu 24.04 have libarchive13t64, Debian 12 and Ubuntu 22.04 libarchive13);
#   - "name?" is installed where apt offers it and otherwise skipped with a note
#     (passt: Ubuntu 22.04 has none; libkrun tasks then need --tsi);
#   - a required package apt does not offer stops the script with one line naming it.
#   virtiofsd is not installed anywhere: the qemu backend shares over 9p, built into
#   qemu-system-x86 on all four, and libkrun serves virtio-fs itself (so it does not
#   matter that Ubuntu 22.04 ships virtiofsd inside qemu-system-common while the
#   others have a virtiofsd package). Podman or crun older than the oldest tested
#   here (Debian 12's: podman 4.3, crun 1.8; Ubuntu 22.04 has podman 3.4, crun 0.17)
#   get a note.
#
# Python: the virtualenv needs Python >= 3.11 (pyproject.toml's requires-python).
# The interpreter is the first of $AGENTBOX_PYTHON (a path, or several separated
# by spaces; default "/usr/bin/python3 /usr/bin/python3.14 /usr/bin/python3.13
# /usr/bin/python3.12 /usr/bin/python3.11") that is new enough. When none is
# (Ubuntu 22.04's python3 is 3.10), or it lacks the venv module, the script exits
# 2 with one line naming the version it found and the fix; nothing is created.
# The virtualenv is recreated when the interpreter changes (another version or
# another file, e.g. after a Python upgrade).
#
# On a host without apt-get it prints what to install and exits 2.
#
# Output: one "setup: ..." line per phase with its time. What apt and pip print goes to a log
# ($AGENTBOX_SETUP_LOG, default results/setup.log, rewritten each run) that the phase line names;
# when a step fails, its one line is followed by the log's last lines.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
min_python=3.11
pythons=${AGENTBOX_PYTHON:-/usr/bin/python3 /usr/bin/python3.14 /usr/bin/python3.13 /usr/bin/python3.12 /usr/bin/python3.11}

# One package list: the host tools every backend and test tier uses (see the header
# for "a|b" and "name?").
packages=(
  python3 python3-venv git gcc
  podman buildah crun runc conmon uidmap slirp4netns "passt?" fuse-overlayfs
  btrfs-progs util-linux kmod socat
  qemu-system-x86 qemu-utils
  debootstrap busybox-static "libarchive13t64|libarchive13" nix-bin zstd
  # building crun --with-libkrun for the slow tier's real-crun test (suites/standins/crun): the
  # release tarball ships configure, so no autotools; only the crun binary is built (no go-md2man)
  make "pkgconf|pkg-config" libseccomp-dev libcap-dev libyajl-dev libsystemd-dev
)
# Oldest versions tested (Debian 12's); older ones get a note, not an error.
tested_versions=(podman=4.3 crun=1.8)

say() { printf 'setup: %s\n' "$*" >&2; }

log=${AGENTBOX_SETUP_LOG:-$repo/results/setup.log}
mkdir -p "$(dirname "$log")"
: > "$log"

# A clock in microseconds (bash's EPOCHREALTIME) and the time since one, as "N.N s".
clock() { echo "${EPOCHREALTIME/./}"; }
since() {
  local us=$(( $(clock) - $1 ))
  printf '%d.%d s' $(( us / 1000000 )) $(( us / 100000 % 10 ))
}

# logged WHAT CMD...: run CMD with its output appended to the log; when it fails, one line
# naming WHAT and the exit status, then the log's last lines, and exit 1.
logged() {
  local what=$1 rc=0 shown
  shift
  shown="$*"
  printf '\n$ %s\n' "${shown#as_root }" >> "$log"
  "$@" >> "$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    say "$what failed (exit $rc); the last lines of $log:"
    tail -n 20 "$log" | sed 's/^/  | /' >&2
    exit 1
  fi
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else say "need root to run: $*; re-run as root or install sudo"; exit 1
  fi
}

# (no "| grep -q" here: grep quitting early kills a long writer with SIGPIPE, which pipefail
# turns into "not available")
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
available() {
  local policy
  policy=$(apt-cache policy "$1" 2>/dev/null) || return 1
  [[ $policy == *"Candidate: "* && $policy != *"Candidate: (none)"* ]]
}
# a <= b for dotted versions
version_le() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$1" ]; }

if ! command -v apt-get >/dev/null 2>&1; then
  wanted=()
  for spec in "${packages[@]}"; do
    case "$spec" in
      python3) wanted+=("python3 (>= $min_python)") ;;
      python3-venv) wanted+=("python3's venv module") ;;
      *'?') wanted+=("${spec%\?} (optional)") ;;
      *) wanted+=("${spec//|/ or }") ;;
    esac
  done
  say "this host has no apt-get; install these (Debian names) with your package manager, then re-run:"
  say "  $(IFS=,; echo "${wanted[*]}" | sed 's/,/, /g')"
  exit 2
fi

updated=0
apt_update() {
  if [ "$updated" -eq 0 ]; then
    logged "apt-get update" as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    updated=1
  fi
}
packages_started=$(clock)

# What is not installed; apt's lists are refreshed only when a required package is among it
# (an optional package this distribution lacks costs no apt-get update on every run).
todo=()
for spec in "${packages[@]}"; do
  IFS='|' read -r -a names <<< "${spec%\?}"
  have=""
  for name in "${names[@]}"; do
    if installed "$name"; then have=$name; break; fi
  done
  [ -z "$have" ] && todo+=("$spec")
done
for spec in "${todo[@]}"; do
  case "$spec" in *'?') ;; *) apt_update; break ;; esac
done
missing=() unavailable=() skipped=()
for spec in "${todo[@]}"; do
  optional=0
  case "$spec" in *'?') optional=1; spec=${spec%\?} ;; esac
  IFS='|' read -r -a names <<< "$spec"
  pick=""
  for name in "${names[@]}"; do
    if available "$name"; then pick=$name; break; fi
  done
  if [ -n "$pick" ]; then missing+=("$pick")
  elif [ "$optional" -eq 1 ]; then skipped+=("$spec")
  else unavailable+=("${spec//|/ or }")
  fi
done
if [ ${#unavailable[@]} -gt 0 ]; then
  say "apt offers no package for: ${unavailable[*]} (on Ubuntu enable the universe component: add-apt-repository universe); nothing was installed"
  exit 1
fi
for name in "${skipped[@]}"; do
  say "note: apt offers no $name here; skipped (the features that need it say so: agentbox doctor)"
done
if [ ${#missing[@]} -gt 0 ]; then
  logged "apt-get install ${missing[*]}" as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  say "system packages installed ($(since "$packages_started")): ${missing[*]} (apt's output: $log)"
else
  say "system packages present ($(since "$packages_started"))"
fi
for entry in "${tested_versions[@]}"; do
  name=${entry%%=*} oldest=${entry#*=}
  version=$(dpkg-query -W -f='${Version}' "$name" 2>/dev/null) || continue
  upstream=${version#*:}
  upstream=${upstream%%[-+~]*}
  if [ -n "$upstream" ] && [ "$upstream" != "$oldest" ] && version_le "$upstream" "$oldest"; then
    say "note: $name $upstream is older than the oldest tested ($oldest, Debian 12's); if a backend that uses it fails, install a newer $name"
  fi
done

# The interpreter: the first candidate that runs and is new enough.
python="" found=""
for candidate in $pythons; do
  version=$("$candidate" -c 'import sys; print(*sys.version_info[:3], sep=".")' 2>/dev/null) || continue
  [ -z "$found" ] && found="$candidate is $version"
  if version_le "$min_python" "$version"; then python=$candidate; break; fi
done
if [ -z "$python" ]; then
  fix="'uv python install $min_python' and re-run with AGENTBOX_PYTHON=\"\$(uv python find $min_python)\""
  for minor in 14 13 12 11; do
    if version_le "$min_python" "3.$minor" && available "python3.$minor"; then
      fix="apt-get install python3.$minor python3.$minor-venv, or $fix"
      break
    fi
  done
  say "agentbox-harness needs Python >= $min_python, but ${found:-no python3 was found ($pythons)}; fix: $fix"
  exit 2
fi
if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  name=$(basename "$(readlink -f "$python")")
  say "$python ($version) has no venv module (ensurepip); fix: apt-get install $name-venv (or use another Python with AGENTBOX_PYTHON=...), then re-run"
  exit 2
fi

# The stamp names the dependencies (pyproject.toml and the lock) and the interpreter (version
# and file): another interpreter recreates the virtualenv, other dependencies reinstall them.
interpreter="$version $(readlink -f "$python")"
want="$(cat "$repo/pyproject.toml" "$repo/requirements.lock" | sha256sum | cut -d' ' -f1) $interpreter"
stamp="$venv/.agentbox-installed"
if [ -e "$venv" ]; then
  why=""
  stamped=$(cat "$stamp" 2>/dev/null || true)
  if ! made=$("$venv/bin/python" -c 'import sys; print(*sys.version_info[:3], sep=".")' 2>/dev/null); then
    why="its interpreter does not run (Python upgraded or removed?)"
  elif [ "$made" != "$version" ]; then
    why="it was made with Python $made, this is $version"
  elif [ -n "$stamped" ] && [ "${stamped#* }" != "$interpreter" ]; then
    why="it was made with ${stamped#* }, this is $interpreter"
  fi
  if [ -n "$why" ]; then
    say "recreating $venv: $why"
    rm -rf "$venv"
  fi
fi
if [ ! -e "$venv" ]; then
  say "creating virtualenv $venv with $python ($version)"
  if ! "$python" -m venv "$venv"; then
    rm -rf "$venv"
    say "'$python -m venv $venv' failed (see above); nothing was kept"
    exit 1
  fi
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  deps_started=$(clock)
  logged "pip install -r requirements.lock" "$venv/bin/python" -m pip install --require-hashes -r "$repo/requirements.lock"
  logged "pip install -e $repo" "$venv/bin/python" -m pip install --no-deps -e "$repo"
  echo "$want" > "$stamp"
  say "Python dependencies installed into $venv ($(since "$deps_started"); requirements.lock, hash-checked; pip's output: $log)"
else
  say "virtualenv up to date"
fi
