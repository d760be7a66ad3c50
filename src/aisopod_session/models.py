"""The schema in Python: the `Session` and `Message` tables, their column types, and the
validated input models `NewMessage` and `SessionFilter`.

The tables mirror migration 1 (`migrations.py`) column for column; a test compares the two.
"""

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, TypeAlias

from pydantic import AwareDatetime, BaseModel, ConfigDict, field_validator
from sqlalchemy import Column, Dialect, Index, Integer, Text, UniqueConstraint, text
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, Relationship, SQLModel

from aisopod_session.enums import PeerKind, Role, SessionStatus
from aisopod_session.errors import SessionStoreError
from aisopod_session.keys import SessionKey, normalize_key_part, parse_enum

JSONValue: TypeAlias = str | int | float | bool | list[Any] | dict[str, Any] | None
"""What a message's `content` and `tool_calls` may be: any JSON value (a `tuple` is
taken as a list)."""

MAX_JSON_DEPTH = 64
"""How deep metadata and tool calls may nest; deeper values are refused as input."""

MAX_TEXT_BYTES = 256 * 1024 * 1024
"""The most UTF-8 bytes one stored text value may take: a message's content, a compaction
summary, the JSON text of tool calls or of metadata. Larger values are refused as input
(`ValueError` naming the field). Well inside SQLite's own limit (10⁹ bytes per row) and
PostgreSQL's (1 GiB per value and per message), with room for a message's other columns."""


# --- column types -------------------------------------------------------------------


def utc_text(value: datetime) -> str:
    """The one stored form of a timestamp: fixed-width ISO-8601 in UTC with microseconds,
    `2026-11-26T03:59:48.123456+00:00`, so that text order is time order."""
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()}: pass a timezone-aware datetime")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def parse_utc_text(value: str) -> datetime:
    """Read a stored timestamp back as an aware UTC datetime.

    Besides our own form this accepts RFC 3339 as other writers store it (the Rust
    crate's chrono `to_rfc3339()`: 0 to 9 fraction digits, kept to the microsecond by
    truncation; `Z`, `z` or a `±hh:mm` offset; `T`, `t` or a space between date and time)
    and what plain SQL tends to write (`datetime('now')` gives `2026-11-26 03:59:48`);
    text without an offset is UTC, which is what SQLite's date functions produce.
    `ValueError` for anything else.
    """
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        # RFC 3339 allows lower-case `t` and `z`, which Python 3.11 does not read.
        if not isinstance(value, str) or value.isupper() or not value.isascii():
            raise
        parsed = datetime.fromisoformat(value.upper())
    if parsed.tzinfo is UTC:  # our own form: nothing to convert
        return parsed
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


