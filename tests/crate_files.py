"""Stores as the Rust crate `aisopod-session` (crates/aisopod-session) makes, writes and
reads them, in plain SQL: no code of this library is used here.

The crate is SQLite only. It opens a file in WAL mode with foreign keys on, creates the
seed tables and indexes, adds its version-2 compaction columns and records
`schema_version` as a bare `(version INTEGER PRIMARY KEY)` table holding one row, 2. It
stores `content` and `tool_calls` as compact JSON (serde_json::to_string) and timestamps
as chrono's `to_rfc3339()`; reading history it orders rows by `created_at` text, returns
the oldest 1 000 by default, and drops every row whose content does not parse.

A target is a SQLite file (a `Path`, or a `str` without `://`) or a PostgreSQL URL as
`tests.dbtools.store_location` yields it (its own schema in `?options=-csearch_path=…`),
where the same shape is built with the same SQL (ids as identity columns, as a
hand-written port of the crate's DDL would make them).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from aisopod_session.migrations import MIGRATIONS
from tests.dbtools import SEED_SCHEMA

Target = Path | str

CRATE_SCHEMA_VERSION = 2
"""The crate's `SCHEMA_VERSION`: it migrates a store whose highest version is below it."""

CRATE_HISTORY_LIMIT = 1000
"""How many messages the crate's history returns when no limit is given."""

# --- the crate's DDL ------------------------------------------------------------------------


def _seed_ddl(postgres: bool) -> list[str]:
    """The seed spec's tables and indexes, as the crate's DDL creates them: on SQLite the
    spec's own text (tests/seed_schema.sql), on PostgreSQL (which the crate does not
    support) the same tables as migration 1 makes them there."""
    if postgres:
        return list(MIGRATIONS[0].statements_for("postgresql"))
    text = "\n".join(
        line for line in SEED_SCHEMA.read_text().splitlines() if not line.startswith("--")
    )
    return [statement.strip() for statement in text.split(";") if statement.strip()]


_V2_ALTERS = (
    "ALTER TABLE sessions ADD COLUMN compaction_count INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE sessions ADD COLUMN last_compacted_at TEXT",
    "ALTER TABLE sessions ADD COLUMN last_compaction_summary TEXT",
)

_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)"

SESSION_COLUMNS = (
    "id",
    "agent_id",
    "channel",
    "account_id",
    "peer_kind",
    "peer_id",
    "created_at",
    "updated_at",
    "message_count",
    "token_usage",
    "metadata",
    "status",
    "compaction_count",
    "last_compacted_at",
    "last_compaction_summary",
)
"""The sessions columns the crate's schema (version 2) has, in its order."""

MESSAGE_COLUMNS = ("id", "session_id", "role", "content", "tool_calls", "created_at")
"""The messages columns the crate's schema has, in its order."""


# --- connections ----------------------------------------------------------------------------


def is_postgres(target: Target) -> bool:
    """Whether `target` names a PostgreSQL schema rather than a SQLite file."""
    return isinstance(target, str) and "://" in target


class Plain:
    """One plain connection: sqlite3 in autocommit mode with the crate's pragmas, or psycopg
    in autocommit mode on the URL's schema. Statements are written with `?`."""

    def __init__(self, target: Target) -> None:
        self.postgres = is_postgres(target)
        if self.postgres:
            url = make_url(str(target))
            options = url.query.get("options")
            if isinstance(options, tuple):
                options = options[-1]
            self._pg = psycopg.connect(
                host=url.host,
                port=url.port,
                user=url.username,
                password=url.password,
                dbname=url.database,
                options=options,
                autocommit=True,
            )
        else:
            self._lite = sqlite3.connect(target, isolation_level=None)
            self._lite.execute("PRAGMA journal_mode = WAL")
            self._lite.execute("PRAGMA foreign_keys = ON")

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement; its rows (empty for a statement that returns none)."""
        if self.postgres:
            cursor = self._pg.execute(sql.replace("?", "%s"), tuple(params))
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
        return [tuple(row) for row in self._lite.execute(sql, tuple(params)).fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first column of the first row."""
        return self.all(sql, params)[0][0]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction for the block, as rusqlite's `transaction()` (BEGIN DEFERRED)."""
        if self.postgres:
            with self._pg.transaction():
                yield
            return
        self._lite.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._lite.execute("ROLLBACK")
            raise
        self._lite.execute("COMMIT")

    def close(self) -> None:
        if self.postgres:
            self._pg.close()
        else:
            self._lite.close()  # the last connection to close checkpoints the WAL


