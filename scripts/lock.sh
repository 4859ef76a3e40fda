#!/usr/bin/env bash
# Refresh requirements.lock from pyproject.toml: every dependency (with the test extra) pinned, with
# the sha256 of every file PyPI has for it, for every platform and Python >= 3.11 (uv's universal
# resolution). scripts/setup.sh installs from it with pip --require-hashes.
#
#   scripts/lock.sh            # then commit requirements.lock
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install -q uv
cd "$repo"
"$tools/venv/bin/uv" pip compile pyproject.toml --extra test --universal --python-version 3.11 \
  --generate-hashes -o requirements.lock -q
echo "requirements.lock: $(grep -c '^[a-z]' requirements.lock) packages pinned with hashes"
