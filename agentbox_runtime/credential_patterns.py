"""Output that looks like a credential, found by its shape rather than by a known value.

:func:`redact_credentials` replaces each match with ``[REDACTED:<kind>]``. What counts (each
pattern is anchored on a fixed prefix or a header name, so ordinary output is kept):

- ``github-token``: ``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_`` and 36 or more letters and digits,
  and fine-grained ``github_pat_`` tokens;
- ``gitlab-token``: ``glpat-`` and 20 or more characters;
- ``api-key``: ``sk-`` keys (OpenAI, Anthropic ``sk-ant-``) of 20 or more characters with at
  least one digit and one capital, so hyphenated words (``sk-learn-compatible``) are kept;
- ``slack-token``: ``xoxa-``, ``xoxb-``, ``xoxp-``, ``xoxr-``, ``xoxs-``, ``xoxo-`` with a digit;
- ``aws-access-key-id``: ``AKIA``/``ASIA``/``ABIA``/``ACCA`` and 16 capitals or digits; and
  ``aws-secret-access-key``: the 40-character value after ``aws_secret_access_key =`` or ``:``
  (the name is kept);
- ``jwt``: ``eyJ…``.``eyJ…``.``…`` (a JSON header and payload, base64url);
- ``private-key``: a PEM block from ``-----BEGIN … PRIVATE KEY-----`` through its END line
  (RSA, EC, OPENSSH, ENCRYPTED, PGP ``PRIVATE KEY BLOCK``...), in plain text or with JSON's
  ``\\n`` escapes; a block cut before its END loses its BEGIN line and every whole base64 line
  (and ``Proc-Type``/``DEK-Info``/``Comment``/``Version`` header) after it;
- ``authorization``: the value of an ``Authorization:`` or ``Proxy-Authorization:`` header when it
  is a scheme and a credential (``Bearer …``, ``Basic …``, ``token …``...) or one token of 16 or
  more characters (the header name is kept, ``Authorization: required`` is left alone);
- ``cookie``: the value of a ``Cookie:`` or ``Set-Cookie:`` header that holds a ``name=value``.

Words around a match are kept; a match ends where a quote, a backslash or a line end does, so a
header inside a JSON string or a ``curl -H '…'`` argument is cut at its closing quote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MARKER = "[REDACTED:{kind}]"

# No word character glued on either side; a JSON escape (``\n``, ``\t``...) before a match counts
# as the line break it stands for, so a credential at a line start inside a JSON string goes too.
_B, _A = r"(?:(?<![A-Za-z0-9_])|(?<=\\[nrt]))", r"(?![A-Za-z0-9_])"
_SCHEMES = r"(?:Bearer|Basic|Digest|Token|Negotiate|NTLM|AWS4-HMAC-SHA256|OAuth)"
_PEM_NL = r"(?:\r?\n|\\r\\n|\\n)"
_PEM_TAIL = (rf"(?:{_PEM_NL}(?:[A-Za-z0-9+/=]*(?=\r|\n|\\[rn]|\Z)"  # whole base64 lines, or armor headers
             rf"|(?:Proc-Type|DEK-Info|Comment|Version): [^\r\n\\]*))*")

_PEM_BODY = r".{0,32768}?"  # a PEM block is at most a few KiB: a BEGIN without END never scans on


@dataclass(frozen=True)
class _Rule:
    """One credential shape: ``regex`` runs only when one of ``triggers`` occurs in the text (in
    its lowercase form when ``fold``); a ``value`` group, where the regex has one, is all it replaces."""

    kind: str
    triggers: tuple[str, ...]
    regex: re.Pattern[str]
    fold: bool = False

    def sub(self, text: str, lowered: str) -> str:
        if not any(t in (lowered if self.fold else text) for t in self.triggers):
            return text
        marker = MARKER.format(kind=self.kind)
        if "value" in self.regex.groupindex:
            return self.regex.sub(lambda m: m.string[m.start():m.start("value")] + marker, text)
        return self.regex.sub(marker, text)


def _rule(kind: str, triggers: tuple[str, ...], regex: str, fold: bool = False) -> _Rule:
    return _Rule(kind, triggers, re.compile(regex, re.DOTALL), fold)


RULES: tuple[_Rule, ...] = (
    _rule("private-key", ("PRIVATE KEY",), rf"-----BEGIN (?P<pem>[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----"
                                          rf"(?:{_PEM_BODY}-----END (?P=pem)-----|{_PEM_TAIL})"),
    _rule("github-token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
          rf"{_B}(?:gh[pousr]_[A-Za-z0-9]{{36,255}}|github_pat_[A-Za-z0-9_]{{22,255}}){_A}"),
    _rule("gitlab-token", ("glpat-",), rf"{_B}glpat-[A-Za-z0-9_-]{{20,255}}(?![A-Za-z0-9_-])"),
    _rule("api-key", ("sk-",),
          rf"{_B}sk-(?=[A-Za-z0-9_-]*[0-9])(?=[A-Za-z0-9_-]*[A-Z])[A-Za-z0-9_-]{{20,255}}(?![A-Za-z0-9_-])"),
    _rule("slack-token", ("xox",), rf"{_B}xox[abposr]-(?=[A-Za-z0-9-]*[0-9])[A-Za-z0-9-]{{10,255}}(?![A-Za-z0-9-])"),
    _rule("aws-access-key-id", ("AKIA", "ASIA", "ABIA", "ACCA"), rf"{_B}(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{{16}}{_A}"),
    _rule("jwt", ("eyJ",), rf"{_B}eyJ[A-Za-z0-9_-]{{10,}}\.eyJ[A-Za-z0-9_-]{{10,}}\.[A-Za-z0-9_-]*(?![A-Za-z0-9_-])"),
    _rule("aws-secret-access-key", ("aws_secret_access_key",),
          r"(?i:aws_secret_access_key[ \t]*[=:][ \t]*)(?P<value>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])", fold=True),
    _rule("authorization", ("authorization",),
          rf"(?i:{_B}(?:proxy-)?authorization[ \t]*:[ \t]*)(?P<value>(?i:{_SCHEMES})[ \t]+[^\s\"'\\]+[^\r\n\"'\\]*"
          rf"|[A-Za-z0-9._~+/=-]{{16,}}(?![^\s\"'\\]))", fold=True),
    _rule("cookie", ("cookie",),
          r"(?i:(?:(?<![A-Za-z0-9_-])|(?<=\\[nrt]))(?:set-)?cookie[ \t]*:[ \t]*)"
          r"(?P<value>[^\r\n\"'\\=;]+=[^\r\n\"'\\]*)", fold=True),
)
"""The shapes, in the order they apply (a private key block first, whatever it holds)."""


def redact_credentials(text: str) -> str:
    """``text`` with every credential-looking run (see the module text) replaced by its marker."""
    lowered = text.lower()
    for rule in RULES:
        text = rule.sub(text, lowered)
    return text
