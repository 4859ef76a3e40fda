#!/usr/bin/env bash
# Install what agentbox-harness needs on a Debian/Ubuntu host, idempotently.
#
#   scripts/setup.sh            system packages (apt) + .venv with the Python deps
#
# Safe to re-run: packages already installed are skipped, and the virtualenv is
# only re-installed when pyproject.toml changed. Needs root (or sudo) for apt.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"

# One package list: the host tools every backend and test tier uses.
packages=(
  python3 python3-venv git gcc
  podman buildah crun runc conmon uidmap slirp4netns passt fuse-overlayfs
  btrfs-progs util-linux kmod socat
  qemu-system-x86 qemu-utils
  debootstrap busybox-static libarchive13 nix-bin zstd
)

say() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else say "need root to run: $*"; say "re-run as root or install sudo"; exit 1
  fi
}

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "missing packages ${missing[*]} and no apt-get here; install them with your package manager"
    exit 1
  fi
  say "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
else
  say "system packages present"
fi

stamp="$venv/.agentbox-installed"
want=$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
  say "creating virtualenv $venv"
  /usr/bin/python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python dependencies into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "$repo[test]"
  echo "$want" > "$stamp"
else
  say "virtualenv up to date"
fi
