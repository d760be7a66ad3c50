"""`copy_database`: move every session and message from one store into another (SQLite to
PostgreSQL is the case that matters), ids, timestamps, metadata and tool calls included;
and `same_store`, which tells whether two engines reach one database."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, TableClause, column, func, select, table
from sqlmodel import SQLModel

from aisopod_session.errors import SessionStoreError, translated_errors
from aisopod_session.migrations import SCHEMA_VERSION, current_version
from aisopod_session.models import Message, Session
from aisopod_session.transactions import BEGIN_MODE_OPTION, write_transaction
from aisopod_session.validation import escaped_nul

Progress = Callable[[str, int, int], object]
"""`progress(table, copied, total)`, called after each batch written."""


@dataclass(frozen=True)
class CopyResult:
    """How many rows `copy_database` copied."""

    sessions: int
    messages: int


def _plain(model: type[Session] | type[Message]) -> TableClause:
    """The model's table with untyped columns: values are copied as stored, byte for
    byte, whatever a row holds (no JSON or time conversion on the way)."""
    columns = SQLModel.metadata.tables[str(model.__tablename__)].columns
    return table(str(model.__tablename__), *(column(c.name) for c in columns))


SESSIONS = _plain(Session)
MESSAGES = _plain(Message)


def copy_database(
    source: Engine,
    target: Engine,
    *,
    batch_size: int = 1000,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> CopyResult:
    """Copy every session, then every message, from `source` into `target`, keeping ids
    and every stored value exactly; then set the target's id sequences past the
    source's (so no id the source ever gave is given again).

    All or nothing: the source is read in one snapshot and the target written in one
    write transaction, so if anything fails the target is left exactly as it was.
    Both stores must be at this code's schema version (open them with `open_database`),
    and must be two stores: `source` and `target` reaching the same database (the same
    file by any path, URL or link; the same PostgreSQL database and schema) raise
    `SessionStoreError`. A target that already holds sessions is refused
    (`SessionStoreError`) unless `overwrite=True`, which deletes everything in it first
    (in the same transaction). A value PostgreSQL cannot store (a NUL character, which
    SQLite keeps) is refused naming its table, row id and column, before the copy
    commits anything. Rows are read in id order and written in batches of `batch_size`,
    in constant memory; `progress(table, copied, total)` is called after each batch. The
    source is only read.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if same_store(source, target):
        raise SessionStoreError(
            "copy_database: the source and the target are the same store "
            f"({_shown(source)}); copying a store onto itself would empty it"
        )
    for name, engine in (("source", source), ("target", target)):
        version = current_version(engine)
        if version != SCHEMA_VERSION:
            raise SessionStoreError(
                f"the {name} is at schema version {version}, not {SCHEMA_VERSION}: open it "
                "with open_database (which migrates it) before copying"
            )
    no_nul = target.dialect.name == "postgresql"  # nor counters past 32 bits
    with (
        translated_errors("copy_database"),
        _snapshot(source) as read,
        write_transaction(target) as write,
    ):
        present = write.execute(select(func.count()).select_from(SESSIONS)).scalar_one()
        if present and not overwrite:
            raise SessionStoreError(
                f"the target already holds {present} session(s): pass overwrite=True "
                "to replace them"
            )
        if present:
            write.execute(MESSAGES.delete())
            write.execute(SESSIONS.delete())
        copied = {
            plain.name: _copy_table(read, write, plain, batch_size, no_nul, progress)
            for plain in (SESSIONS, MESSAGES)
        }
        for plain in (SESSIONS, MESSAGES):
            set_high_water(write, plain, high_water(read, plain))
    return CopyResult(sessions=copied["sessions"], messages=copied["messages"])


