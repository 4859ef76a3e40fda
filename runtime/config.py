"""The user configuration file ``agentbox.toml``.

Location: ``$AGENTBOX_CONFIG`` if set (the file must exist), else ``$XDG_CONFIG_HOME/agentbox/agentbox.toml``,
else ``$HOME/.config/agentbox/agentbox.toml``. A missing file is fine.

Only one setting exists::

    [state]
    location = "/absolute/existing/dir"   # base of the state root

The file is parsed with a real TOML parser (``tomllib``); unknown tables or
keys, wrong types, relative or missing paths are refused with one line that
names the file, the key and what is accepted (exit status 2).
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import InputError, one_line

KNOWN = {"state": {"location"}}


@dataclass(frozen=True)
class Config:
    """The parsed configuration."""

    path: Path | None
    state_location: Path | None = None


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
                f"config file '{path}' has unknown table [{table}]; accepted: [state] with key location"
            )
        if not isinstance(value, dict):
            raise InputError(f"config file '{path}': '{table}' must be a table [{table}]")
        for key in value:
            if key not in KNOWN[table]:
                raise InputError(
                    f"config file '{path}' has unknown key [{table}].{key}; accepted: [state].location"
                )
    location = data.get("state", {}).get("location")
    if location is None:
        return Config(path)
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
    return Config(path, loc)


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
