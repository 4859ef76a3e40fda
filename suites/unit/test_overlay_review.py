"""The overlay review: a real fuse-overlayfs mount over a source tree, changed through the mount
the way a guest changes /workspace, then reviewed, rendered as a patch (checked with `git apply`)
and applied; plus the whiteout spellings an overlay may use, on hand-made upper layers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbox_harness.overlay_review import Review, apply, patch, scan
from agentbox_harness.workspace import Workspace


def make_source(root: Path) -> None:
    (root / "src").mkdir(parents=True)
    (root / "README").write_text("hello\nworld\n")
    (root / "src" / "main.py").write_text("print('v1')\n")
    (root / "src" / "old_name.txt").write_text("moves\n")
    (root / "doomed").mkdir()
    (root / "doomed" / "a").write_text("a\n")
    (root / "doomed" / "b").write_text("b\n")
    (root / "gone.txt").write_text("bye\n")
    (root / "run.sh").write_text("#!/bin/sh\n")


def guest_edits(ws: Path) -> None:
    """What a guest does: write, change, delete (a file and a tree), rename, chmod."""
    (ws / "README").write_text("hello\nthere\n")
    (ws / "new.txt").write_text("fresh\n")
    (ws / "gone.txt").unlink()
    shutil.rmtree(ws / "doomed")
    os.rename(ws / "src" / "old_name.txt", ws / "src" / "new_name.txt")
    (ws / "run.sh").chmod(0o755)


@pytest.fixture()
def overlay(tmp_path: Path) -> Iterator[Workspace]:
    if shutil.which("fuse-overlayfs") is None:
        pytest.skip("fuse-overlayfs is not installed")
    source = tmp_path / "project"
    make_source(source)
    (source / "run.sh").chmod(0o644)
    ws = Workspace.create(source, tmp_path / "scratch", tmp_path / "state", mode="overlay-review")
    try:
        yield ws
    finally:
        ws.close()


def test_review_names_writes_changes_deletions_and_renames(overlay: Workspace) -> None:
    guest_edits(overlay.path)
    review = overlay.review()
    assert review == Review(added=["new.txt"], modified=["README", "run.sh"],
                            deleted=["doomed/a", "doomed/b", "gone.txt"],
                            renamed=[("src/old_name.txt", "src/new_name.txt")])
    assert overlay.changes() == ["README", "doomed/a", "doomed/b", "gone.txt", "new.txt", "run.sh",
                                 "src/new_name.txt", "src/old_name.txt"]
    assert (overlay.source / "gone.txt").exists(), "review touches nothing"


def test_the_patch_is_a_unified_diff_git_applies_to_the_source(overlay: Workspace, tmp_path: Path) -> None:
    guest_edits(overlay.path)
    text = overlay.patch()
    assert "diff --git a/README b/README\n" in text and "-world\n+there\n" in text
    assert "deleted file mode 100644\n" in text and "+++ /dev/null" in text
    assert "rename from src/old_name.txt\nrename to src/new_name.txt\n" in text
    assert "old mode 100644\nnew mode 100755\n" in text
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = tmp_path / "clone"
    shutil.copytree(overlay.source, clone)
    subprocess.run(["git", "init", "-q"], cwd=clone, check=True)
    (tmp_path / "review.patch").write_text(text)
    subprocess.run(["git", "apply", "--whitespace=nowarn", str(tmp_path / "review.patch")], cwd=clone, check=True,
                   capture_output=True)
    assert sorted(p.name for p in clone.rglob("*") if p.is_file() and ".git" not in p.parts) == \
        ["README", "main.py", "new.txt", "new_name.txt", "run.sh"]
    assert (clone / "README").read_text() == "hello\nthere\n"


def test_apply_carries_everything_out_and_discard_drops_it(overlay: Workspace) -> None:
    guest_edits(overlay.path)
    applied = overlay.apply()
    src = overlay.source
    assert applied.deleted == ["doomed/a", "doomed/b", "gone.txt"]
    assert not (src / "gone.txt").exists() and not (src / "doomed").exists()
    assert (src / "src" / "new_name.txt").read_text() == "moves\n" and not (src / "src" / "old_name.txt").exists()
    assert (src / "README").read_text() == "hello\nthere\n" and (src / "new.txt").read_text() == "fresh\n"
    assert os.stat(src / "run.sh").st_mode & 0o111
    assert not overlay.review(), "after apply the upper layer starts empty"
    assert (overlay.path / "new.txt").read_text() == "fresh\n", "the workspace shows the updated source"
    (overlay.path / "README").unlink()
    overlay.discard()
    assert not overlay.review() and (src / "README").exists() and (overlay.path / "README").exists()


@pytest.mark.parametrize("spelling", ["chardev", "wh-file"])
def test_both_whiteout_spellings_and_opaque_directories(tmp_path: Path, spelling: str) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    make_source(lower)
    upper.mkdir()
    if spelling == "chardev":
        if os.geteuid() != 0:
            pytest.skip("a 0/0 character device needs root")
        os.mknod(upper / "gone.txt", 0o600 | 0o020000, os.makedev(0, 0))
    else:
        (upper / ".wh.gone.txt").write_text("")
    (upper / "doomed").mkdir()  # removed and made again: only what is in it now survives
    (upper / "doomed" / ".wh..wh..opq").write_text("")
    (upper / "doomed" / "b").write_text("b\n")
    review = scan(lower, upper)
    assert review == Review(deleted=["doomed/a", "gone.txt"])
    assert "deleted file mode" in patch(review, lower, upper)
    apply(review, lower, upper)
    assert not (lower / "gone.txt").exists() and sorted(p.name for p in (lower / "doomed").iterdir()) == ["b"]


def test_review_of_a_workspace_that_is_not_an_overlay_says_so(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path / "p", tmp_path / "s", tmp_path / "st", mode="copy")
    with pytest.raises(ValueError, match="review\\(\\) needs an overlay-review workspace; this one is 'copy'"):
        ws.review()


def project_linking_out(tmp_path: Path) -> tuple[Path, Path]:
    """A project whose ``a`` is a symlink to a host directory holding secrets; returns (project, host dir)."""
    host = tmp_path / "hostdir"
    host.mkdir()
    (host / "secret.txt").write_text("HOST-SECRET-1\n")
    (host / "keys").mkdir()
    (host / "keys" / "id").write_text("HOST-SECRET-2\n")
    source = tmp_path / "project"
    source.mkdir()
    (source / "a").symlink_to(host)
    (source / "README").write_text("hi\n")
    return source, host


@pytest.mark.parametrize("how", ["fuse-overlayfs", "plain-dir", "opaque-dir"])
def test_a_project_symlink_replaced_by_a_directory_never_leaks_host_files(tmp_path: Path, how: str) -> None:
    """Finding 8: the guest replaces ``a -> <host dir>`` with a directory of its own. The review
    reads the source inside the project only: ``a`` is a deleted link (shown as its target text)
    and ``a/...`` are added files; no host file's content reaches the patch, and apply writes
    into the project, not through the link."""
    source, host = project_linking_out(tmp_path)
    if how == "fuse-overlayfs":
        if shutil.which("fuse-overlayfs") is None:
            pytest.skip("fuse-overlayfs is not installed")
        ws = Workspace.create(source, tmp_path / "scratch", tmp_path / "state", mode="overlay-review")
        try:
            (ws.path / "a").unlink()
            (ws.path / "a").mkdir()
            (ws.path / "a" / "secret.txt").write_text("guest\n")
            (ws.path / "a" / "keys").mkdir()
            (ws.path / "a" / "keys" / "id").write_text("guest key\n")
            lower, upper = ws.source, ws._layers("patch")[1]
            review, text = scan(lower, upper), ws.patch()
        finally:
            ws.close()
    else:
        lower, upper = source, tmp_path / "upper"
        (upper / "a" / "keys").mkdir(parents=True)
        (upper / "a" / "secret.txt").write_text("guest\n")
        (upper / "a" / "keys" / "id").write_text("guest key\n")
        if how == "opaque-dir":
            (upper / "a" / ".wh..wh..opq").write_text("")
        review, text = scan(lower, upper), patch(scan(lower, upper), lower, upper)
    assert "HOST-SECRET" not in text
    assert review == Review(added=["a/keys/id", "a/secret.txt"], deleted=["a"])
    assert f"diff --git a/a b/a\ndeleted file mode 120000\n--- a/a\n+++ /dev/null\n@@ -1 +0,0 @@\n-{host}\n" \
           "\\ No newline at end of file\n" in text
    assert "diff --git a/a/secret.txt b/a/secret.txt\nnew file mode 100644\n" in text and "+guest\n" in text
    if how != "fuse-overlayfs":
        apply(review, lower, upper)
        assert not (source / "a").is_symlink() and (source / "a" / "secret.txt").read_text() == "guest\n"
        assert (host / "secret.txt").read_text() == "HOST-SECRET-1\n"
        assert (host / "keys" / "id").read_text() == "HOST-SECRET-2\n"


def test_a_hand_made_review_naming_a_path_through_a_project_symlink_reads_nothing(tmp_path: Path) -> None:
    """patch() reads only what is inside each layer, whatever review it is given."""
    source, host = project_linking_out(tmp_path)
    upper = tmp_path / "upper"
    upper.mkdir()
    text = patch(Review(modified=["a/secret.txt"], deleted=["a/keys/id"]), source, upper)
    assert "HOST-SECRET" not in text
    with pytest.raises(ValueError, match="refusing to apply 'a/keys/id': 'a' in .* is not a directory"):
        apply(Review(deleted=["a/keys/id"]), source, upper)
    assert (host / "keys" / "id").exists()


def test_a_fifo_the_guest_made_is_named_not_read(tmp_path: Path) -> None:
    """A FIFO in the upper layer (the share filter lets a guest make one) is never opened for
    reading: scan and patch finish and name it."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    make_source(lower)
    upper.mkdir()
    os.mkfifo(upper / "pipe")
    os.mkfifo(upper / "README")
    code = ("import sys; from pathlib import Path; from agentbox_harness.overlay_review import scan, patch; "
            "lo, up = Path(sys.argv[1]), Path(sys.argv[2]); r = scan(lo, up); print(r); print(patch(r, lo, up))")
    proc = subprocess.run([sys.executable, "-c", code, str(lower), str(upper)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Review(added=['pipe'], modified=['README']" in proc.stdout
    assert "Binary files /dev/null and b/pipe differ" in proc.stdout
