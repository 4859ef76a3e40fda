"""An ``overlay-review`` workspace under a real guest: dev writes, changes, renames and deletes
files in /workspace; the host reviews that (deletions and renames included), renders the patch,
and applies it onto the untouched source."""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.mark.parametrize("workspace", ["overlay-review"], indirect=True)
def test_the_guest_s_writes_changes_renames_and_deletions_are_reviewed_then_applied(workspace, microvm_factory) -> None:  # type: ignore[no-untyped-def]
    src = workspace.source
    (src / "keep.txt").write_text("one\ntwo\n")
    (src / "old.txt").write_text("moves along\n")
    (src / "drop.txt").write_text("bye\n")
    (src / "tree").mkdir(exist_ok=True)
    (src / "tree" / "leaf").write_text("leaf\n")
    owner = src.stat()
    for path in (src / "keep.txt", src / "old.txt", src / "drop.txt", src / "tree", src / "tree" / "leaf"):
        os.chown(path, owner.st_uid, owner.st_gid)  # the project's files are its owner's (dev in the guest)
    workspace.discard()  # a fresh overlay: fuse-overlayfs keeps the lower listing it read first
    microvm = microvm_factory()
    microvm.succeed("cd /workspace && echo two-changed > keep.txt && echo fresh > new.txt && mv old.txt moved.txt"
                    " && rm drop.txt && rm -r tree && sync")
    microvm.shutdown()
    review = workspace.review()
    assert (review.added, review.modified, review.deleted, review.renamed) == \
        (["new.txt"], ["keep.txt"], ["drop.txt", "tree/leaf"], [("old.txt", "moved.txt")])
    assert (src / "drop.txt").exists() and (src / "old.txt").exists(), "nothing reaches the source before apply"
    text = workspace.patch()
    assert "-one\n-two\n+two-changed\n" in text and "rename from old.txt\nrename to moved.txt\n" in text
    assert "deleted file mode 100644\n" in text and "--- a/tree/leaf\n+++ /dev/null\n" in text
    workspace.apply()
    assert not any((src / name).exists() for name in ("old.txt", "drop.txt", "tree"))
    assert (src / "keep.txt").read_text() == "two-changed\n" and (src / "moved.txt").read_text() == "moves along\n"
    assert (src / "new.txt").read_text() == "fresh\n"