class StoredText(TypeDecorator[Any]):
    """A column stored as text that Python sees as another type.

    `write` and `read` are the conversion, in one place: SQLAlchemy calls them for
    statements it executes, and the repository's hot paths, which hand plain SQL to the
    driver, call them directly. Neither is given None.
    """

    impl = Text
    cache_ok = True

    def write(self, value: Any) -> str:
        """The stored text of `value`."""
        raise NotImplementedError

    def read(self, value: Any) -> Any:
        """The Python value of stored text."""
        raise NotImplementedError

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else self.write(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else self.read(value)


class UTCDateTime(StoredText):
    """Aware `datetime` in Python, canonical ISO-8601 UTC text in the database."""

    cache_ok = True

    def write(self, value: datetime) -> str:
        return utc_text(value)

    def read(self, value: str) -> datetime:
        return parse_utc_text(value)


def dump_json(value: Any) -> str:
    """Compact JSON text, as the Rust crate writes it (`serde_json::to_string`): no spaces,
    non-ASCII as UTF-8; NaN and Infinity are refused because JSON has no such values."""
    return _encode(value)


# One encoder for every write: `json.dumps` with options builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


class JSONText(StoredText):
    """A JSON value stored as text (the seed's `TEXT` columns), decoded on the way out.

    Text that is not JSON, or holds NaN, Infinity or a number too large for a float
    (which other writers may have stored), is refused when read (`ValueError`): such a
    value could not be written back or exported. In-place changes to a loaded value are
    not tracked: change metadata through `SessionRepository.update_metadata`.
    """

    cache_ok = True

    def write(self, value: Any) -> str:
        return dump_json(value)

    def read(self, value: str) -> Any:
        return _strict_json(value)


class LenientJSONText(JSONText):
    """A JSON value stored as text that other programs write too (`messages.content`,
    `messages.tool_calls`): a cell that is not valid JSON, or holds a value JSON cannot
    carry back (NaN, Infinity, a number too large for a float), reads as its raw text,
    so one cell written by plain SQL never makes a history unreadable."""

    cache_ok = True

    def read(self, value: Any) -> Any:
        if type(value) is not str:
            # Plain SQL may have stored a number or a blob in the TEXT column (SQLite).
            if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
                return value
            if not isinstance(value, bytes):
                return str(value)
            value = value.decode("utf-8", "replace")
        try:
            return _strict_json(value)
        except (ValueError, RecursionError):
            return value


class JSONContentText(LenientJSONText):
    """A message's `content`: any JSON value, JSON `null` included, which is stored as the
    text `null` (the column is NOT NULL: None is content here, not a missing value)."""

    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str:
        return self.write(value)


class LenientJSONObjectText(JSONText):
    """A JSON object stored as text that other programs write too (`messages.metadata`):
    a cell that is not a JSON object (or not JSON at all) reads as an empty object, so one
    cell never makes a history unreadable."""

    cache_ok = True

    def read(self, value: Any) -> Any:
        if value == "{}":
            return {}
        try:
            found = super().read(value)
        except (TypeError, ValueError, RecursionError):
            return {}
        return found if isinstance(found, dict) else {}


class JSONObjectText(JSONText):
    """A JSON object stored as text (`sessions.metadata`). JSON `null` (which plain SQL
    may have stored) reads as an empty object; any other value is refused when read
    (`ValueError`)."""

    cache_ok = True

    def read(self, value: str) -> Any:
        found = super().read(value)
        if found is None:
            return {}
        if not isinstance(found, dict):
            raise ValueError(f"not a JSON object but {type(found).__name__}")
        return found


def _not_a_number(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is too large for a JSON number")
    return number


# One decoder for every read: `json.loads` with options builds a new one per call, which
# costs more than decoding a short message.
_strict_json = json.JSONDecoder(parse_constant=_not_a_number, parse_float=_finite_float).decode


class RoleText(StoredText):
    """A message's role: a `Role` when the stored text names one (in any case), else the
    stored text itself as a plain `str`, so a role written by another program (the
    crate's future roles, plain SQL) never makes a history unreadable."""

    cache_ok = True
    _members: ClassVar[dict[str, Role]] = {member.value: member for member in Role}

    def write(self, value: Any) -> str:
        return parse_enum(Role, value).value

    def read(self, value: Any) -> Role | str:
        member = self._members.get(value)
        if member is not None:
            return member
        text = value if isinstance(value, str) else str(value)
        return self._members.get(text.strip().lower(), text)


class EnumText(StoredText):
    """A `StrEnum` stored as its plain lower-case text value."""

    cache_ok = True

    def __init__(self, enum_type: type[StrEnum]) -> None:
        super().__init__()
        self.enum_type = enum_type
        self._members = {member.value: member for member in enum_type}

    def write(self, value: Any) -> str:
        return parse_enum(self.enum_type, value).value

    def read(self, value: str) -> StrEnum:
        member = self._members.get(value)
        if member is not None:
            return member
        try:
            # Case-insensitive, like every input: plain SQL may have written 'DM'.
            return parse_enum(self.enum_type, value)
        except ValueError:
            raise SessionStoreError(
                f"the database holds {value!r}, which is not a {self.enum_type.__name__} "
                f"({', '.join(self.enum_type)}); fix the row with plain SQL"
            ) from None


_MAX_JSON_INT = 2**63 - 1
_MIN_JSON_INT = -(2**63)


def check_json(field: str, value: Any) -> Any:
    """Return `value` if it stores and reads back unchanged as JSON, else `ValueError`.

    Allowed: dicts with string keys, lists and tuples (read back as lists), strings
    without lone surrogates, integers that fit in 64 signed bits, finite floats, booleans
    and None, nested at most `MAX_JSON_DEPTH` deep.
    """
    if _plainly_valid(value, 1):
        return value
    # Something is wrong, or of a subclass the quick walk does not judge: walk again,
    # keeping the path of every value, to accept it or to say exactly where it fails.
    stack: list[tuple[Any, int, str]] = [(value, 1, field)]
    while stack:
        item, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{field}: nested deeper than {MAX_JSON_DEPTH} levels at {path}")
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, int):
            # SQLite's JSON functions (and most JSON readers) turn wider integers into
            # floats, and Python cannot even print ones of over 4300 digits.
            if not _MIN_JSON_INT <= item <= _MAX_JSON_INT:
                raise ValueError(f"{field}: the integer at {path} does not fit in 64 bits")
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"{field}: {item} at {path} is not a JSON number")
        elif isinstance(item, str):
            _check_encodable(field, item, path)
        elif isinstance(item, dict):
            for name, child in item.items():
                if not isinstance(name, str):
                    raise ValueError(f"{field}: key {name!r} at {path} is not a string")
                _check_encodable(field, name, path)
                stack.append((child, depth + 1, f"{path}.{name}"))
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(item))
        else:
            raise ValueError(f"{field}: {type(item).__name__} at {path} is not JSON-serialisable")
    return value


