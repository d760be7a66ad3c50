"""The floor: plain `sqlite3` doing what our repository does, and nothing else.

It runs the very SQL text the repository runs (imported from `aisopod_session.statements`,
so the two cannot drift apart), with the same pragmas (`foreign_keys=ON`,
`busy_timeout=5000`, `synchronous=NORMAL`, WAL) and the same transaction mode
(`BEGIN IMMEDIATE` around every write, reads as single statements; an append also reads
the newest message's time, as the store's clock does), on one connection kept open. It
encodes and decodes the same values our API takes and returns (content, tool calls and
metadata as JSON text, aware `datetime`s) but as plain tuples, and skips validation, key
handling and model objects: about the least a Python store on `sqlite3` can spend on the same work.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aisopod_session.clock import SELECT_LATEST
from aisopod_session.statements import (
    COUNT_APPEND,
    KEY,
    SELECT_SESSION,
    history,
    insert_messages,
    list_sessions,
)

_MAX = 2**63 - 1  # the counters' room is checked in COUNT_APPEND

# (role, content, tool_calls) of one message to append
MessageSpec = tuple[str, Any, Any]

NEWEST = history(newest_first=True, limit=True, after=False, before=False).sqlite
LIST_FOR_AGENT = list_sessions(("agent_id",), count=False).sqlite
# The floor binds tuples in these orders, as the repository does for its fixed statements.
if NEWEST.names != (*KEY, "limit", "offset") or LIST_FOR_AGENT.names != (
    "agent_id",
    "limit",
    "offset",
):
    raise RuntimeError("the history or list statement's parameters changed order")


def connect(path: Path) -> sqlite3.Connection:
    """A connection set up as `open_database` sets up each of its connections."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA synchronous = NORMAL")
    (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
    if str(mode).lower() != "wal":
        raise RuntimeError(f"{path}: expected WAL mode, found {mode!r}")
    return conn


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def json_or_none(value: Any) -> str | None:
    return None if value is None else dumps(value)


def append(
    conn: sqlite3.Connection, key: tuple[str, ...], batch: Sequence[MessageSpec], tokens: int
) -> list[tuple[Any, ...]]:
    """`append_messages`: counters and rows in one `BEGIN IMMEDIATE` transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        now = datetime.now(UTC)
        now_text = now.isoformat(timespec="microseconds")
        # The store's clock never goes back past the newest message (clock.py).
        latest = conn.execute(SELECT_LATEST).fetchone()
        if latest is not None and latest[0] > now_text:
            now = datetime.fromisoformat(latest[0])
            now_text = latest[0]
        found = conn.execute(
            COUNT_APPEND.sqlite.text,
            (
                now_text,
                len(batch),
                tokens,
                0,
                0,
                *key,
                _MAX - len(batch),
                _MAX - tokens,
                _MAX,
                _MAX,
            ),
        ).fetchone()
        if found is None:
            raise LookupError("no session")
        session_id = found[0]
        values: list[Any] = []
        for role, content, tool_calls in batch:
            values += (session_id, role, dumps(content), json_or_none(tool_calls), now_text, "{}")
        ids = sorted(r[0] for r in conn.execute(insert_messages(len(batch)).sqlite.text, values))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return [
        (message_id, session_id, role, content, tool_calls, now, {})
        for message_id, (role, content, tool_calls) in zip(ids, batch, strict=True)
    ]


def read_newest(
    conn: sqlite3.Connection, key: tuple[str, ...], limit: int
) -> list[tuple[Any, ...]]:
    """`get_history(key, limit=limit)`: one statement, rows decoded, oldest first."""
    rows = conn.execute(NEWEST.text, (*key, limit, 0)).fetchall()
    return decode_newest(rows)


def decode_newest(rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """The rows of `history(newest_first=True, …)` as message tuples, oldest first;
    `LookupError` if there are none (no session)."""
    if not rows:
        raise LookupError("no session")
    messages = [
        (
            message_id,
            session_id,
            role,
            json.loads(content),
            None if tool_calls is None else json.loads(tool_calls),
            datetime.fromisoformat(created_at),
            json.loads(metadata),
        )
        for _, message_id, session_id, role, content, tool_calls, created_at, metadata in rows
        if message_id is not None
    ]
    messages.reverse()
    return messages


def decode_session(row: Sequence[Any]) -> tuple[Any, ...]:
    values = list(row)
    values[6] = datetime.fromisoformat(values[6])
    values[7] = datetime.fromisoformat(values[7])
    values[10] = json.loads(values[10])
    if values[13] is not None:  # last_compacted_at
        values[13] = datetime.fromisoformat(values[13])
    return tuple(values)


def get_session(conn: sqlite3.Connection, key: tuple[str, ...]) -> tuple[Any, ...]:
    """`get_or_create` of an existing key: the one `SELECT`, decoded."""
    row = conn.execute(SELECT_SESSION.sqlite.text, key).fetchone()
    if row is None:
        raise LookupError("no session")
    return decode_session(row)


def list_for_agent(conn: sqlite3.Connection, agent: str, limit: int) -> list[tuple[Any, ...]]:
    """`list_sessions({"agent_id": agent}, limit=limit)`, decoded."""
    rows = conn.execute(LIST_FOR_AGENT.text, (agent, limit, 0))
    return [decode_session(row) for row in rows]
