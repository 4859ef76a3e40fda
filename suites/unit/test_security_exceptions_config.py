"""``[security.exceptions.<name>]`` in agentbox.toml: parsed strictly, each table one named
exception the hardened profile grants, and the guest env the host writes from them."""

from pathlib import Path

import pytest

from agentbox_guest_init import hardened_profile
from agentbox_runtime.config import hardened_env, parse_config
from agentbox_runtime.errors import InputError

CFG = Path("/cfg/agentbox.toml")


def test_no_exception_by_default() -> None:
    assert parse_config("", CFG).security_exceptions == ()
    assert parse_config("[security]\n", CFG).security_exceptions == ()


def test_an_exception_table_names_one_thing() -> None:
    text = '[security.exceptions.writable-root]\nreason = "installs packages"\n'
    assert parse_config(text, CFG).security_exceptions == ("writable-root",)
    assert parse_config("[security.exceptions.writable-root]\n", CFG).security_exceptions == ("writable-root",)


@pytest.mark.parametrize("text,message", [
    ("[security.exceptions.ptrace]\n",
     "config file '/cfg/agentbox.toml' has unknown security exception [security.exceptions.ptrace]; "
     "accepted: [security.exceptions.writable-root]"),
    ('[security]\nexceptions = "writable-root"\n',
     "config file '/cfg/agentbox.toml': [security].exceptions must hold tables; "
     "accepted: [security.exceptions.writable-root]"),
    ('[security.exceptions]\nwritable-root = true\n',
     "config file '/cfg/agentbox.toml': security.exceptions.writable-root must be a table "
     "[security.exceptions.writable-root]"),
    ('[security.exceptions.writable-root]\nwhy = "x"\n',
     "config file '/cfg/agentbox.toml' has unknown key [security.exceptions.writable-root].why; "
     "accepted: [security.exceptions.writable-root].reason"),
    ("[security.exceptions.writable-root]\nreason = 1\n",
     "config file '/cfg/agentbox.toml': [security.exceptions.writable-root].reason must be a string, got int"),
    ("[security]\nallow = []\n",
     "config file '/cfg/agentbox.toml' has unknown key [security].allow; accepted: [security].exceptions"),
])
def test_a_wrong_exception_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(InputError) as err:
        parse_config(text, CFG)
    assert str(err.value) == message


def test_every_accepted_name_is_one_the_guest_knows() -> None:
    text = "".join(f"[security.exceptions.{name}]\n" for name in hardened_profile.EXCEPTIONS)
    names = parse_config(text, CFG).security_exceptions
    env = {hardened_profile.ENV_EXCEPTIONS: ",".join(names)}
    assert hardened_profile.exceptions(env) == frozenset(hardened_profile.EXCEPTIONS)


def test_the_hardened_env_carries_the_granted_exceptions(tmp_path: Path) -> None:
    cfg = tmp_path / "agentbox.toml"
    cfg.write_text("")
    assert hardened_env({"AGENTBOX_CONFIG": str(cfg)}) == ("AGENTBOX_HARDENED=1",)
    cfg.write_text("[security.exceptions.writable-root]\n")
    assert hardened_env({"AGENTBOX_CONFIG": str(cfg)}) == (
        "AGENTBOX_HARDENED=1", "AGENTBOX_HARDENED_EXCEPTIONS=writable-root")
