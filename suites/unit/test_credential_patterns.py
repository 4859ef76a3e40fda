"""Redaction by pattern (agentbox_runtime.credential_patterns, used by every evidence bundle): each
credential shape goes, with its marker, in plain output, inside JSON strings and inside quoted
arguments; ordinary output that shares a prefix or a header name stays byte for byte."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentbox_runtime.credential_patterns import redact_credentials
from agentbox_runtime.evidence import Redactor

# Shaped like the real thing, made up here (none of these is a live credential).
GITHUB = "ghp_" + "Zq7" * 12
GITHUB_FINE = "github_pat_11AAAAAAA0123456789abc_" + "x1Y2" * 15
GITLAB = "glpat-Xy9_abcdefghijKLMNOPQRST"
OPENAI = "sk-proj-Ab3defGhijklmnopqrstuvwxyz0123"
ANTHROPIC = "sk-ant-api03-" + "Qw3_" * 20
SLACK = "xoxb-123456789012-1234567890123-AbCdEfGhIjKl"
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
PEM_BODY = "MIIEpAIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo\n4lgOEePzNm0tRgeLezV6ffAt0gunVTLw\n"
PEM = f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}-----END RSA PRIVATE KEY-----"

TOKENS = [(GITHUB, "github-token"), (GITHUB_FINE, "github-token"), (GITLAB, "gitlab-token"), (OPENAI, "api-key"),
          (ANTHROPIC, "api-key"), (SLACK, "slack-token"), (AWS_ID, "aws-access-key-id"), (JWT, "jwt"),
          (PEM, "private-key")]


@pytest.mark.parametrize("secret,kind", TOKENS, ids=[k for _, k in TOKENS])
@pytest.mark.parametrize("frame", ["{}", "export X={}\n", "before {} after", "'{}'", "key: {}\r\n"])
def test_each_token_shape_goes_with_its_marker_and_the_words_around_it_stay(secret: str, kind: str,
                                                                          frame: str) -> None:
    assert redact_credentials(frame.format(secret)) == frame.format(f"[REDACTED:{kind}]")


@pytest.mark.parametrize("label", ["RSA PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY", "PRIVATE KEY",
                                   "ENCRYPTED PRIVATE KEY", "PGP PRIVATE KEY BLOCK"])
def test_a_private_key_block_goes_whole_in_text_and_in_json(label: str) -> None:
    block = f"-----BEGIN {label}-----\nProc-Type: 4,ENCRYPTED\n\n{PEM_BODY}-----END {label}-----"
    assert redact_credentials(f"key:\n{block}\nnext line\n") == "key:\n[REDACTED:private-key]\nnext line\n"
    transcript = json.dumps({"stdout": f"x\n{block}\ny", "exit_status": 0})
    redacted = redact_credentials(transcript)
    assert json.loads(redacted) == {"stdout": "x\n[REDACTED:private-key]\ny", "exit_status": 0}


def test_a_key_cut_before_its_end_loses_its_base64_lines_and_keeps_the_next_words() -> None:
    cut = f"-----BEGIN OPENSSH PRIVATE KEY-----\n{PEM_BODY}b3BlbnNz\n\nssh: the key was truncated (see above)\n"
    assert redact_credentials(cut) == "[REDACTED:private-key]\nssh: the key was truncated (see above)\n"


def test_two_keys_go_as_two_blocks_and_the_text_between_stays() -> None:
    text = f"{PEM}\nbetween\n{PEM.replace('RSA', 'EC')}"
    assert redact_credentials(text) == "[REDACTED:private-key]\nbetween\n[REDACTED:private-key]"


@pytest.mark.parametrize("line,kept", [
    ("> Authorization: Bearer abc.def-ghi~jkl", "> Authorization: "),
    ("authorization: token ghx_0123456789abcdef", "authorization: "),
    ("Proxy-Authorization: Basic dXNlcjpwYXNzd29yZA==", "Proxy-Authorization: "),
    ("Authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830, Signature=5d67", "Authorization: "),
    ("Authorization: 0123456789abcdef0123", "Authorization: "),
])
def test_authorization_header_values_go_and_the_header_name_stays(line: str, kept: str) -> None:
    assert redact_credentials(line + "\n< HTTP/1.1 200 OK\n") == kept + "[REDACTED:authorization]\n< HTTP/1.1 200 OK\n"


def test_a_header_in_a_quoted_argument_is_cut_at_its_closing_quote() -> None:
    argv = json.dumps(["curl", "-H", "Authorization: Bearer s3cr3t-value", "https://example.test/"])
    assert json.loads(redact_credentials(argv)) == ["curl", "-H", "Authorization: [REDACTED:authorization]",
                                                    "https://example.test/"]
    assert redact_credentials("curl -H 'Authorization: token abcdef12345' -sS x") == \
        "curl -H 'Authorization: [REDACTED:authorization]' -sS x"


@pytest.mark.parametrize("line,kept", [
    ("< Set-Cookie: session=0f3a9c; Path=/; HttpOnly", "< Set-Cookie: "),
    ("Cookie: a=1; b=2", "Cookie: "),
    ("aws_secret_access_key = " + AWS_SECRET, "aws_secret_access_key = "),
    ("AWS_SECRET_ACCESS_KEY:" + AWS_SECRET, "AWS_SECRET_ACCESS_KEY:"),
])
def test_cookie_and_aws_secret_values_go_and_their_names_stay(line: str, kept: str) -> None:
    kind = "aws-secret-access-key" if "aws" in line.lower() else "cookie"
    assert redact_credentials(line) == f"{kept}[REDACTED:{kind}]"


ORDINARY = [
    "Authorization: required", "authorization: denied for user dev", "cookie: chocolate chip",
    "sk-learn-compatible-estimators-and-more", "ask-me-anything-about-the-weather-today",
    "ghp_short", "my ghp_ note", "xoxb-nodigits-here-at-all", "AKIAIOSFODNN7EXAMPLEX (21 chars)",
    "eyJhbGciOiJIUzI1NiJ9 only a header", "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----",
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
    "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "commit 9b67334e2d1c0b2a9f8e7d6c5b4a39281706f5e4", "uuid 123e4567-e89b-12d3-a456-426614174000",
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin", "password: (none set)",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_output_stays_byte_for_byte(text: str) -> None:
    assert redact_credentials(text) == text


WORDS = st.text(alphabet=string.ascii_letters + string.digits + " .,:;=/-_()\n", max_size=200)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ORDINARY) | WORDS, max_size=6))
def test_text_without_a_credential_prefix_or_header_stays(parts: list[str]) -> None:
    """Anything built from ordinary lines and words is kept whole (no marker appears from nowhere)."""
    text = "\n".join(parts)
    lowered = text.lower()
    if any(p in lowered for p in ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-", "sk-", "xox",
                                  "akia", "asia", "abia", "acca", "eyj", "private key", "authorization",
                                  "cookie", "aws_secret")):
        return  # a credential-shaped run could be built here; the cases above pin those
    assert redact_credentials(text) == text


@settings(max_examples=200, deadline=None)
@given(before=WORDS, after=WORDS, secret=st.sampled_from([s for s, _ in TOKENS]))
def test_a_token_anywhere_in_text_never_survives(before: str, after: str, secret: str) -> None:
    text = f"{before} {secret}\n{after}"
    assert secret not in redact_credentials(text)
    assert "[REDACTED:" in redact_credentials(text)


def test_the_redactor_applies_patterns_to_text_env_and_bytes_without_registered_secrets() -> None:
    r = Redactor()
    assert r.text(f"token={GITHUB}") == "token=[REDACTED:github-token]"
    assert r.env({"GREETING": f"hi {SLACK}", "HOME": "/home/dev"}) == {"GREETING": "hi [REDACTED:slack-token]",
                                                                      "HOME": "/home/dev"}
    data = b"\xff\xfe binary " + AWS_ID.encode() + b" \x00end"
    assert r.data(data) == b"\xff\xfe binary [REDACTED:aws-access-key-id] \x00end"
    assert r.data(b"\xff\xfeplain\x00") == b"\xff\xfeplain\x00"  # binary without credentials is unchanged


def test_known_values_and_patterns_together() -> None:
    r = Redactor()
    r.register("hunter2-known")
    assert r.text(f"pw hunter2-known and Authorization: Bearer {GITHUB}") == \
        "pw [REDACTED] and Authorization: [REDACTED:authorization]"


def test_credentials_at_line_starts_inside_a_json_string_go_too() -> None:
    """A transcript stores output as JSON: ``\\n`` before a line's first word is an escape there, not
    a word character glued to the credential (found by the real-guest evidence smoke item)."""
    lines = [s for s, _ in TOKENS] + ["Authorization: Bearer abc123DEF456ghi789", "Set-Cookie: sid=0f3a9c",
                                      "aws_secret_access_key=" + AWS_SECRET, "ordinary line stays"]
    transcript = json.dumps({"stdout_tail": "\n".join(lines), "tab": "\t" + GITHUB})
    redacted = redact_credentials(transcript)
    for secret in [s for s, _ in TOKENS] + ["abc123DEF456ghi789", "sid=0f3a9c", AWS_SECRET]:
        assert secret not in redacted
    back = json.loads(redacted)
    assert back["stdout_tail"].splitlines()[-4:] == ["Authorization: [REDACTED:authorization]",
                                                     "Set-Cookie: [REDACTED:cookie]",
                                                     "aws_secret_access_key=[REDACTED:aws-secret-access-key]",
                                                     "ordinary line stays"]
    assert back["tab"] == "\t[REDACTED:github-token]"
