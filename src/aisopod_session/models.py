"""The schema in Python: the `Session` and `Message` tables, their column types, and the
validated input models `NewMessage` and `SessionFilter`.

The tables mirror migration 1 (`migrations.py`) column for column; a test compares the two.
"""

import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, cast

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationInfo, field_validator
from sqlalchemy import BigInteger, Column, Dialect, Index, Integer, Text, UniqueConstraint, text
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, Relationship, SQLModel

from aisopod_session.enums import PeerKind, Role, SessionStatus
from aisopod_session.errors import SessionStoreError
from aisopod_session.keys import SessionKey, normalize_key_part, parse_enum
from aisopod_session.validation import (
    JSONValue,
    check_aware,
    check_content,
    check_int,
    check_message_meta,
    check_meta_filter,
    check_tool_calls,
    dump_json,
)

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
            found = _strict_json(value)
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
_DECODER = json.JSONDecoder(parse_constant=_not_a_number, parse_float=_finite_float)
_decode = _DECODER.decode
# The decoder's scanner (an internal of the standard library's json: loading.py names it
# with the test that guards it) reads one value at an index and returns it with where it
# ended; `decode` is that plus two regular-expression matches for whitespace, a third
# of the cost of a short value, and every message row has two JSON cells.
# (An instance attribute, set by `JSONDecoder.__init__`; typeshed does not declare it.)
_scan: Callable[[str, int], tuple[Any, int]] = vars(_DECODER)["scan_once"]


def _strict_json(text: str) -> Any:
    """The JSON value of `text`, exactly as `_DECODER.decode` reads it (whitespace
    around it allowed; anything after it refused; the same errors)."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:  # whitespace first, or no JSON value: decode says which
        return _decode(text)
    if end != len(text):  # whitespace after it, or extra data: decode says which
        return _decode(text)
    return value


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


# --- tables ---------------------------------------------------------------------------


ID = BigInteger().with_variant(Integer(), "sqlite")
"""The type of the session and message ids and of the columns holding them: 64-bit
everywhere, spelt `INTEGER` on SQLite (its rowid) and `BIGINT` on PostgreSQL, as the
migrations make them. Typed so, every statement binds an id as a BIGINT on PostgreSQL;
as `Integer` it was cast to 32 bits there, and an id past 2**31 was refused."""


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
        # Migration 4 (PostgreSQL also gets idx_sessions_updated_id: see migrations.py).
        Index("idx_sessions_agent_updated", "agent_id", "updated_at", "id"),
        # Partial on both backends (WHERE parent_id IS NOT NULL: migrations.py). Only the
        # SQLite spelling is here: a `postgresql_where` would import SQLAlchemy's
        # PostgreSQL dialect (~30 ms) into every process, SQLite ones included.
        Index("idx_sessions_parent", "parent_id", sqlite_where=text("parent_id IS NOT NULL")),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(ID, primary_key=True))
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
    # Migration 4: lineage. A fork records the session it was copied from and the last
    # message it copied (ids kept as history: either may since have been deleted).
    parent_id: int | None = Field(default=None, sa_column=Column(ID, nullable=True))
    forked_from_message_id: int | None = Field(default=None, sa_column=Column(ID, nullable=True))

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

    id: int | None = Field(default=None, sa_column=Column(ID, primary_key=True))
    session_id: int = Field(foreign_key="sessions.id", ondelete="CASCADE", sa_type=ID)
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

    # Chat text stays out of error messages (and so out of logs): pydantic would print
    # a repr of the refused value, which for a value of megabytes costs seconds.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

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


class SessionFilter(BaseModel):
    """Which sessions `list_sessions`, `count_sessions`, `page_sessions`,
    `search_messages`, `prune` and the export see; every field is optional and the given
    ones must all match. Key parts are normalised as in `SessionKey`; `*_after` and
    `*_before` bounds are exclusive and must be timezone-aware; `meta` matches sessions
    whose metadata holds each of its keys with an equal JSON value; `parent_id` matches
    the forks of that session."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

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
    meta: dict[str, Any] | None = None
    """Top-level metadata keys and the JSON values they must hold (each key present with
    an equal value: see docs/api.md, "Metadata filters")."""
    parent_id: int | None = None
    """Only the forks of the session with this id (`Session.parent_id`)."""

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

    @field_validator("created_after", "created_before", "updated_after", "updated_before")
    @classmethod
    def _in_utc(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        if value is None:
            return None
        try:
            return check_aware(info.field_name or "time", value)
        except ValueError as exc:  # pydantic names the field itself
            raise ValueError(str(exc).partition(": ")[2]) from None

    @field_validator("parent_id", mode="plain")
    @classmethod
    def _parent_id(cls, value: Any) -> int | None:
        if value is not None:
            try:
                check_int("parent_id", value, minimum=1)
            except ValueError as exc:  # pydantic names the field itself
                raise ValueError(str(exc).removeprefix("parent_id: ")) from None
        return cast(int | None, value)

    @field_validator("meta", mode="plain")
    @classmethod
    def _meta(cls, value: Any) -> dict[str, Any] | None:
        return check_meta_filter(value)


def as_filter(value: Any) -> SessionFilter:
    """A filter argument as a `SessionFilter`: None (no filter), one already, or a mapping
    of its fields (validated: errors name the field); else `ValueError` naming `filter`."""
    if value is None:
        return SessionFilter()
    if isinstance(value, SessionFilter):
        return value
    if isinstance(value, Mapping):
        return SessionFilter.model_validate(dict(value))
    raise ValueError(f"filter: must be a SessionFilter or a mapping, not {type(value).__name__}")


def as_read_messages(field: str, value: Any) -> list[Message]:
    """`value` as a list: a non-empty sequence of stored messages (`Message`s with ids,
    as a read gave them) in increasing id order; else `ValueError` naming `field` (or
    `field[i]`)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{field}: must be a sequence of messages, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{field}: must hold at least one message")
    messages = list(value)
    for index, message in enumerate(messages):
        if not isinstance(message, Message) or type(message.id) is not int:
            raise ValueError(
                f"{field}[{index}]: must be a stored Message (as a read gave it), "
                f"not {type(message).__name__}"
            )
    ids = [message.id for message in messages]
    if any(later <= earlier for earlier, later in itertools.pairwise(ids)):
        raise ValueError(f"{field}: the messages must be in increasing id order")
    return messages


def as_new_messages(messages: Any) -> list[NewMessage]:
    """A batch argument as `NewMessage`s: a non-empty sequence of them or of mappings of
    their fields; else `ValueError` naming `messages` (or `messages[i]`)."""
    if isinstance(messages, NewMessage | str | bytes | Mapping) or not isinstance(
        messages, Sequence
    ):
        raise ValueError(
            f"messages: must be a sequence of NewMessage, not {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages: must hold at least one message")
    result: list[NewMessage] = []
    for index, message in enumerate(messages):
        if isinstance(message, NewMessage):
            result.append(message)
        elif isinstance(message, Mapping):
            try:
                result.append(NewMessage.model_validate(dict(message)))
            except (TypeError, ValueError) as exc:  # a field missing, unknown or invalid
                raise ValueError(f"messages[{index}]: {exc}") from None
        else:
            raise ValueError(
                f"messages[{index}]: must be a NewMessage or a mapping, "
                f"not {type(message).__name__}"
            )
    return result
