#!/usr/bin/env bash
# Install what agentbox-harness needs on a Debian/Ubuntu host, idempotently.
#
#   scripts/setup.sh            system packages (apt) + .venv with the Python deps
#
# Safe to re-run: packages already installed are skipped, and the virtualenv is
# re-installed only when pyproject.toml or the interpreter changed (a Python
# upgrade rebuilds it). Needs root (or sudo) for apt. Package names are resolved
# per distribution (Debian 12/13, Ubuntu 22.04/24.04: t64 renames, virtiofsd);
# on a host without apt it prints what to install and exits 2.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
min_python=3.11

# One package list: the host tools every backend and test tier uses. "a|b" means
# the first of a, b that this distribution has (newer names first).
packages=(
  python3 python3-venv git gcc
  podman buildah crun runc conmon uidmap slirp4netns passt fuse-overlayfs
  btrfs-progs util-linux kmod socat
  qemu-system-x86 qemu-utils
  debootstrap busybox-static "libarchive13t64|libarchive13" nix-bin zstd
)

say() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else say "need root to run: $*"; say "re-run as root or install sudo"; exit 1
  fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
available() { apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [^(]'; }

if ! command -v apt-get >/dev/null 2>&1; then
  say "this host has no apt-get; install these with your package manager, then re-run:"
  say "  python3 (>= $min_python) with venv, git, gcc, podman, buildah, crun, runc, conmon, uidmap,"
  say "  slirp4netns, passt, fuse-overlayfs, btrfs-progs, util-linux, kmod, socat, qemu-system-x86,"
  say "  qemu-utils, debootstrap, a static busybox, libarchive, nix, zstd"
  exit 2
fi

updated=0
apt_update() {
  if [ "$updated" -eq 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    updated=1
  fi
}

missing=()
for spec in "${packages[@]}"; do
  IFS='|' read -r -a names <<< "$spec"
  have=""
  for name in "${names[@]}"; do
    if installed "$name"; then have=$name; break; fi
  done
  [ -n "$have" ] && continue
  pick="${names[0]}"
  if [ "${#names[@]}" -gt 1 ]; then
    apt_update
    for name in "${names[@]}"; do
      if available "$name"; then pick=$name; break; fi
    done
  fi
  missing+=("$pick")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt_update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
else
  say "system packages present"
fi

python=/usr/bin/python3
if ! "$python" -c "import sys; sys.exit(sys.version_info < (${min_python/./, }))" 2>/dev/null; then
  say "$python is $("$python" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo missing); agentbox-harness needs Python >= $min_python"
  say "fix: install a newer python3 (e.g. the deadsnakes python3.12 package on Ubuntu 22.04, or 'uv python install $min_python') and re-run"
  exit 2
fi

# The stamp names the interpreter (path and version), pyproject.toml and the lock: any change reinstalls.
want="$(cat "$repo/pyproject.toml" "$repo/requirements.lock" | sha256sum | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])') $(readlink -f "$python")"
stamp="$venv/.agentbox-installed"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] \
   && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  say "the virtualenv's interpreter is gone (Python upgraded?): recreating $venv"
  rm -rf "$venv"
fi
if [ -x "$venv/bin/python" ] && [ "$("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])')" != "$("$python" -c 'import sys; print(sys.version.split()[0])')" ]; then
  say "the virtualenv was made with another Python: recreating $venv"
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  say "creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python dependencies into $venv (requirements.lock, hash-checked)"
  "$venv/bin/python" -m pip install -q --require-hashes -r "$repo/requirements.lock"
  "$venv/bin/python" -m pip install -q --no-deps -e "$repo"
  echo "$want" > "$stamp"
else
  say "virtualenv up to date"
fi