@contextmanager
def plain(target: Target) -> Iterator[Plain]:
    """A `Plain` connection for the block."""
    conn = Plain(target)
    try:
        yield conn
    finally:
        conn.close()


# --- values as the crate writes them ---------------------------------------------------------


def crate_json(value: Any) -> str:
    """serde_json::to_string: compact JSON, non-ASCII text as itself."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def chrono_stamp(moment: datetime, *, nanos: int = 0, z: bool = False) -> str:
    """chrono's `DateTime<Utc>::to_rfc3339()`: `+00:00` and as many fraction digits as
    the value needs among 0, 3, 6 and 9 (`nanos` adds nanoseconds beyond the
    microsecond). With `z`, a `Z` instead of `+00:00` (what `to_rfc3339_opts(..., true)`
    and other writers give)."""
    moment = moment.astimezone(UTC)
    total = moment.microsecond * 1000 + nanos
    if total == 0:
        fraction = ""
    elif total % 1_000_000 == 0:
        fraction = f".{total // 1_000_000:03d}"
    elif total % 1000 == 0:
        fraction = f".{total // 1000:06d}"
    else:
        fraction = f".{total:09d}"
    return f"{moment:%Y-%m-%dT%H:%M:%S}{fraction}{'Z' if z else '+00:00'}"


# --- the crate's reading ----------------------------------------------------------------------

RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})", re.ASCII
)
"""An RFC 3339 date-time as chrono's `parse_from_rfc3339` takes it (upper-case `T`, as
every writer here uses)."""


def parse_rfc3339(text: str) -> datetime:
    """The instant `text` names; `ValueError` unless it is RFC 3339 text."""
    if not isinstance(text, str) or RFC3339.fullmatch(text) is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    return datetime.fromisoformat(text)


def parse_crate_json(text: Any) -> Any:
    """serde_json::from_str into a Value: strict JSON text (no NaN or Infinity, no number
    overflowing a float), else `ValueError`."""
    if not isinstance(text, str):
        raise ValueError(f"not JSON text: {text!r}")

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def finite(number: str) -> float:
        value = float(number)
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"{number} is out of range")
        return value

    return json.loads(text, parse_constant=constant, parse_float=finite)


@dataclass(frozen=True)
class CrateMessage:
    """One message as the crate's history returns it."""

    id: int
    role: str
    content: Any
    tool_calls: Any
    created_at: datetime


def crate_read_history(
    target: Target, session_id: int, limit: int = CRATE_HISTORY_LIMIT
) -> list[CrateMessage]:
    """The session's history read as the crate reads it: the oldest `limit` rows by
    `created_at` text (binary order, as SQLite compares; `COLLATE "C"` on PostgreSQL),
    content and tool_calls parsed as JSON and created_at as RFC 3339; a row where any of
    them fails is dropped."""
    order = 'created_at COLLATE "C"' if is_postgres(target) else "created_at"
    with plain(target) as conn:
        rows = conn.all(
            "SELECT id, role, content, tool_calls, created_at FROM messages "
            f"WHERE session_id = ? ORDER BY {order} LIMIT ?",
            (session_id, limit),
        )
    kept: list[CrateMessage] = []
    for row_id, role, content, tool_calls, created_at in rows:
        try:
            message = CrateMessage(
                id=int(row_id),
                role=role,
                content=parse_crate_json(content),
                tool_calls=None if tool_calls is None else parse_crate_json(tool_calls),
                created_at=parse_rfc3339(created_at),
            )
        except ValueError:
            continue
        kept.append(message)
    return kept


def crate_version(target: Target) -> int:
    """The crate's own check, `SELECT COALESCE(MAX(version), 0) FROM schema_version`."""
    with plain(target) as conn:
        return int(conn.one("SELECT COALESCE(MAX(version), 0) FROM schema_version"))


# --- the crate's writing ----------------------------------------------------------------------


