"""The PostgreSQL floor: plain psycopg 3 doing what our repository does on PostgreSQL, and
nothing else.

It runs the very SQL text the repository runs there (imported from
`aisopod_session.statements` and compiled for the PostgreSQL dialect, `%s` parameters,
so the two cannot drift apart), every hot statement prepared on the server
(`prepare=True`), on one connection kept open in autocommit mode, in the repository's
transaction shapes (`SessionRepository` on PostgreSQL, on the server's clock):

- an append is one statement (`append_in_one`: the session's row lock, the server's
  time after it, the counters and the rows) in a write transaction: `BEGIN ISOLATION
  LEVEL READ COMMITTED; SET LOCAL lock_timeout = …` (one round trip), the statement,
  `COMMIT`;
- `get_or_create` of an existing key is the one `SELECT` (`get_session`);
- a read is one statement, outside any transaction.

It encodes and decodes the same values our API takes and returns (JSON text, aware
`datetime`s) as plain tuples, and skips validation, key handling, the pool and model
objects. Each operation is a small function of its own: when the repository's
statements change (fewer round trips per write), these are the functions to change with
them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import Dialect, make_url

from aisopod_session.settings import DEFAULT_BUSY_TIMEOUT
from aisopod_session.statements import (
    KEY,
    SELECT_SESSION,
    append_in_one,
    history,
    list_sessions,
)
from benchmarks.floor import MessageSpec, decode_newest, decode_session, dumps, json_or_none

POSTGRESQL: Dialect = PGDialect_psycopg()  # type: ignore[no-untyped-call]
"""The dialect `Query.on` compiles for (it picks `%s` parameters itself)."""

_MAX = 2**63 - 1
_MAX_MESSAGE_COUNT = 2**31 - 1  # PostgreSQL's message_count is an INTEGER


BEGIN_WRITE = (
    "BEGIN ISOLATION LEVEL READ COMMITTED; "
    f"SET LOCAL lock_timeout = {max(1, round(DEFAULT_BUSY_TIMEOUT * 1000))}"
)
"""What the repository's write transactions begin with on PostgreSQL
(`connections.server_begin`, `busy_timeout` of `open_database`'s default)."""

SELECT = SELECT_SESSION.on(POSTGRESQL)
NEWEST = history(newest_first=True, limit=True, after=False, before=False).on(POSTGRESQL)
LIST_FOR_AGENT = list_sessions(("agent_id",), count=False).on(POSTGRESQL)
# The floor binds tuples in these orders, as the repository does for its fixed statements.
if SELECT.names != KEY or LIST_FOR_AGENT.names != ("agent_id", "limit", "offset"):
    raise RuntimeError("a statement's parameters changed order: update floor_postgresql.py")


def conninfo(url: str) -> str:
    """A libpq URL for psycopg from a SQLAlchemy one (`postgresql+psycopg://…` or
    `postgresql://…`), its query (`options=-csearch_path=…`) kept."""
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def connect(url: str) -> psycopg.Connection[Any]:
    """One connection, in autocommit as the repository's are (no implicit `BEGIN`: a
    single read is one round trip). Every call below says whether its statement is
    prepared (`prepare=True` prepares it on first use); the threshold is psycopg's
    default, since `None` would turn preparing off even where a call asks for it."""
    return psycopg.connect(conninfo(url), autocommit=True)


# --- writes ---------------------------------------------------------------------------


@contextmanager
def _write(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """The repository's write transaction: `BEGIN_WRITE` (not prepared: two statements in
    one text), the block, `COMMIT`; `ROLLBACK` if the block raised."""
    conn.execute(BEGIN_WRITE, prepare=False)
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK", prepare=False)
        raise
    conn.execute("COMMIT", prepare=False)


def append(
    conn: psycopg.Connection[Any], key: tuple[str, ...], batch: Sequence[MessageSpec], tokens: int
) -> list[tuple[Any, ...]]:
    """`append_messages`: `append_in_one(len(batch))`, the repository's one statement,
    in its write transaction; the messages as tuples."""
    added = len(batch)
    values: list[Any] = [
        *key,
        added,
        tokens,
        0,
        0,
        _MAX_MESSAGE_COUNT - added,
        _MAX - tokens,
        _MAX,
        _MAX,
    ]
    for role, content, tool_calls in batch:
        values += (role, dumps(content), json_or_none(tool_calls), "{}")
    statement = append_in_one(added).on(POSTGRESQL).text
    with _write(conn):
        found = conn.execute(statement, values, prepare=True).fetchone()
    if found is None:
        raise LookupError("no session, or no room in its counters")
    session_id, now_text, ids = found
    now = datetime.fromisoformat(now_text)
    return [
        (message_id, session_id, role, content, tool_calls, now, {})
        for message_id, (role, content, tool_calls) in zip(ids, batch, strict=True)
    ]


# --- sessions ------------------------------------------------------------------------


def get_session(conn: psycopg.Connection[Any], key: tuple[str, ...]) -> tuple[Any, ...]:
    """`get_or_create` of an existing key: the one `SELECT`, decoded."""
    row = conn.execute(SELECT.text, key, prepare=True).fetchone()
    if row is None:
        raise LookupError("no session")
    return decode_session(row)


def list_for_agent(conn: psycopg.Connection[Any], agent: str, limit: int) -> list[tuple[Any, ...]]:
    """`list_sessions({"agent_id": agent}, limit=limit)`, decoded."""
    rows = conn.execute(LIST_FOR_AGENT.text, (agent, limit, 0), prepare=True)
    return [decode_session(row) for row in rows]


# --- reads ---------------------------------------------------------------------------


def read_newest(
    conn: psycopg.Connection[Any], key: tuple[str, ...], limit: int
) -> list[tuple[Any, ...]]:
    """`get_history(key, limit=limit)`: one statement, rows decoded, oldest first."""
    values = NEWEST.bind({**dict(zip(KEY, key, strict=True)), "limit": limit, "offset": 0})
    return decode_newest(conn.execute(NEWEST.text, values, prepare=True).fetchall())