def _plainly_valid(item: Any, depth: int) -> bool:
    """True if `item` passes `check_json`, judged quickly: exact built-in types only,
    no paths kept. False means "walk again" (it may still be valid: an `IntEnum`, a
    `dict` subclass). Recursion stops at the depth limit, so hostile nesting cannot
    exhaust the stack."""
    if depth > MAX_JSON_DEPTH:
        return False
    kind = type(item)
    if kind is str:
        return item.isascii() or _encodable(item)
    if item is None or kind is bool:
        return True
    if kind is int:
        return bool(_MIN_JSON_INT <= item <= _MAX_JSON_INT)
    if kind is float:
        return math.isfinite(item)
    if kind is dict:
        for name, child in item.items():
            if type(name) is not str or not (name.isascii() or _encodable(name)):
                return False
            if not _plainly_valid(child, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        return all(_plainly_valid(child, depth + 1) for child in item)
    return False


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_encodable(field: str, value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{field}: text at {path} holds a lone surrogate {value[exc.start]!r} "
            f"at position {exc.start}, which cannot be stored"
        ) from None


# --- tables ---------------------------------------------------------------------------


class Session(SQLModel, table=True):
    """One conversation, unique by its five key parts.

    Returned objects are detached snapshots; `messages` is not loaded with them (read
    history with `SessionRepository.get_history`).
    """

    __tablename__ = "sessions"
    __table_args__ = (
        UniqueConstraint("agent_id", "channel", "account_id", "peer_kind", "peer_id"),
        Index("idx_sessions_agent_id", "agent_id"),
        Index("idx_sessions_channel", "channel", "account_id"),
        Index("idx_sessions_status", "status"),
        Index("idx_sessions_updated_at", "updated_at"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    agent_id: str = Field(sa_column=Column(Text, nullable=False))
    channel: str = Field(sa_column=Column(Text, nullable=False))
    account_id: str = Field(sa_column=Column(Text, nullable=False))
    peer_kind: PeerKind = Field(sa_column=Column(EnumText(PeerKind), nullable=False))
    peer_id: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    message_count: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default=text("0"))
    )
    token_usage: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default=text("0"))
    )
    meta: dict[str, Any] = Field(
        default_factory=dict,
        sa_column=Column("metadata", JSONObjectText, nullable=False, server_default=text("'{}'")),
    )
    status: SessionStatus = Field(
        default=SessionStatus.ACTIVE,
        sa_column=Column(EnumText(SessionStatus), nullable=False, server_default=text("'active'")),
    )
    # Migration 2 (the Rust crate's schema version 2): compaction bookkeeping.
    compaction_count: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default=text("0"))
    )
    last_compacted_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    last_compaction_summary: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Migration 3: the input/output split of `token_usage`, where callers report it.
    input_tokens: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default=text("0"))
    )
    output_tokens: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default=text("0"))
    )

    messages: list["Message"] = Relationship(
        back_populates="session",
        cascade_delete=True,
        passive_deletes=True,
        sa_relationship_kwargs={"lazy": "raise", "order_by": "Message.id"},
    )

    @property
    def key(self) -> SessionKey:
        """The session's `SessionKey`."""
        return SessionKey(
            self.agent_id, self.channel, self.account_id, self.peer_kind, self.peer_id
        )


