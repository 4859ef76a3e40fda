"""An evidence bundle (``--agentbox-evidence``) from a real guest run, on the session's VM backend:
a guest prints credential-looking text (a GitHub token, an ``Authorization:`` header, an AWS key
id, a PEM private key) and a registered secret, on its stdout and on its console (through the
kernel log). The bundle verifies with ``agentbox evidence verify``; no file of it holds any of
those values; the markers stand where they were, and ordinary output stays.

The guest builds each value from pieces, so the commands' argv never holds one whole: what the
bundle redacts is what the guest printed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vm

GITHUB = "ghp_" + "Zq7" * 12
BEARER = "abc123DEF456ghi789"
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
PEM_LINE = "MIIEpAIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo"
REGISTERED = "registered-secret-12345"
SECRETS = (GITHUB, BEARER, AWS_ID, PEM_LINE, REGISTERED)

INNER = r'''
LEAK = r"""
z=$(printf 'Zq7%.0s' 1 2 3 4 5 6 7 8 9 10 11 12)
printf 'clone with gh%s_%s\n' p "$z"
printf 'Authorization: Bearer %s%s\n' abc123DEF 456ghi789
printf 'aws key AK%s\n' IAIOSFODNN7EXAMPLE
printf -- '-----BEGIN RSA PRIVATE %s-----\n%s%s\n-----END RSA PRIVATE %s-----\n' KEY MIIEpAIBAAKCAQEA u1SU1LfVLPHCozMxH2Mo KEY
printf 'registered-%s-12345\n' secret
echo ordinary line stays
"""


def test_leaky_guest(microvm, agentbox_session):
    agentbox_session.register_secret("registered-secret-12345")
    out = microvm.succeed(LEAK, timeout=120)
    assert "ghp_Zq7" in out and "Bearer abc123DEF456ghi789" in out and "BEGIN RSA PRIVATE KEY" in out
    # the same lines on the console, one kernel log record each
    microvm.succeed(f"({LEAK}) | while IFS= read -r l; do echo \"<2>leak: $l\" > /dev/kmsg; done",
                    timeout=120, user="root")
    microvm.console.wait_for_text("leak: ordinary line stays", timeout=120)
    assert "AKIAIOSFODNN7EXAMPLE" in microvm.console_tail(40)
'''


def test_a_real_guests_bundle_verifies_and_holds_no_credential(pytester: pytest.Pytester, agentbox_session) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(test_leak=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--agentbox-backend", agentbox_session.backend,
                                           "--agentbox-evidence", timeout=1800)
    result.assert_outcomes(passed=1)
    bundle = pytester.path / "results" / "evidence" / "test_leak.py_test_leaky_guest"
    verify = subprocess.run([sys.executable, "-m", "agentbox_runtime.cli", "evidence", "verify", str(bundle)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and ": ok, " in verify.stdout, verify.stdout + verify.stderr

    files = {p.name: p.read_text(errors="replace") for p in bundle.rglob("*") if p.is_file()}
    for name, text in files.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} is in the bundle's {name}"

    (transcript,) = [t for n, t in files.items() if n.endswith("-transcript.json")]
    (leak,) = [e for e in json.loads(transcript) if "ordinary line stays" in e["stdout_tail"]]
    assert leak["exit_status"] == 0
    printed = leak["stdout_tail"]
    for line in ("clone with [REDACTED:github-token]", "Authorization: [REDACTED:authorization]",
                 "aws key [REDACTED:aws-access-key-id]", "[REDACTED:private-key]", "[REDACTED]",
                 "ordinary line stays"):
        assert line in printed, printed

    (console,) = [t for n, t in files.items() if n.endswith("-console.log")]
    for marker in ("[REDACTED:github-token]", "[REDACTED:authorization]", "[REDACTED:aws-access-key-id]",
                   "[REDACTED:private-key]", "leak: [REDACTED]"):
        assert marker in console, console[-3000:]
    assert "leak: ordinary line stays" in console
