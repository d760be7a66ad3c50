"""`SessionKey`, the identity of a conversation, and the rules for its parts."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from aisopod_session.enums import PeerKind

MAX_KEY_PART_LENGTH = 255

MAX_KEY_BYTES = 2560
"""The most UTF-8 bytes the five parts of a key may take together. PostgreSQL refuses a
row of its unique index on the key that takes more than 2 704 bytes (with the index's
own overhead); this bound fits it on every backend, so a key is accepted or refused
alike everywhere."""

_ESCAPE = {"%": "%25", ":": "%3A"}
_UNESCAPE = re.compile(r"%(25|3[Aa])")

_STRIPPABLE_CONTROLS = frozenset("\t\n\r\x0b\x0c")

E = TypeVar("E", bound=StrEnum)


def normalize_key_part(value: Any, *, lower: bool) -> str:
    """Return `value` stripped (and lower-cased if asked), or raise `ValueError`.

    A part must be a string that is non-empty after stripping, at most
    `MAX_KEY_PART_LENGTH` characters, and free of control characters and lone
    surrogates (which no database can store as text). Tabs and line breaks at the ends
    are whitespace and stripped; anywhere else they are control characters.
    """
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    # Stripping may drop ordinary whitespace at the ends, but str.strip() also drops some
    # control characters (\x1c-\x1f, \x85): those are refused wherever they stand.
    _refuse_controls(value, allowed=_STRIPPABLE_CONTROLS)
    text = value.strip()
    if lower:
        text = text.lower()
    if not text:
        raise ValueError("must not be empty or only whitespace")
    if len(text) > MAX_KEY_PART_LENGTH:
        raise ValueError(f"must be at most {MAX_KEY_PART_LENGTH} characters, got {len(text)}")
    _refuse_controls(text, allowed=frozenset())
    return text


# Unicode's categories Cc (the C0 and C1 controls and DEL, fixed since Unicode 1.1) and
# Cs (the surrogates): one search in C instead of a category lookup per character
# (tests/test_keys.py compares the two over every code point).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _refuse_controls(text: str, *, allowed: frozenset[str]) -> None:
    for found in _CONTROL.finditer(text):
        char = found.group()
        if char not in allowed:
            raise ValueError(
                f"must not contain control characters, found {char!r} at {found.start()}"
            )


def parse_enum(enum_type: type[E], value: Any) -> E:
    """Read an enum member from a member or a case-insensitive string, else `ValueError`."""
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        member = enum_type._value2member_map_.get(value)  # the common case: an exact value
        if member is not None:
            return member  # type: ignore[return-value]
        try:
            return enum_type(value.strip().lower())
        except ValueError:
            pass
    allowed = ", ".join(member.value for member in enum_type)
    raise ValueError(f"must be one of {allowed}; got {value!r}")


def _escape(part: str) -> str:
    return "".join(_ESCAPE.get(char, char) for char in part)


def _unescape(part: str) -> str:
    return _UNESCAPE.sub(lambda match: "%" if match.group(1) == "25" else ":", part)


class SessionKey(BaseModel):
    """The five parts that identify one conversation; frozen, hashable, validated.

    Parts are stripped; `agent_id`, `channel` and `peer_kind` are lower-cased, while
    `account_id` and `peer_id` keep their case because platform ids are case-sensitive.
    Invalid parts raise `ValueError` (a pydantic `ValidationError`) naming the field.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    agent_id: str
    channel: str
    account_id: str
    peer_kind: PeerKind
    peer_id: str

    def __init__(
        self,
        agent_id: str,
        channel: str,
        account_id: str,
        peer_kind: PeerKind | str,
        peer_id: str,
    ) -> None:
        """Build a key from its parts, positionally or by name."""
        super().__init__(
            agent_id=agent_id,
            channel=channel,
            account_id=account_id,
            peer_kind=peer_kind,
            peer_id=peer_id,
        )

    @field_validator("agent_id", "channel", mode="before")
    @classmethod
    def _lower_part(cls, value: Any) -> str:
        return normalize_key_part(value, lower=True)

    @field_validator("account_id", "peer_id", mode="before")
    @classmethod
    def _cased_part(cls, value: Any) -> str:
        return normalize_key_part(value, lower=False)

    @field_validator("peer_kind", mode="before")
    @classmethod
    def _peer_kind(cls, value: Any) -> PeerKind:
        return parse_enum(PeerKind, normalize_key_part(value, lower=True))

    @model_validator(mode="after")
    def _fits_every_index(self) -> SessionKey:
        size = sum(len(part.encode("utf-8")) for part in self.parts())
        if size > MAX_KEY_BYTES:
            raise ValueError(
                f"key: its five parts take {size} bytes of UTF-8 together; at most "
                f"{MAX_KEY_BYTES} fit every database's index on the key"
            )
        return self

    def parts(self) -> tuple[str, str, str, str, str]:
        """The five parts in key order, `peer_kind` as its plain string value."""
        return (self.agent_id, self.channel, self.account_id, self.peer_kind.value, self.peer_id)

    def canonical(self) -> str:
        """`agent:channel:account:peer_kind:peer`; `%` and `:` inside a part are escaped
        as `%25` and `%3A`, so every key has one text form and `parse` reads it back."""
        return ":".join(_escape(part) for part in self.parts())

    def __str__(self) -> str:
        return self.canonical()

    @classmethod
    def parse(cls, text: str) -> SessionKey:
        """Read a key from its canonical text form; `ValueError` if it is not one."""
        if not isinstance(text, str):
            raise ValueError(f"key: must be a string, not {type(text).__name__}")
        pieces = text.split(":")
        if len(pieces) != 5:
            raise ValueError(
                "key: expected 'agent:channel:account:peer_kind:peer' (five parts separated "
                f"by ':'), got {len(pieces)} part(s) in {text!r}"
            )
        agent_id, channel, account_id, peer_kind, peer_id = (_unescape(p) for p in pieces)
        return cls(agent_id, channel, account_id, peer_kind, peer_id)
