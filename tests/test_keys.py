"""SessionKey: normalisation, validation, canonical text form; the enums."""

from __future__ import annotations

import sys
import unicodedata
from typing import Any

import pytest
from pydantic import ValidationError

from aisopod_session import PeerKind, Role, SessionKey, SessionStatus
from aisopod_session.keys import normalize_key_part

CONTROL = ("Cc", "Cs")

PARTS = ("agent_id", "channel", "account_id", "peer_kind", "peer_id")


def make_key(**overrides: Any) -> SessionKey:
    parts: dict[str, Any] = {
        "agent_id": "agent-1",
        "channel": "telegram",
        "account_id": "bot-A",
        "peer_kind": "dm",
        "peer_id": "User-42",
    }
    parts.update(overrides)
    return SessionKey(**parts)


def test_parts_are_stripped_and_agent_channel_kind_lower_cased() -> None:
    key = SessionKey("  Agent-1 ", "\tTeleGram", " Bot-A ", " DM ", " User-42\n")
    assert key.parts() == ("agent-1", "telegram", "Bot-A", "dm", "User-42")
    assert key.peer_kind is PeerKind.DM


def test_positional_and_keyword_construction_are_equal_and_hash_alike() -> None:
    positional = SessionKey("a", "slack", "T1", PeerKind.CHANNEL, "C1")
    keyword = SessionKey(
        agent_id="A", channel="Slack", account_id="T1", peer_kind="channel", peer_id="C1"
    )
    assert positional == keyword
    assert hash(positional) == hash(keyword)
    assert len({positional, keyword}) == 1


def test_account_and_peer_ids_are_case_sensitive() -> None:
    assert make_key(peer_id="abc") != make_key(peer_id="ABC")
    assert make_key(account_id="abc") != make_key(account_id="ABC")


def test_key_is_frozen() -> None:
    key = make_key()
    with pytest.raises(ValidationError):
        key.peer_id = "someone-else"  # type: ignore[misc]


def test_canonical_form_and_str() -> None:
    key = make_key()
    assert key.canonical() == "agent-1:telegram:bot-A:dm:User-42"
    assert str(key) == key.canonical()


def test_parse_reads_back_the_canonical_form() -> None:
    key = make_key()
    assert SessionKey.parse("agent-1:telegram:bot-A:dm:User-42") == key
    assert SessionKey.parse(" Agent-1:TELEGRAM:bot-A:DM:User-42") == key


@pytest.mark.parametrize(
    ("account_id", "peer_id"),
    [
        ("acc:1", "@user:matrix.org"),
        ("100%", "a%3Ab"),
        ("%25", ":%:"),
        ("emoji-🦀", "ünïcødé:x"),
    ],
)
def test_colons_and_percent_signs_round_trip(account_id: str, peer_id: str) -> None:
    key = make_key(account_id=account_id, peer_id=peer_id)
    text = key.canonical()
    assert text.count(":") == 4
    assert SessionKey.parse(text) == key


@pytest.mark.parametrize("text", ["", "a:b:c:dm", "a:b:c:dm:p:extra", "a::c:dm:p", "a:b:c:email:p"])
def test_parse_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match=r"key|agent_id|channel|peer_kind"):
        SessionKey.parse(text)


def test_tabs_and_line_breaks_at_the_ends_are_stripped() -> None:
    assert make_key(peer_id="\t\r\n User-42 \n").peer_id == "User-42"


def test_part_of_255_characters_is_accepted() -> None:
    assert make_key(peer_id="x" * 255).peer_id == "x" * 255


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("   \t\n", "empty"),
        ("x" * 256, "at most 255"),
        ("ab\x00c", "control"),
        ("ab\ncd", "control"),
        ("ab\x7fcd", "control"),
        ("ab\x1bcd", "control"),
        ("ab\ud800cd", "control"),
        ("ab\x1f", "control"),
        ("\x85ab", "control"),
        ("ab\x00", "control"),
        (42, "string"),
        (None, "string"),
    ],
)
def test_bad_parts_are_rejected_naming_the_field(part: str, value: Any, reason: str) -> None:
    with pytest.raises(ValidationError) as caught:
        make_key(**{part: value})
    errors = caught.value.errors()
    assert errors[0]["loc"] == (part,)
    assert reason in errors[0]["msg"]
    assert part in str(caught.value)


def test_a_part_is_refused_for_exactly_the_characters_of_unicodes_control_categories() -> None:
    """Every code point Python's `unicodedata` puts in Cc or Cs (as of this Python's
    Unicode) is refused inside a part, with its position, and no other is: keys.py finds
    them with one regular expression, not a category lookup per character."""
    controls = {c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in CONTROL}
    assert len(controls) == 65 + 2048
    for code in controls:
        with pytest.raises(ValueError, match=r"control characters.* at 1$"):
            normalize_key_part(f"a{chr(code)}b", lower=False)
    others = "".join(chr(c) for c in range(sys.maxunicode + 1) if c not in controls)
    for start in range(0, len(others), 250):
        chunk = f"a{others[start : start + 250]}b"
        assert normalize_key_part(chunk, lower=False) == chunk.strip()


def test_unknown_peer_kind_is_rejected_listing_the_allowed_ones() -> None:
    with pytest.raises(ValidationError) as caught:
        make_key(peer_kind="email")
    assert caught.value.errors()[0]["loc"] == ("peer_kind",)
    assert "dm, group, channel, thread" in str(caught.value)


def test_enums_are_str_enums_with_upper_case_members() -> None:
    assert [m.value for m in PeerKind] == ["dm", "group", "channel", "thread"]
    assert [m.value for m in Role] == ["system", "developer", "user", "assistant", "tool"]
    assert [m.value for m in SessionStatus] == ["active", "idle", "compacted", "archived"]
    assert str(Role.USER) == "user"
    assert isinstance(Role.USER, str)
    assert f"{SessionStatus.ACTIVE}" == "active"
    assert PeerKind["THREAD"] is PeerKind.THREAD
