"""The one Podman runner: debug prefix, missing binary, context + stderr, timeouts, image choice.

The ``podman`` on PATH here is a recording shell script (the boundary); the real
binary is exercised in suites/integration/test_live_disk_probe.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agentbox_runtime.container import podman_api
from agentbox_runtime.errors import AgentboxError
from agentbox_runtime.podman import DEFAULT_IMAGE, MISSING, PUBLISHED_IMAGE, Podman, resolve_image


@pytest.fixture()
def fake_podman(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``podman`` script that logs its argv and obeys $FAKE_RC, $FAKE_ERR, $FAKE_SLEEP."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    script = bindir / "podman"
    script.write_text(f"""#!/bin/sh
echo "$*" >> {log}
[ -n "$FAKE_SLEEP" ] && exec /bin/sleep "$FAKE_SLEEP"
[ -n "$FAKE_ERR" ] && echo "$FAKE_ERR" >&2
echo out
exit "${{FAKE_RC:-0}}"
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bindir))
    for name in ("FAKE_RC", "FAKE_ERR", "FAKE_SLEEP", "AGENTBOX_IMAGE"):
        monkeypatch.delenv(name, raising=False)
    return log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_debug_puts_log_level_first() -> None:
    assert Podman().argv(["ps"]) == ["podman", "ps"]
    assert Podman(debug=True).argv(["run", "x"]) == ["podman", "--log-level=debug", "run", "x"]


def test_missing_binary_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    for call in (lambda p: p.capture(["ps"]), lambda p: p.output(["ps"], "ctx"), lambda p: p.status(["ps"])):
        with pytest.raises(AgentboxError, match=f"^{MISSING}$"):
            call(Podman())


def test_output_failure_is_context_and_stderr(fake_podman: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Podman(debug=True).output(["ps"], "ctx") == "out\n"
    assert calls(fake_podman) == ["--log-level=debug ps"]
    monkeypatch.setenv("FAKE_RC", "3")
    with pytest.raises(AgentboxError, match="^listing: boom$"):
        monkeypatch.setenv("FAKE_ERR", "boom")
        Podman().output(["ps"], "listing")
    monkeypatch.delenv("FAKE_ERR")
    with pytest.raises(AgentboxError, match="^listing$"):
        Podman().output(["ps"], "listing")
    assert Podman().status(["ps"]) == 3


def test_timeout_is_status_124_with_a_note(fake_podman: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SLEEP", "5")
    proc = Podman(timeout_s=0.3).capture(["ps"])
    assert proc.returncode == 124 and "timed out after" in proc.stderr


def test_image_choice(fake_podman: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the local default exists is a structured read (the Podman API: its answer is scripted
    here, the real one is checked in suites/integration/test_podman_api.py); the pull is the CLI."""
    exists = {"rc": 0}

    def image_exists(ref: str) -> bool:
        with open(fake_podman, "a") as log:
            log.write(f"api image exists {ref}\n")
        return exists["rc"] == 0

    monkeypatch.setattr(podman_api, "image_exists", image_exists)
    podman = Podman()
    assert resolve_image(podman, "ex/plicit:1", pull_latest=True) == "ex/plicit:1"
    assert calls(fake_podman) == []  # an explicit image wins: no pull, no lookup
    monkeypatch.setenv("AGENTBOX_IMAGE", "from/env:2")
    assert resolve_image(podman, None, pull_latest=False) == "from/env:2"
    monkeypatch.delenv("AGENTBOX_IMAGE")
    assert resolve_image(podman, None, pull_latest=False) == DEFAULT_IMAGE
    assert calls(fake_podman) == [f"api image exists {DEFAULT_IMAGE}"]
    assert resolve_image(podman, None, pull_latest=True) == PUBLISHED_IMAGE
    assert calls(fake_podman)[-1] == f"pull {PUBLISHED_IMAGE}"
    monkeypatch.setenv("FAKE_RC", "1")
    exists["rc"] = 1
    assert resolve_image(podman, None, pull_latest=False) == PUBLISHED_IMAGE
    with pytest.raises(AgentboxError, match=f"^podman pull '{PUBLISHED_IMAGE}' failed$"):
        resolve_image(podman, None, pull_latest=True)
    assert os.environ.get("AGENTBOX_IMAGE") is None
