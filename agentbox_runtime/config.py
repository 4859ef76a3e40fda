"""The user configuration file ``agentbox.toml``.

Location: ``$AGENTBOX_CONFIG`` if set (the file must exist), else ``$XDG_CONFIG_HOME/agentbox/agentbox.toml``,
else ``$HOME/.config/agentbox/agentbox.toml``. A missing file is fine.

These settings exist::

    [state]
    location = "/absolute/existing/dir"   # base of the state root

    [libkrun]
    runtime = "crun"                      # or "qemu": the OCI runtime of libkrun tasks

    [security.exceptions.writable-root]   # one table per exception the hardened profile grants
    reason = "the task installs packages" # optional, for the reader

``[security.exceptions.<name>]`` is additive: each table re-allows one named thing that the
hardened profile (``--hardened``, ``hardened=True``) otherwise refuses; the names are
:data:`agentbox_guest_init.hardened_profile.EXCEPTIONS` (``writable-root``: the root filesystem
stays writable). Without any, the profile refuses everything it lists.

``[libkrun].runtime`` picks the ``podman run --runtime`` of ``agentbox libkrun``
tasks: ``crun`` (the default, crun's krun handler) or ``qemu`` (the QEMU-backed
``agentbox-krun-runtime``). ``--krun-runtime`` and ``$AGENTBOX_KRUN_RUNTIME``
override it (flag > env > config > default).

The file is parsed with a real TOML parser (``tomllib``); unknown tables or
keys, wrong types, relative or missing paths and runtimes other than ``crun`` or
``qemu`` are refused with one line that names the file, the key and what is
accepted (exit status 2).
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agentbox_guest_init.contract import ENV_HARDENED
from agentbox_guest_init.hardened_profile import ENV_EXCEPTIONS, EXCEPTIONS
from agentbox_runtime.errors import InputError, one_line

KNOWN = {"state": ("location",), "libkrun": ("runtime",), "security": ("exceptions",)}
KNOWN_TEXT = ", ".join(f"[{table}] with key {', '.join(keys)}" for table, keys in KNOWN.items())

KRUN_RUNTIMES = ("crun", "qemu")
"""Accepted values of ``[libkrun].runtime``, ``--krun-runtime`` and ``$AGENTBOX_KRUN_RUNTIME``."""


@dataclass(frozen=True)
class Config:
    """The parsed configuration."""

    path: Path | None
    state_location: Path | None = None
    krun_runtime: str | None = None  # [libkrun].runtime, one of KRUN_RUNTIMES; None when unset
    security_exceptions: tuple[str, ...] = ()  # the [security.exceptions.<name>] names, sorted


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    """Where ``agentbox.toml`` is looked up for ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env
    if env.get("AGENTBOX_CONFIG"):
        return Path(env["AGENTBOX_CONFIG"])
    if env.get("XDG_CONFIG_HOME", "").startswith("/"):  # XDG: relative values are ignored
        return Path(env["XDG_CONFIG_HOME"]) / "agentbox" / "agentbox.toml"
    if env.get("HOME"):
        return Path(env["HOME"]) / ".config" / "agentbox" / "agentbox.toml"
    raise InputError("HOME is not set and XDG_CONFIG_HOME is not available")


def parse_config(text: str, path: Path) -> Config:
    """Parse the text of ``path``; raise :class:`InputError` on any problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"config file '{path}' is not valid TOML: {exc}") from None
    for table, value in data.items():
        if table not in KNOWN:
            raise InputError(
                f"config file '{path}' has unknown table [{table}]; accepted: {KNOWN_TEXT}"
            )
        if not isinstance(value, dict):
            raise InputError(f"config file '{path}': '{table}' must be a table [{table}]")
        for key in value:
            if key not in KNOWN[table]:
                accepted = ", ".join(f"[{table}].{k}" for k in KNOWN[table])
                raise InputError(
                    f"config file '{path}' has unknown key [{table}].{key}; accepted: {accepted}"
                )
    runtime = _krun_runtime(data.get("libkrun", {}).get("runtime"), path)
    exceptions = _security_exceptions(data.get("security", {}).get("exceptions"), path)
    return Config(path, _state_location(data.get("state", {}).get("location"), path), runtime, exceptions)


def _security_exceptions(value: object, path: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    accepted = ", ".join(f"[security.exceptions.{name}]" for name in EXCEPTIONS)
    if not isinstance(value, dict):
        raise InputError(f"config file '{path}': [security].exceptions must hold tables; accepted: {accepted}")
    for name, table in value.items():
        if name not in EXCEPTIONS:
            raise InputError(f"config file '{path}' has unknown security exception "
                             f"[security.exceptions.{one_line(name)}]; accepted: {accepted}")
        if not isinstance(table, dict):
            raise InputError(f"config file '{path}': security.exceptions.{name} must be a table "
                             f"[security.exceptions.{name}]")
        for key, reason in table.items():
            where = f"[security.exceptions.{name}]"
            if key != "reason":
                raise InputError(f"config file '{path}' has unknown key {where}.{one_line(key)}; "
                                 f"accepted: {where}.reason")
            if not isinstance(reason, str):
                raise InputError(f"config file '{path}': {where}.reason must be a string, got {type(reason).__name__}")
    return tuple(sorted(value))


def security_exceptions(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The hardened profile's exceptions the config of ``env`` (default ``os.environ``) grants."""
    return load_config(env).security_exceptions