def crate_open(target: Target) -> bool:
    """What the crate's `open_database` does to a store: create a bare `schema_version`
    if there is none, and, when `COALESCE(MAX(version), 0)` is below 2, run its DDL, its
    indexes and its version-2 ALTERs and insert the one row 2. Returns whether it
    migrated; raises what the database raises (a second run of the ALTERs fails)."""
    with plain(target) as conn:
        conn.all(_VERSION_TABLE)
        if int(conn.one("SELECT COALESCE(MAX(version), 0) FROM schema_version")) >= 2:
            return False
        for statement in (*_seed_ddl(conn.postgres), *_V2_ALTERS):
            conn.all(statement)
        conn.all("INSERT INTO schema_version (version) VALUES (?)", (CRATE_SCHEMA_VERSION,))
        return True


def make_seed_store(target: Target) -> None:
    """A store made by plain SQL from the seed spec's DDL (tables and indexes), without the
    crate's version 2 and without `schema_version`."""
    with plain(target) as conn:
        for statement in _seed_ddl(conn.postgres):
            conn.all(statement)


def crate_create_session(
    target: Target,
    agent_id: str,
    channel: str,
    account_id: str,
    peer_kind: str,
    peer_id: str,
    *,
    created_at: str,
) -> int:
    """The crate's session INSERT, naming only its own columns; the new id."""
    with plain(target) as conn:
        rows = conn.all(
            "INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (agent_id, channel, account_id, peer_kind, peer_id, created_at, created_at),
        )
    return int(rows[0][0])


@dataclass(frozen=True)
class Turn:
    """A message to append as the crate does: JSON values, an RFC 3339 timestamp."""

    role: str
    content: Any
    created_at: str
    tool_calls: Any = None


def crate_append(target: Target, session_id: int, turns: Sequence[Turn]) -> list[int]:
    """The crate's `append_messages`: in one transaction, one INSERT per message naming
    only (session_id, role, content, tool_calls, created_at), content and tool_calls as
    compact JSON; then `message_count` grows by their number and `updated_at` becomes the
    last one's timestamp. The new ids."""
    ids: list[int] = []
    with plain(target) as conn, conn.transaction():
        for turn in turns:
            rows = conn.all(
                "INSERT INTO messages (session_id, role, content, tool_calls, created_at) "
                "VALUES (?, ?, ?, ?, ?) RETURNING id",
                (
                    session_id,
                    turn.role,
                    crate_json(turn.content),
                    None if turn.tool_calls is None else crate_json(turn.tool_calls),
                    turn.created_at,
                ),
            )
            ids.append(int(rows[0][0]))
        if turns:
            conn.all(
                "UPDATE sessions SET message_count = message_count + ?, updated_at = ? "
                "WHERE id = ?",
                (len(turns), turns[-1].created_at, session_id),
            )
    return ids


def insert_raw_message(
    target: Target,
    session_id: int,
    role: str,
    content: str,
    created_at: str,
    tool_calls: str | None = None,
) -> int:
    """A message row written by plain SQL, cells exactly as given (what another program
    may leave: text that is not JSON, a role of its own); `message_count` follows."""
    with plain(target) as conn, conn.transaction():
        rows = conn.all(
            "INSERT INTO messages (session_id, role, content, tool_calls, created_at) "
            "VALUES (?, ?, ?, ?, ?) RETURNING id",
            (session_id, role, content, tool_calls, created_at),
        )
        conn.all(
            "UPDATE sessions SET message_count = message_count + 1 WHERE id = ?", (session_id,)
        )
    return int(rows[0][0])


# --- looking at the cells -------------------------------------------------------------------


def raw_rows(target: Target, table: str, columns: Sequence[str]) -> list[tuple[Any, ...]]:
    """The cells of `columns` in every row of `table`, in id (or version) order, exactly
    as stored."""
    order = "version" if table == "schema_version" else "id"
    with plain(target) as conn:
        return conn.all(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")


def column_names(target: Target, table: str) -> list[str]:
    """The columns `table` has, in order."""
    with plain(target) as conn:
        if conn.postgres:
            rows = conn.all(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = ? "
                "ORDER BY ordinal_position",
                (table,),
            )
        else:
            rows = [(row[1],) for row in conn.all(f"PRAGMA table_info({table})")]
    return [name for (name,) in rows]
