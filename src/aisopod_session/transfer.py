"""Export a store to JSON Lines and import it back: backups, moves between machines, and
the `aisopod-session export` / `import` commands.

The format, one JSON object per line:

- first a header, `{"type": "aisopod-session-export", "format": 2, "schema_version": 3,
  "exported_at": "…"}` (optional on import);
- then one line per session, `{"type": "session", "id": 7, "key": "agent:channel:…",
  "agent_id": …, "created_at": "…", "message_count": 3, "metadata": {…}, …}` with every
  column of the `sessions` table (`metadata` under its column name);
- then one line per message in id order, `{"type": "message", "id": 41, "session":
  "agent:channel:…", "role": "user", "content": …, "tool_calls": null, "metadata": {},
  "created_at": "…"}`, naming its session by key; `content` and `tool_calls` are JSON
  values as the message holds them (a string for text).

Timestamps are the stored ISO-8601 UTC text. Format 2 (schema 3) added message content
of any JSON type, message `metadata` and the sessions' `input_tokens` and
`output_tokens`; files of format 1 (text content, no such fields) still import, as the
same messages. Both directions stream: memory does not grow
with the store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy import Connection, Engine, func, insert, select
from sqlmodel import SQLModel

from aisopod_session.connections import text_read_leniently
from aisopod_session.copying import high_water, set_high_water
from aisopod_session.enums import PeerKind, Role, SessionStatus
from aisopod_session.errors import DamagedRowError, translated_errors
from aisopod_session.keys import SessionKey
from aisopod_session.loading import MESSAGE, SESSION
from aisopod_session.migrations import SCHEMA_VERSION
from aisopod_session.models import Message, Session, SessionFilter, utc_text
from aisopod_session.repository import filter_params
from aisopod_session.statements import (
    KEY_COLUMNS,
    export_messages,
    export_sessions,
    filter_clauses,
)
from aisopod_session.transactions import BEGIN_MODE_OPTION, read_transaction, write_transaction
from aisopod_session.validation import (
    JSONValue,
    check_content,
    check_json,
    check_message_meta,
    check_tool_calls,
    dump_json,
    first_nul,
)

FORMAT = 2
"""The version of the line format this code writes."""
READS = (1, 2)
"""The line formats this code reads (format 1 is a subset of format 2)."""
HEADER_TYPE = "aisopod-session-export"

SESSIONS = SQLModel.metadata.tables[Session.__tablename__]
MESSAGES = SQLModel.metadata.tables[Message.__tablename__]

Progress = Callable[[int], object]
"""Called with the number of lines handled so far (at most every 1 000 lines)."""

_MAX_INTEGER = 2**63 - 1

logger = logging.getLogger("aisopod_session")


# --- export -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """How many sessions and messages `export_jsonl` wrote, and the stored rows it could
    not read and left out (`damaged`, each naming table, row id and column; the messages
    of a session left out are left out with it and counted in `skipped_messages`).
    `replaced_text`: how many text cells were not UTF-8 (written by another program) and
    were exported with U+FFFD in place of each bad byte sequence (SQLite)."""

    sessions: int
    messages: int
    damaged: list[DamagedRowError] = field(default_factory=list)
    skipped_messages: int = 0
    replaced_text: int = 0


def count_export(
    engine: Engine, filter: SessionFilter | Mapping[str, Any] | None = None
) -> tuple[int, int]:
    """How many sessions and messages `export_jsonl` would write with `filter` (for a
    progress bar's total). Read-only."""
    fields, params = filter_params(filter)
    clauses = filter_clauses(fields, engine.dialect.name)
    with read_transaction(engine) as conn:
        sessions = conn.execute(
            select(func.count()).select_from(SESSIONS).where(*clauses), params
        ).scalar_one()
        messages = conn.execute(
            select(func.count()).select_from(MESSAGES.join(SESSIONS)).where(*clauses),
            params,
        ).scalar_one()
    return int(sessions), int(messages)


def export_jsonl(
    engine: Engine,
    out: TextIO,
    filter: SessionFilter | Mapping[str, Any] | None = None,
    *,
    progress: Progress | None = None,
) -> ExportResult:
    """Write the sessions matching `filter` (every session by default) and their messages
    to `out` as JSON Lines (see the module docstring).

    One consistent snapshot (a read transaction; repeatable read on PostgreSQL), read
    with streaming cursors and written line by line, in constant memory; writers are not
    blocked. A stored row this code cannot read (written by plain SQL or another
    program) does not stop the export: it is left out and reported in the result's
    `damaged` (and logged). `ValueError` for a bad filter, `SessionStoreError` if the
    database fails.
    """
    fields, params = filter_params(filter)
    sessions = messages = skipped = 0
    damaged: list[DamagedRowError] = []
    left_out: set[Any] = set()  # ids of the sessions that could not be read
    out.write(
        json.dumps(
            {
                "type": HEADER_TYPE,
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "exported_at": utc_text(datetime.now(UTC)),
            }
        )
        + "\n"
    )
    with (
        translated_errors("export"),
        engine.connect() as conn,
        text_read_leniently(conn) as text,
    ):
        # A read snapshot: SQLite's deferred BEGIN takes no write lock (writers go on),
        # PostgreSQL's repeatable read keeps the sessions and messages read consistent.
        conn = conn.execution_options(**{BEGIN_MODE_OPTION: "DEFERRED"})
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        streaming = conn.execution_options(stream_results=True, yield_per=1000)
        with conn.begin():
            # The driver's own rows, read by the repository's loader: one definition of a
            # session's JSON (`session_json`) for exports and `--json` alike.
            sql = export_sessions(fields).on(conn.dialect)
            rows = streaming.exec_driver_sql(sql.text, sql.bind(params))
            for row in rows:
                try:
                    line = {"type": "session", **session_json(SESSION.read(row))}
                except DamagedRowError as exc:
                    _report(damaged, exc)
                    left_out.add(row[0])
                    continue
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                sessions += 1
                if progress is not None and sessions % 1000 == 0:
                    progress(sessions)
            sql = export_messages(fields).on(conn.dialect)
            rows = streaming.exec_driver_sql(sql.text, sql.bind(params))
            for row in rows:
                if row[1] in left_out:
                    skipped += 1
                    continue
                try:
                    line = _message_line(row)
                except DamagedRowError as exc:
                    _report(damaged, exc)
                    continue
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                messages += 1
                if progress is not None and messages % 1000 == 0:
                    progress(sessions + messages)
    if progress is not None:
        progress(sessions + messages)
    if text.replaced:
        logger.warning(
            "export read %d text cells that are not UTF-8 with U+FFFD in their place",
            text.replaced,
        )
    return ExportResult(
        sessions=sessions,
        messages=messages,
        damaged=damaged,
        skipped_messages=skipped,
        replaced_text=text.replaced,
    )


def _report(damaged: list[DamagedRowError], error: DamagedRowError) -> None:
    logger.warning("export left out a damaged row: %s", error)
    damaged.append(error)


def session_json(session: Session) -> dict[str, Any]:
    """A session as JSON: its key, then every column under its column name (`metadata`),
    times in their stored ISO-8601 UTC form, enums as their values."""
    return {
        "key": str(session.key),
        "id": session.id,
        "agent_id": session.agent_id,
        "channel": session.channel,
        "account_id": session.account_id,
        "peer_kind": session.peer_kind.value,
        "peer_id": session.peer_id,
        "created_at": utc_text(session.created_at),
        "updated_at": utc_text(session.updated_at),
        "message_count": session.message_count,
        "token_usage": session.token_usage,
        "input_tokens": session.input_tokens,
        "output_tokens": session.output_tokens,
        "metadata": session.meta,
        "status": session.status.value,
        "compaction_count": session.compaction_count,
        "last_compacted_at": _plain(session.last_compacted_at),
        "last_compaction_summary": session.last_compaction_summary,
        "parent_id": session.parent_id,
        "forked_from_message_id": session.forked_from_message_id,
    }


def _message_line(row: Any) -> dict[str, Any]:
    """A message's export line from an `export_messages` row: the message's columns,
    then its session's key parts."""
    message = MESSAGE.read(row)
    parts = row[len(MESSAGE.columns) :]
    try:
        key = SessionKey(*parts)
    except ValueError as exc:
        raise DamagedRowError(
            "sessions", message.session_id, "key", f"not a valid key {tuple(parts)!r}: {exc}"
        ) from None
    return {
        "type": "message",
        "id": message.id,
        "session": str(key),
        "role": _plain(message.role),
        "content": message.content,
        "tool_calls": message.tool_calls,
        "metadata": message.meta,
        "created_at": utc_text(message.created_at),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return utc_text(value)
    if isinstance(value, PeerKind | Role | SessionStatus):
        return value.value
    return value


# --- import -------------------------------------------------------------------------------


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class HeaderLine(_Line):
    type: Literal["aisopod-session-export"]
    format: int
    schema_version: int
    exported_at: AwareDatetime | None = None


class SessionLine(_Line):
    """A session as an export line holds it; validated like the repository's input."""

    type: Literal["session"]
    id: int | None = Field(default=None, ge=1, le=_MAX_INTEGER)
    key: str | None = None
    agent_id: str
    channel: str
    account_id: str
    peer_kind: PeerKind
    peer_id: str
    created_at: AwareDatetime
    updated_at: AwareDatetime
    message_count: int = Field(default=0, ge=0, le=_MAX_INTEGER)
    token_usage: int = Field(default=0, ge=0, le=_MAX_INTEGER)
    input_tokens: int = Field(default=0, ge=0, le=_MAX_INTEGER)
    output_tokens: int = Field(default=0, ge=0, le=_MAX_INTEGER)
    metadata: dict[str, Any] = Field(default_factory=dict)
    status: SessionStatus = SessionStatus.ACTIVE
    compaction_count: int = Field(default=0, ge=0, le=_MAX_INTEGER)
    last_compacted_at: AwareDatetime | None = None
    last_compaction_summary: str | None = None
    # A fork's lineage, as exported: ids in the exporting store, so not imported (an
    # import gives every session a new id).
    parent_id: int | None = Field(default=None, ge=1, le=_MAX_INTEGER)
    forked_from_message_id: int | None = Field(default=None, ge=1, le=_MAX_INTEGER)

    @model_validator(mode="after")
    def _check(self) -> SessionLine:
        key = self.session_key()  # ValueError naming the part
        if self.key is not None and self.key != str(key):
            raise ValueError(f"key: {self.key!r} does not match the key parts ({key})")
        check_json("metadata", self.metadata)
        if self.last_compaction_summary is not None:
            check_content(self.last_compaction_summary, "last_compaction_summary")
        return self

    def session_key(self) -> SessionKey:
        return SessionKey(
            self.agent_id, self.channel, self.account_id, self.peer_kind, self.peer_id
        )

    def row(self) -> dict[str, Any]:
        key = self.session_key()
        return {
            "agent_id": key.agent_id,
            "channel": key.channel,
            "account_id": key.account_id,
            "peer_kind": key.peer_kind,
            "peer_id": key.peer_id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "message_count": self.message_count,
            "token_usage": self.token_usage,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "metadata": self.metadata,
            "status": self.status,
            "compaction_count": self.compaction_count,
            "last_compacted_at": self.last_compacted_at,
            "last_compaction_summary": self.last_compaction_summary,
        }


class MessageLine(_Line):
    """A message as an export line holds it, naming its session by key."""

    type: Literal["message"]
    id: int | None = Field(default=None, ge=1, le=_MAX_INTEGER)
    session: str
    role: Role
    content: JSONValue
    tool_calls: JSONValue = None
    metadata: dict[str, Any] | None = None
    created_at: AwareDatetime

    @field_validator("content", mode="plain")
    @classmethod
    def _content(cls, value: Any) -> JSONValue:
        return check_content(value)

    @field_validator("tool_calls", mode="plain")
    @classmethod
    def _tool_calls(cls, value: Any) -> JSONValue:
        return check_tool_calls(value)

    @field_validator("metadata", mode="plain")
    @classmethod
    def _metadata(cls, value: Any) -> dict[str, Any] | None:
        return check_message_meta(value, "metadata")

    @model_validator(mode="after")
    def _check(self) -> MessageLine:
        _parse_key(self.session)
        return self

    def fields(self) -> tuple[str, ...]:
        """What makes two messages of one session the same message: role, content, tool
        calls, metadata and time, in stored form (so `1` and `true` differ)."""
        return _identity(self.role, self.content, self.tool_calls, self.metadata, self.created_at)


@dataclass(frozen=True)
class LineError:
    """A line `import_jsonl` refused, by number (1-based), and why."""

    line: int
    reason: str


@dataclass
class ImportResult:
    """What `import_jsonl` did. Counts are of lines; `errors` lists every refused one."""

    sessions_created: int = 0
    sessions_existing: int = 0
    messages_imported: int = 0
    messages_existing: int = 0
    errors: list[LineError] = field(default_factory=list)


Record = HeaderLine | SessionLine | MessageLine

# Every message line names its session by key: parsed once per key, not once per line.
_parse_key = functools.lru_cache(maxsize=1024)(SessionKey.parse)


def parse_line(text: str) -> Record:
    """One line of an export, validated; `ValueError` saying what is wrong."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise ValueError("not JSON this store takes: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ValueError(f"not a JSON object but {type(raw).__name__}")
    kind = raw.get("type")
    model: type[Record]
    if kind == HEADER_TYPE:
        model = HeaderLine
    elif kind == "session":
        model = SessionLine
    elif kind == "message":
        model = MessageLine
    else:
        raise ValueError(f"type: must be 'session', 'message' or {HEADER_TYPE!r}, got {kind!r}")
    try:
        return model.model_validate(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValidationError as exc:
        raise ValueError(first_complaint(exc, str(kind))) from None


def first_complaint(exc: ValidationError, record: str) -> str:
    """A record's validation error as `field: what is wrong`, its first complaint (the
    field is `record` when the complaint is about the whole record)."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or record
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"


MAX_LINE_LENGTH = 64 * 1024 * 1024
"""The longest line `import_jsonl` reads, in characters (a message of up to
`MAX_TEXT_BYTES` of ASCII text, escaped as JSON, fits); a longer line is refused by
number without being read into memory."""

_BATCH_CHARACTERS = 32 * 1024 * 1024  # a batch also ends when its lines hold this much


def import_jsonl(
    engine: Engine,
    lines: Iterable[str],
    *,
    batch_size: int = 1000,
    progress: Progress | None = None,
    max_line_length: int = MAX_LINE_LENGTH,
) -> ImportResult:
    """Import an export (see the module docstring) into the store, streaming.

    Every line is validated first; a bad one is not imported and is reported in
    `errors` with its number and reason, and the others go on. Valid lines are written
    in batches of `batch_size`, each batch one write transaction. Ids are kept where
    they are free, so importing into an empty store reproduces the exported one exactly.
    Importing is idempotent: a session whose key is already in the store is reused as it
    is (its counters and times are not changed, except that `message_count` is recounted
    if messages are added to it), and a message already there (the same id, or without
    an id the same session, role, content, tool calls and time) is skipped, so importing
    the same file twice changes nothing. A message whose id is taken by a different
    message, or whose session is neither in the store nor earlier in the file, is
    refused. Id sequences are moved past the imported ids.

    Memory stays bounded whatever the file holds: a line longer than `max_line_length`
    characters is refused by number (from a text stream, without being read whole), and
    a batch also ends once its lines hold 32 Mi characters. On PostgreSQL a line holding
    text that PostgreSQL cannot store (a NUL character) is refused by number too.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if (
        isinstance(max_line_length, bool)
        or not isinstance(max_line_length, int)
        or max_line_length < 1
    ):
        raise ValueError(f"max_line_length: must be an integer >= 1, got {max_line_length!r}")
    result = ImportResult()
    batch: list[tuple[int, SessionLine | MessageLine]] = []
    held = handled = 0
    for number, text in enumerate(_bounded_lines(lines, max_line_length), start=1):
        if text is None:
            result.errors.append(
                LineError(number, f"longer than {max_line_length:,} characters; not read")
            )
            continue
        if not text.strip():
            continue
        try:
            record = parse_line(text)
            if isinstance(record, HeaderLine):
                if number != 1:
                    raise ValueError("the header may only be the first line")
                if record.format not in READS:
                    raise ValueError(
                        f"format: this code reads formats {', '.join(map(str, READS))}, "
                        f"not {record.format}"
                    )
                continue
        except ValueError as exc:
            result.errors.append(LineError(number, str(exc)))
            continue
        batch.append((number, record))
        held += len(text)
        if len(batch) >= batch_size or held >= _BATCH_CHARACTERS:
            _import_batch(engine, batch, result)
            handled += len(batch)
            batch, held = [], 0
            if progress is not None:
                progress(handled)
    if batch:
        _import_batch(engine, batch, result)
        handled += len(batch)
        if progress is not None:
            progress(handled)
    result.errors.sort(key=lambda error: error.line)
    return result


def _bounded_lines(lines: Iterable[str], limit: int) -> Iterator[str | None]:
    """Each line of `lines`, or None for one longer than `limit` characters. From a text
    stream (anything with `readline`) a line is read at most `limit` characters at a time,
    so a longer one is skipped without being held in memory."""
    readline = getattr(lines, "readline", None)
    if readline is None:
        for text in lines:
            yield None if _length(text) > limit else text
        return
    while True:
        text = readline(limit + 2)  # the line, its "\r\n", and one more to tell
        if not text:
            return
        if text.endswith("\n") or len(text) <= limit:
            yield None if _length(text) > limit else text
            continue
        while text and not text.endswith("\n"):  # the rest of the long line, unread
            text = readline(limit)
        yield None


def _length(line: str) -> int:
    """A line's length without its line break (no copy of a long line)."""
    if line.endswith("\r\n"):
        return len(line) - 2
    return len(line) - 1 if line.endswith("\n") else len(line)


def check_storable(record: SessionLine | MessageLine, engine: Engine) -> None:
    """`ValueError` naming the field if `engine`'s database cannot store one of the
    record's values (PostgreSQL: a NUL character), before anything is written."""
    _storable(record, engine.dialect.name == "postgresql")


def _storable(record: SessionLine | MessageLine, no_nul: bool) -> None:
    """`ValueError` naming the field if PostgreSQL (`no_nul`) cannot store a value."""
    if not no_nul:
        return
    values: list[tuple[str, Any]] = (
        [
            ("content", record.content),
            ("tool_calls", record.tool_calls),
            ("metadata", record.metadata),
        ]
        if isinstance(record, MessageLine)
        else [("last_compaction_summary", record.last_compaction_summary)]
    )
    for name, value in values:
        path = first_nul(value)
        if path is not None:
            raise ValueError(
                f"{name}{path}: holds a NUL character, which the store refuses on PostgreSQL"
            )


def import_records(
    engine: Engine,
    records: list[tuple[int, SessionLine | MessageLine]],
    result: ImportResult,
    *,
    refresh: bool = False,
    lineage: bool = False,
) -> None:
    """Write numbered, validated records in one write transaction, by `import_jsonl`'s
    rules (a record the store cannot hold goes to `result.errors` under its number). With
    `refresh`, a session already in the store takes the record's metadata, `updated_at`,
    counters, status and compaction columns (its id, `created_at` and messages stay):
    for importers that bring a session up to date with its source. With `lineage`, a
    session created takes the record's `parent_id` and `forked_from_message_id` (ids in
    this store, which the caller read: an export's are another store's, and are not
    imported)."""
    _import_batch(engine, records, result, refresh=refresh, lineage=lineage)


def _import_batch(
    engine: Engine,
    batch: list[tuple[int, SessionLine | MessageLine]],
    result: ImportResult,
    *,
    refresh: bool = False,
    lineage: bool = False,
) -> None:
    no_nul = engine.dialect.name == "postgresql"
    storable: list[tuple[int, SessionLine | MessageLine]] = []
    for number, record in batch:
        try:
            _storable(record, no_nul)
        except ValueError as exc:
            result.errors.append(LineError(number, str(exc)))
            continue
        storable.append((number, record))
    batch = storable
    with translated_errors("import"), write_transaction(engine) as conn:
        sessions: dict[str, int] = {}  # key text to the store's id, for this batch
        touched: set[int] = set()
        new_sessions: set[int] = set()
        pending: dict[int, tuple[int, tuple[Any, ...]]] = {}  # message id: session, fields
        ids = [r.id for _, r in batch if isinstance(r, MessageLine) and r.id is not None]
        taken = _messages_by_id(conn, ids)
        new_messages: list[dict[str, Any]] = []
        stored: dict[tuple[int, str], set[bytes]] = {}  # see _same_message_exists
        for number, record in batch:
            if isinstance(record, SessionLine):
                created = _import_session(
                    conn, record, sessions, result, refresh=refresh, lineage=lineage
                )
                if created is not None:
                    touched.add(created)
                    new_sessions.add(created)
                continue
            session_id = _session_id(conn, record.session, sessions)
            if session_id is None:
                result.errors.append(
                    LineError(
                        number,
                        f"session: no session {record.session} in the store or earlier in the file",
                    )
                )
                continue
            fields = record.fields()
            if record.id is not None:
                known = taken.get(record.id) or pending.get(record.id)
                if known is not None:
                    if known == (session_id, fields):
                        result.messages_existing += 1
                    else:
                        result.errors.append(
                            LineError(
                                number,
                                f"id: message {record.id} is already in the store as a "
                                "different message",
                            )
                        )
                    continue
                pending[record.id] = (session_id, fields)
            # A session this batch created holds nothing yet: nothing to compare with.
            elif session_id not in new_sessions and _same_message_exists(
                conn, session_id, fields, record.created_at, stored
            ):
                result.messages_existing += 1
                continue
            new_messages.append(
                {
                    **({"id": record.id} if record.id is not None else {}),
                    "session_id": session_id,
                    "role": record.role,
                    "content": record.content,
                    "tool_calls": record.tool_calls,
                    "metadata": record.metadata or {},
                    "created_at": record.created_at,
                }
            )
            touched.add(session_id)
        with_ids = [row for row in new_messages if "id" in row]
        without = [row for row in new_messages if "id" not in row]
        if with_ids:
            conn.execute(insert(MESSAGES), with_ids)
            # PostgreSQL's sequence does not see ids given explicitly: move it past them
            # before rows without an id take ids from it.
            set_high_water(conn, MESSAGES, max(row["id"] for row in with_ids))
        if without:
            conn.execute(insert(MESSAGES), without)
        result.messages_imported += len(new_messages)
        for session_id in touched:
            count = select(func.count()).where(MESSAGES.c.session_id == session_id)
            conn.execute(
                SESSIONS.update()
                .where(SESSIONS.c.id == session_id)
                .values(message_count=count.scalar_subquery())
            )
        for table in (SESSIONS, MESSAGES):
            set_high_water(conn, table, high_water(conn, table))


def _identity(
    role: Any, content: Any, tool_calls: Any, meta: Any, created_at: datetime
) -> tuple[str, ...]:
    """A message's fields in stored form, to tell whether two are the same message."""
    return (
        str(_plain(role)),
        dump_json(content),
        "" if tool_calls is None else dump_json(tool_calls),
        dump_json(meta or {}),
        utc_text(created_at),
    )


_IDENTITY_COLUMNS = (
    MESSAGES.c.role,
    MESSAGES.c.content,
    MESSAGES.c.tool_calls,
    MESSAGES.c.metadata,
    MESSAGES.c.created_at,
)


def _messages_by_id(conn: Connection, ids: list[int]) -> dict[int, tuple[int, tuple[Any, ...]]]:
    if not ids:
        return {}
    rows = conn.execute(
        select(MESSAGES.c.id, MESSAGES.c.session_id, *_IDENTITY_COLUMNS).where(
            MESSAGES.c.id.in_(ids)
        )
    )
    return {row[0]: (row[1], _identity(*row[2:])) for row in rows}


def _same_message_exists(
    conn: Connection,
    session_id: int,
    fields: tuple[str, ...],
    created_at: datetime,
    stored: dict[tuple[int, str], set[bytes]],
) -> bool:
    """Whether the session already holds a message with these fields (and no id in the
    file). `stored` keeps, for the batch, a digest of each message of each (session,
    time) read so far: a file of many messages with one time reads them once per batch,
    not once per line (which grew with the square of their number)."""
    group = (session_id, fields[-1])
    known = stored.get(group)
    if known is None:
        # Compared in Python, in stored form: the same value may be stored as different
        # JSON text (a cell converted by migration 3, or written by another program).
        rows = conn.execute(
            select(*_IDENTITY_COLUMNS).where(
                MESSAGES.c.session_id == session_id,
                MESSAGES.c.created_at == created_at,
            )
        )
        known = stored[group] = {_digest(_identity(*row)) for row in rows}
    return _digest(fields) in known


def _digest(fields: tuple[str, ...]) -> bytes:
    """A 32-byte digest of a message's identity (its fields' lengths included, so no two
    different tuples join into the same text)."""
    hashed = hashlib.blake2b(digest_size=32)
    for text in fields:
        data = text.encode("utf-8", "surrogatepass")
        hashed.update(len(data).to_bytes(8, "big"))
        hashed.update(data)
    return hashed.digest()


def _session_id(conn: Connection, key_text: str, known: dict[str, int]) -> int | None:
    found = known.get(key_text)
    if found is not None:
        return found
    key = SessionKey.parse(key_text)
    row = conn.execute(
        select(SESSIONS.c.id).where(
            *(
                SESSIONS.c[name] == value
                for name, value in zip(KEY_COLUMNS, key.parts(), strict=True)
            )
        )
    ).first()
    if row is None:
        return None
    known[key_text] = int(row[0])
    return int(row[0])


def _import_session(
    conn: Connection,
    record: SessionLine,
    known: dict[str, int],
    result: ImportResult,
    *,
    refresh: bool = False,
    lineage: bool = False,
) -> int | None:
    """The id of the session the import creates, or None if its key is in the store
    (whose row `refresh` brings up to date with the record; `lineage`: see
    `import_records`)."""
    key_text = str(record.session_key())
    existing = _session_id(conn, key_text, known)
    if existing is not None:
        result.sessions_existing += 1
        if refresh:
            values = record.row()
            for name in (*KEY_COLUMNS, "created_at", "message_count"):
                values.pop(name)
            conn.execute(SESSIONS.update().where(SESSIONS.c.id == existing).values(values))
        return None
    values = record.row()
    if lineage:
        values["parent_id"] = record.parent_id
        values["forked_from_message_id"] = record.forked_from_message_id
    if record.id is not None:
        free = conn.execute(select(SESSIONS.c.id).where(SESSIONS.c.id == record.id)).first()
        if free is None:
            values["id"] = record.id
    # Counted from the rows the import adds (so a session whose messages are refused or
    # missing from the file still has a true count).
    values["message_count"] = 0
    new_id = conn.execute(insert(SESSIONS).values(values).returning(SESSIONS.c.id)).scalar_one()
    if "id" in values:
        set_high_water(conn, SESSIONS, int(new_id))  # see the messages' ids in _import_batch
    known[key_text] = int(new_id)
    result.sessions_created += 1
    return int(new_id)
