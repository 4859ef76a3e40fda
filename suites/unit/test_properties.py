"""Property-based checks (Hypothesis) of the parsers that take outside input: every input either
round-trips or gives the documented one-line error, and none raises anything else."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentbox_guest_init.launch_config import LaunchConfig, LaunchConfigError, LaunchDisk, decode, encode
from agentbox_guest_init.protocol import MAGIC, FrameReader, encode_frame
from agentbox_runtime.config import parse_config
from agentbox_runtime.errors import InputError
from agentbox_runtime.size_grammar import GIB, MAX_SIZE, TIB, parse_resize_size

# Text as it comes through argv and files: any Unicode except surrogates (not encodable).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
U32 = st.integers(0, (1 << 32) - 1)


@given(st.integers(1, 1 << 40), st.sampled_from(["", "G", "GiB", "g", "gib", "T", "TiB", "t"]))
def test_sizes_round_trip(number: int, suffix: str) -> None:
    expected = number * (TIB if suffix.lower().startswith("t") else GIB)
    if expected > MAX_SIZE:
        try:
            parse_resize_size(f"{number}{suffix}")
        except InputError as exc:
            assert "size is too large" in str(exc) and "\n" not in str(exc)
        else:
            raise AssertionError("an oversized size parsed")
    else:
        assert parse_resize_size(f"{number}{suffix}") == expected


@given(TEXT)
def test_any_size_text_parses_or_is_one_input_error(text: str) -> None:
    try:
        value = parse_resize_size(text)
    except InputError as exc:
        assert str(exc).startswith("invalid size ")
    else:
        assert 0 < value <= MAX_SIZE


DISKS = st.lists(st.builds(LaunchDisk, TEXT, TEXT, st.booleans()), max_size=3).map(tuple)
ENV = st.lists(st.tuples(TEXT.filter(lambda k: "=" not in k), TEXT).map(lambda kv: f"{kv[0]}={kv[1]}"),
               max_size=4).map(tuple)
CONFIGS = st.builds(LaunchConfig, TEXT, TEXT, TEXT, TEXT, U32, st.integers(0, 255), TEXT, TEXT, DISKS,
                    st.lists(TEXT, max_size=5).map(tuple), ENV)


@given(CONFIGS)
def test_launch_conf_round_trips(cfg: LaunchConfig) -> None:
    assert decode(encode(cfg)) == cfg


@given(st.text(max_size=300))
def test_any_launch_conf_text_decodes_or_is_a_launch_config_error(text: str) -> None:
    try:
        decode(text)
    except LaunchConfigError as exc:
        assert str(exc).startswith("microvm launch config ") and "\n" not in str(exc)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                    max_leaves=10)


@given(st.dictionaries(st.text(max_size=8), JSON, max_size=4), st.binary(max_size=64), st.integers(1, 17))
def test_frames_survive_noise_and_any_split(message: dict[str, object], noise: bytes, step: int) -> None:
    noise = noise.replace(MAGIC[:2], b"")  # noise never spells the magic itself
    stream = noise + encode_frame(message) + noise
    reader = FrameReader()
    got = []
    for i in range(0, len(stream), step):
        got += reader.feed(stream[i:i + step])
    assert got == [message]


@given(st.binary(max_size=2000))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_any_bytes_give_messages_or_nothing(data: bytes) -> None:
    for message in FrameReader(max_frame=1024).feed(data):
        assert isinstance(message, dict)


@given(st.text(max_size=200))
def test_any_config_text_parses_or_is_one_input_error(text: str) -> None:
    try:
        parse_config(text, Path("/x/agentbox.toml"))
    except InputError as exc:
        assert str(exc).startswith("config file '/x/agentbox.toml'")
