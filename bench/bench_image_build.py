"""Base image build per phase, and its import step with Podman's temporary files in /var/tmp or on
the /dev/shm tmpfs (needs root).

One Debian root is built as ``agentbox image build`` does (in ``$AGENTBOX_BUILD_DIR`` if set;
the phases the build logs), then imported with ``import_root`` ``--rounds`` times each way,
alternating: ``old`` with the default environment (temporary copies of the layer in /var/tmp,
what the build does) and ``new`` with ``TMPDIR`` on /dev/shm; ``--new-first`` swaps the order.
Every import starts with no bench image in storage: an identical layer already there would be
reused, not applied (that made the second of two same-tree imports look 3x faster). The images
get temporary tags and are removed. Prints one JSON document; run it under
``flock /tmp/agentbox-vm.lock``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from agentbox_runtime.images.commit import import_root
from agentbox_runtime.images.rootfs import build_root
from agentbox_runtime.images.workdir import work_dir

DONE = re.compile(r"^agentbox image: (.+) done in ([0-9.]+)s$")
TAGS = {"old": "localhost/agentbox-bench-old:tmp", "new": "localhost/agentbox-bench-new:tmp"}


class Phases(logging.Handler):
    """Collects the ``<step> done in N.Ns`` lines of the build steps, by short step name."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        """Record one finished step."""
        match = DONE.match(record.getMessage())
        if match:
            self.seconds[re.sub(r" (\(|bookworm|localhost/|base image).*", "", match.group(1))] = float(match.group(2))


def listing(tag: str) -> set[tuple[object, ...]]:
    """(path, mode, uid, gid, size, link) of every entry of a local image."""
    top = subprocess.run(["podman", "image", "mount", tag], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        entries: set[tuple[object, ...]] = set()
        for dirpath, dirs, files in os.walk(top):
            for name in dirs + files:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                link = os.readlink(path) if os.path.islink(path) else ""
                size = st.st_size if os.path.isfile(path) and not link else 0
                entries.add((os.path.relpath(path, top), st.st_mode, st.st_uid, st.st_gid, size, link))
        return entries
    finally:
        subprocess.run(["podman", "image", "unmount", tag], capture_output=True, check=False)


def import_once(root: Path, way: str, log: Path) -> float:
    """Seconds of one import of ``root`` the ``way`` (old/new) into its temporary tag, with no earlier
    bench image in storage (so the layer is applied in full every time)."""
    for tag in TAGS.values():  # a layer already in storage is reused, not applied again: none may be
        subprocess.run(["podman", "rmi", "--force", tag], capture_output=True, check=False)
    tmp = tempfile.mkdtemp(prefix="agentbox-bench-", dir="/dev/shm") if way == "new" else ""
    saved = os.environ.get("TMPDIR")
    try:
        if tmp:
            os.environ["TMPDIR"] = tmp
        started = time.monotonic()
        import_root(root, TAGS[way], "bench", log)
        return round(time.monotonic() - started, 1)
    finally:
        if tmp:
            os.environ.pop("TMPDIR")
            if saved is not None:
                os.environ["TMPDIR"] = saved
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    """Build, import both ways, print the JSON, remove the temporary images."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="imports per way (alternating)")
    parser.add_argument("--new-first", action="store_true", help="import the new way first after the build")
    args = parser.parse_args()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-image-build.log"
    log.write_text("")
    handler = Phases()
    logging.getLogger("agentbox").addHandler(handler)
    logging.getLogger("agentbox").setLevel(logging.INFO)
    imports: dict[str, list[float]] = {"old": [], "new": []}
    out: dict[str, object] = {"log": str(log), "first": "new" if args.new_first else "old"}
    try:
        with work_dir() as tmp:
            build_root(tmp / "root", log)
            phases = {k: v for k, v in handler.seconds.items()}
            for _ in range(args.rounds):
                for way in ("new", "old") if args.new_first else ("old", "new"):
                    imports[way].append(import_once(tmp / "root", way, log))
        old, new = (statistics.median(imports[w]) for w in ("old", "new"))
        build = round(sum(phases.values()), 1)
        out |= {"root_phases": phases, "imports": imports, "import_median": {"old": old, "new": new},
                "import_ratio_new_old": round(new / old, 3),
                "base_total": {"old": round(build + old, 1), "new": round(build + new, 1)},
                "base_ratio_new_old": round((build + new) / (build + old), 3),
                "last_import_listing_entries": len(listing(TAGS["old" if args.new_first else "new"]))}
    finally:
        for tag in TAGS.values():
            subprocess.run(["podman", "rmi", "--force", tag], capture_output=True, check=False)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