class _snapshot:  # noqa: N801 - used like a function: `with _snapshot(engine) as conn`
    """A read transaction seeing one snapshot of the whole store: SQLite's deferred
    transaction; PostgreSQL's repeatable read."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Connection | None = None

    def __enter__(self) -> Connection:
        conn = self._engine.connect()
        conn = conn.execution_options(**{BEGIN_MODE_OPTION: "DEFERRED"})
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        conn.begin()
        self._conn = conn
        return conn

    def __exit__(self, *exc: object) -> None:
        assert self._conn is not None
        self._conn.rollback()  # it only read
        self._conn.close()


def _copy_table(
    read: Connection,
    write: Connection,
    plain: TableClause,
    batch_size: int,
    no_nul: bool,
    progress: Progress | None,
) -> int:
    total = int(read.execute(select(func.count()).select_from(plain)).scalar_one())
    names = [c.name for c in plain.columns]
    copied, last = 0, None
    while True:
        # Keyset pages in id order: each page is one short read, whatever the table's size.
        query = select(plain).order_by(plain.c.id).limit(batch_size)
        if last is not None:
            query = query.where(plain.c.id > last)
        rows = [dict(zip(names, row, strict=True)) for row in read.execute(query)]
        if not rows:
            return copied
        if no_nul:
            _refuse_unstorable(plain.name, rows)
        write.execute(plain.insert(), rows)
        copied += len(rows)
        last = rows[-1]["id"]
        if progress is not None:
            progress(plain.name, copied, total)


# The messages' JSON columns, in which the store keeps no NUL on PostgreSQL (the same rule
# as `SessionRepository`'s: `content::jsonb` must work there).
_JSON_COLUMNS = {"messages": ("content", "tool_calls", "metadata")}

# PostgreSQL's INTEGER columns (the seed's, kept as they are); SQLite's hold 64 bits.
_POSTGRESQL_INTEGERS = {"message_count", "compaction_count"}
_MAX_INTEGER = 2**31 - 1


def _refuse_unstorable(table_name: str, rows: list[dict[str, Any]]) -> None:
    """`SessionStoreError` naming the first value of `rows` PostgreSQL cannot store."""
    for row in rows:
        for name, value in row.items():
            if isinstance(value, str) and "\x00" in value:
                reason = "holds a NUL character, which PostgreSQL cannot store (SQLite can)"
            elif name in _JSON_COLUMNS.get(table_name, ()) and escaped_nul(str(value)):
                reason = (
                    "holds a NUL character inside its JSON (\\u0000), which the store "
                    "refuses on PostgreSQL (its jsonb cannot hold it)"
                )
            elif name in _POSTGRESQL_INTEGERS and isinstance(value, int) and value > _MAX_INTEGER:
                reason = f"holds {value}, more than PostgreSQL's INTEGER column takes"
            else:
                continue
            raise SessionStoreError(
                f"copy_database: {table_name} row {row['id']}, column {name} {reason}; "
                "nothing was copied: change or delete that row in the source first"
            )


def high_water(conn: Connection, plain: TableClause) -> int:
    """The highest id the store ever gave in `plain`'s table (deleted rows included,
    where the store remembers it)."""
    highest = int(conn.execute(select(func.coalesce(func.max(plain.c.id), 0))).scalar_one())
    if conn.dialect.name == "sqlite":
        row = conn.exec_driver_sql(
            "SELECT seq FROM sqlite_sequence WHERE name = ?", (plain.name,)
        ).first()
        return max(highest, int(row[0]) if row else 0)
    row = conn.exec_driver_sql(
        f"SELECT last_value, is_called FROM {_sequence(conn, plain)}"
    ).first()
    return max(highest, int(row[0]) if row and row[1] else 0)


def set_high_water(conn: Connection, plain: TableClause, mark: int) -> None:
    """Make the next id `plain`'s table gives at least `mark + 1`."""
    if mark < 1:
        return
    if conn.dialect.name == "sqlite":
        updated = conn.exec_driver_sql(
            "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (mark, plain.name)
        )
        if updated.rowcount == 0:
            conn.exec_driver_sql(
                "INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (plain.name, mark)
            )
        return
    sequence = _sequence(conn, plain)
    # setval only forwards: an id the sequence already gave is never given again.
    conn.exec_driver_sql(
        f"SELECT setval('{sequence}', greatest(%s, (SELECT last_value FROM {sequence})), true)",
        (mark,),
    )


def _sequence(conn: Connection, plain: TableClause) -> str:
    name = conn.exec_driver_sql(
        "SELECT pg_get_serial_sequence(%s, 'id')", (plain.name,)
    ).scalar_one()
    return str(name)


# --- which database an engine reaches -----------------------------------------------------


def same_store(first: Engine, second: Engine) -> bool:
    """Whether two engines reach the same database: for SQLite the same file, whatever
    path, URL or symbolic link names it (or the same engine for `:memory:`); for
    PostgreSQL the same server, database and current schema, asked of the servers
    themselves (so a PgBouncer URL and a direct one of the same database match)."""
    if first is second or first.pool is second.pool:
        return True
    backend = first.dialect.name
    if backend != second.dialect.name:
        return False
    if backend == "sqlite":
        paths = [_sqlite_file(engine) for engine in (first, second)]
        if paths[0] is None or paths[1] is None:
            return False
        try:
            return os.path.samefile(paths[0], paths[1])
        except OSError:
            return os.path.realpath(paths[0]) == os.path.realpath(paths[1])
    with translated_errors("same_store"):
        return _server_identity(first) == _server_identity(second)


def _sqlite_file(engine: Engine) -> str | None:
    database = engine.url.database
    if database in (None, "", ":memory:") or str(database).startswith("file:"):
        return None
    return str(database)


def _server_identity(engine: Engine) -> tuple[Any, ...]:
    """What tells one server's schema from every other's, asked of the server: its start
    time and configured port name the server instance (the client's address, port or
    socket, which a pooler or a Unix socket changes, do not), then the database and the
    schema."""
    with engine.connect() as conn:
        row = conn.exec_driver_sql(
            "SELECT pg_postmaster_start_time(), current_setting('port'), "
            "current_database(), current_schema()"
        ).one()
    return tuple(row)


def _shown(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