def hardened_env(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The guest env (``K=V``) of the hardened profile: ``AGENTBOX_HARDENED=1``, and the exceptions
    ``agentbox.toml`` grants (``AGENTBOX_HARDENED_EXCEPTIONS``), read from the config of ``env``."""
    exceptions = security_exceptions(env)
    granted = (f"{ENV_EXCEPTIONS}={','.join(exceptions)}",) if exceptions else ()
    return (f"{ENV_HARDENED}=1", *granted)


def _krun_runtime(value: object, path: Path) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"config file '{path}': [libkrun].runtime must be a string, got "
                         f"{type(value).__name__}; accepted: {', '.join(KRUN_RUNTIMES)}")
    if value not in KRUN_RUNTIMES:
        raise InputError(f"config file '{path}': [libkrun].runtime {quote(value)} is not accepted; "
                         f"accepted: {', '.join(KRUN_RUNTIMES)}")
    return value


def _state_location(location: object, path: Path) -> Path | None:
    if location is None:
        return None
    if not isinstance(location, str):
        raise InputError(
            f"config file '{path}': [state].location must be a string holding an absolute path, "
            f"got {type(location).__name__}"
        )
    loc = Path(location)
    if not loc.is_absolute():
        raise InputError(
            f"config file '{path}': [state].location must be an absolute path, got '{location}'"
        )
    if not loc.is_dir():
        raise InputError(
            f"config file '{path}': [state].location '{location}' does not exist or is not a directory"
        )
    try:
        check_location(loc)
    except InputError as exc:
        raise InputError(f"config file '{path}': [state].location: {exc}") from None
    return loc


def check_location(loc: Path) -> None:
    """Refuse a state location owned by someone else or writable by group or others (InputError):
    whoever can write there can plant records, symlinks or disk images for agentbox to act on."""
    st = loc.stat()
    if st.st_uid != os.geteuid():
        raise InputError(f"'{loc}' is owned by uid {st.st_uid}, not {os.geteuid()}; accepted: a directory you own")
    if st.st_mode & 0o022:
        raise InputError(f"'{loc}' is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                         "accepted: a directory only you can write (chmod go-w)")


MAX_CONFIG_BYTES = 64 << 10


def read_small_text(path: Path) -> str:
    """A regular file of at most :data:`MAX_CONFIG_BYTES`, as UTF-8 text. A fifo, a device or a
    directory is refused without reading (no hang, no unbounded read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"config file {quote(path)} is not a regular file; point AGENTBOX_CONFIG at an "
                             "agentbox.toml file")
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise InputError(f"config file {quote(path)} is larger than {MAX_CONFIG_BYTES} bytes; accepted: a small "
                         "agentbox.toml")
    return data.decode("utf-8")


def quote(value: object) -> str:
    """``'value'`` with control characters escaped, so an error stays one line."""
    return f"'{one_line(str(value))}'"


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Read and parse the configuration file; a missing file gives defaults."""
    env = os.environ if env is None else env
    path = default_config_path(env)
    try:
        text = read_small_text(path)
    except FileNotFoundError:
        if env.get("AGENTBOX_CONFIG"):
            raise InputError(f"AGENTBOX_CONFIG names '{path}', which does not exist; "
                             "point it at an agentbox.toml file or unset it") from None
        return Config(None)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"failed to read config file {quote(path)}: {exc}") from None
    return parse_config(text, path)
