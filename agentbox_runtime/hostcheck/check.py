"""A host probe's result (:class:`Check`) and the one way a probe runs a host tool (:func:`run_tool`)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass

TIMEOUT_S = 15.0
"""Upper bound for every subprocess a check runs."""

STATUSES = ("ok", "missing", "unusable", "info")


@dataclass(frozen=True)
class Check:
    """One line of the doctor report.

    ``ok`` says whether the capability is usable; ``status`` is one of
    ``ok`` (present and working), ``missing`` (not installed / not there),
    ``unusable`` (present but cannot be used by this user or build) and
    ``info`` (a fact about the host, not a failure by itself). ``fix`` says how
    to get a missing or unusable capability (Debian package names where one
    exists).
    """

    name: str
    ok: bool
    status: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, object]:
        """The JSON form: name, ok, status, detail, fix."""
        return asdict(self)

    def reason(self) -> str:
        """``name: detail (fix: fix)``: what a capability skip prints."""
        return f"{self.name}: {self.detail}" + (f" (fix: {self.fix})" if self.fix else "")


def run_tool(argv: list[str], timeout: float = TIMEOUT_S, stdout_only: bool = False) -> tuple[int, str]:
    """Run ``argv`` and return (exit status, stdout+stderr stripped; only stdout with ``stdout_only``).

    Never raises for a missing tool or a hang: a tool that is not on PATH gives
    127 with an empty output, a timeout gives 124 with a line saying so.
    """
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except (FileNotFoundError, PermissionError):
        return 127, ""
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]} timed out after {timeout:g}s"
    if stdout_only and proc.returncode == 0:
        return 0, proc.stdout.strip()
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def version_line(output: str, binary: str) -> str:
    """The line of ``--version`` output that names ``binary`` (else the first line)."""
    lines = output.splitlines()
    return next((line for line in lines if binary in line), lines[0] if lines else "")


def tool_check(name: str, binaries: tuple[str, ...], version_args: tuple[str, ...], package: str) -> Check:
    """A check that every binary is on PATH and that the first answers ``version_args``.

    The detail is the version line (:func:`version_line`);
    missing binaries are named with the Debian package that provides them.
    """
    absent = [b for b in binaries if shutil.which(b) is None]
    if absent:
        return Check(name, False, "missing", f"{', '.join(absent)} not on PATH", f"apt-get install {package}")
    rc, out = run_tool([binaries[0], *version_args])
    first = version_line(out, binaries[0])
    if rc != 0:
        return Check(name, False, "unusable", f"{binaries[0]} {' '.join(version_args)} exited {rc}: {first}",
                     f"reinstall {package} (apt-get install --reinstall {package})")
    return Check(name, True, "ok", first)