class Message(SQLModel, table=True):
    """One turn of a conversation; history order is `id` order.

    `content` and `tool_calls` are JSON values (a `str` stays a `str`); a cell another
    program stored that is not JSON reads as its raw text. `role` is a `Role`, or the
    stored text as a plain `str` when it names no `Role`. `meta` is the message's
    metadata object (`{}` when the cell holds no JSON object)."""

    __tablename__ = "messages"
    __table_args__ = (
        Index("idx_messages_session_id", "session_id"),
        Index("idx_messages_created_at", "session_id", "created_at"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    session_id: int = Field(foreign_key="sessions.id", ondelete="CASCADE", sa_type=Integer)
    role: Role | str = Field(sa_column=Column(RoleText, nullable=False))
    content: JSONValue = Field(sa_column=Column(JSONContentText, nullable=False))
    tool_calls: JSONValue = Field(default=None, sa_column=Column(LenientJSONText, nullable=True))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    # Migration 3: per-message metadata (model, usage, ids of the framework's items).
    meta: dict[str, Any] = Field(
        default_factory=dict,
        sa_column=Column(
            "metadata", LenientJSONObjectText, nullable=False, server_default=text("'{}'")
        ),
    )

    session: Session | None = Relationship(
        back_populates="messages", sa_relationship_kwargs={"lazy": "raise"}
    )


# --- input models -----------------------------------------------------------------------


class NewMessage(BaseModel):
    """A message to append: validated before anything is written.

    `role` takes a `Role` or its name in any case; `content` is any JSON value (a `str`
    stays a `str`: text, or content blocks as a list, an object, a number, a boolean or
    None); `tool_calls` is any JSON value or None; `meta` a JSON object or None (stored as
    `{}`). Values must store and read back unchanged: no sets or bytes, no NaN or
    infinity, integers within 64 bits, strings without lone surrogates, nesting at most
    `MAX_JSON_DEPTH` deep, at most `MAX_TEXT_BYTES` of JSON text each.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: JSONValue
    tool_calls: JSONValue = None
    meta: dict[str, Any] | None = None

    def __init__(
        self,
        role: Role | str,
        content: JSONValue,
        tool_calls: JSONValue = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Build a message positionally or by name; pydantic's `ValidationError` (a
        `ValueError`) naming the field if a value is invalid.

        Valid values are checked by the field validators' own functions and put in place
        directly: pydantic's general path costs more than the checks for a model this
        small, and a batch of 50 messages pays it 50 times. Invalid values go through
        pydantic, which raises its usual error.
        """
        try:
            values = {
                "role": parse_enum(Role, role),
                "content": check_content(content),
                "tool_calls": check_tool_calls(tool_calls),
                "meta": check_message_meta(meta),
            }
        except ValueError:
            super().__init__(role=role, content=content, tool_calls=tool_calls, meta=meta)
            raise  # pragma: no cover - pydantic raised above, with the same checks
        object.__setattr__(self, "__dict__", values)
        object.__setattr__(self, "__pydantic_fields_set__", set(values))
        object.__setattr__(self, "__pydantic_extra__", None)
        object.__setattr__(self, "__pydantic_private__", None)

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, value: Any) -> Role:
        return parse_enum(Role, value)

    @field_validator("content", mode="plain")
    @classmethod
    def _content(cls, value: Any) -> JSONValue:
        return check_content(value)

    @field_validator("tool_calls", mode="plain")
    @classmethod
    def _tool_calls(cls, value: Any) -> JSONValue:
        return check_tool_calls(value)

    @field_validator("meta", mode="plain")
    @classmethod
    def _meta(cls, value: Any) -> dict[str, Any] | None:
        return check_message_meta(value)


def check_content(value: Any, field: str = "content") -> JSONValue:
    """`value` if it is a JSON value that can be stored, else `ValueError` naming
    `field`. A `str` is returned as it is; a tuple anywhere becomes a list."""
    if type(value) is str:
        if not value.isascii():
            _check_encodable(field, value, field)
        if len(value) > MAX_TEXT_BYTES // 8:
            # Escaping may double a character's size in JSON text: measure that text.
            check_text_size(field, dump_json(value))
        return value
    found: JSONValue = _normalised(check_json(field, value))
    return found


def check_tool_calls(value: Any, field: str = "tool_calls") -> JSONValue:
    """`value` if it is None or a JSON value that can be stored, else `ValueError`."""
    if value is None:
        return None
    found: JSONValue = _normalised(check_json(field, value))
    return found


def check_message_meta(value: Any, field: str = "meta") -> dict[str, Any] | None:
    """`value` as a dict if it is None or a JSON object that can be stored, else
    `ValueError` naming `field`."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{field}: must be a JSON object (dict) or None, not {type(value).__name__}"
        )
    found = _normalised(check_json(field, dict(value)))
    assert isinstance(found, dict)
    return found


def _normalised(value: Any) -> Any:
    """`value` as JSON reads it back: tuples become lists (only values that hold one are
    copied)."""
    if isinstance(value, tuple):
        return [_normalised(item) for item in value]
    if isinstance(value, list):
        items = [_normalised(item) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if isinstance(value, dict):
        pairs = {name: _normalised(item) for name, item in value.items()}
        return value if all(pairs[n] is v for n, v in value.items()) else pairs
    return value


def check_text_size(field: str, text: str) -> str:
    """`text` (already known to encode) if it fits `MAX_TEXT_BYTES`, else `ValueError`
    naming `field`."""
    if len(text) > MAX_TEXT_BYTES // 4:
        size = _utf8_size(text)
        if size > MAX_TEXT_BYTES:
            raise ValueError(f"{field}: {_too_large(size)}")
    return text


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _too_large(size: int) -> str:
    return f"takes {size:,} bytes of UTF-8; the store keeps at most {MAX_TEXT_BYTES:,} per value"


def stored_json(field: str, value: Any) -> str:
    """The stored JSON text of a value already checked (`check_content` and friends),
    `ValueError` naming `field` if it is larger than `MAX_TEXT_BYTES`."""
    return check_text_size(field, dump_json(value))


def escaped_nul(text: str) -> bool:
    """Whether JSON text holds the escape `\\u0000` (a NUL inside a string), which
    PostgreSQL's `jsonb` refuses (an escaped backslash before `u0000` is not one)."""
    start = text.find("\\u0000")
    while start != -1:
        backslashes = len(text[:start]) - len(text[:start].rstrip("\\"))
        if backslashes % 2 == 0:
            return True
        start = text.find("\\u0000", start + 1)
    return False


def first_nul(value: Any) -> str | None:
    """The path of the first string holding a NUL character inside a JSON value (keys
    too), or None: PostgreSQL's `jsonb` cannot hold `\\u0000`, so `content::jsonb`
    would fail on such a cell."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return path
        elif isinstance(item, dict):
            for name, child in item.items():
                if "\x00" in name:
                    return path
                stack.append((child, f"{path}.{name}"))
        elif isinstance(item, list | tuple):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
    return None


class SessionFilter(BaseModel):
    """Which sessions `list_sessions` and `count_sessions` see; every field is optional
    and the given ones must all match. Key parts are normalised as in `SessionKey`;
    `*_after` and `*_before` bounds are exclusive and must be timezone-aware."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    agent_id: str | None = None
    channel: str | None = None
    account_id: str | None = None
    peer_kind: PeerKind | None = None
    peer_id: str | None = None
    status: SessionStatus | None = None
    created_after: AwareDatetime | None = None
    created_before: AwareDatetime | None = None
    updated_after: AwareDatetime | None = None
    updated_before: AwareDatetime | None = None

    @field_validator("agent_id", "channel", mode="before")
    @classmethod
    def _lower_part(cls, value: Any) -> str | None:
        return None if value is None else normalize_key_part(value, lower=True)

    @field_validator("account_id", "peer_id", mode="before")
    @classmethod
    def _cased_part(cls, value: Any) -> str | None:
        return None if value is None else normalize_key_part(value, lower=False)

    @field_validator("peer_kind", mode="before")
    @classmethod
    def _peer_kind(cls, value: Any) -> PeerKind | None:
        return (
            None if value is None else parse_enum(PeerKind, normalize_key_part(value, lower=True))
        )

    @field_validator("status", mode="before")
    @classmethod
    def _status(cls, value: Any) -> SessionStatus | None:
        return None if value is None else parse_enum(SessionStatus, value)
