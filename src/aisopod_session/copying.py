"""`copy_database`: move every session and message from one store into another (SQLite to
PostgreSQL is the case that matters), ids, timestamps, metadata and tool calls included."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, Table, delete, func, insert, select
from sqlmodel import SQLModel

from aisopod_session.errors import SessionStoreError, translated_errors
from aisopod_session.migrations import SCHEMA_VERSION, current_version
from aisopod_session.models import Message, Session
from aisopod_session.transactions import read_transaction, write_transaction

Progress = Callable[[str, int, int], object]
"""`progress(table, copied, total)`, called after each committed batch."""


@dataclass(frozen=True)
class CopyResult:
    """How many rows `copy_database` copied."""

    sessions: int
    messages: int


def copy_database(
    source: Engine,
    target: Engine,
    *,
    batch_size: int = 1000,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> CopyResult:
    """Copy every session, then every message, from `source` into `target`, keeping ids,
    timestamps, metadata and tool calls exactly; then set the target's id sequences past
    the source's (so no id the source ever gave is given again).

    Both stores must be at this code's schema version (open them with `open_database`).
    A target that already holds sessions is refused (`SessionStoreError`) unless
    `overwrite=True`, which first deletes everything in it. Rows are read in id order and
    written in batches of `batch_size`, each batch one transaction on the target, in
    constant memory; `progress(table, copied, total)` is called after each batch. The
    source is only read. If the copy fails half-way, the target holds a prefix of the
    source: run it again with `overwrite=True`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    for name, engine in (("source", source), ("target", target)):
        version = current_version(engine)
        if version != SCHEMA_VERSION:
            raise SessionStoreError(
                f"the {name} is at schema version {version}, not {SCHEMA_VERSION}: open it "
                "with open_database (which migrates it) before copying"
            )
    sessions = SQLModel.metadata.tables[Session.__tablename__]
    messages = SQLModel.metadata.tables[Message.__tablename__]
    with translated_errors("copy_database"):
        with write_transaction(target) as conn:
            present = conn.execute(select(func.count()).select_from(sessions)).scalar_one()
            if present and not overwrite:
                raise SessionStoreError(
                    f"the target already holds {present} session(s): pass overwrite=True "
                    "to replace them"
                )
            if present:
                conn.execute(delete(messages))
                conn.execute(delete(sessions))
        copied = {
            table.name: _copy_table(source, target, table, batch_size, progress)
            for table in (sessions, messages)
        }
        with write_transaction(target) as conn:
            for table in (sessions, messages):
                with read_transaction(source) as read:
                    mark = high_water(read, table)
                set_high_water(conn, table, mark)
    return CopyResult(sessions=copied["sessions"], messages=copied["messages"])


def _copy_table(
    source: Engine, target: Engine, table: Table, batch_size: int, progress: Progress | None
) -> int:
    with read_transaction(source) as conn:
        total = int(conn.execute(select(func.count()).select_from(table)).scalar_one())
    copied, last = 0, None
    while True:
        # Keyset pages in id order: each page is one short read, whatever the table's size.
        query = select(table).order_by(table.c.id).limit(batch_size)
        if last is not None:
            query = query.where(table.c.id > last)
        with read_transaction(source) as conn:
            rows = [dict(row._mapping) for row in conn.execute(query)]
        if not rows:
            return copied
        with write_transaction(target) as conn:
            conn.execute(insert(table), rows)
        copied += len(rows)
        last = rows[-1]["id"]
        if progress is not None:
            progress(table.name, copied, total)


def high_water(conn: Connection, table: Table) -> int:
    """The highest id the store ever gave in `table` (deleted rows included, where the
    store remembers it)."""
    highest = int(conn.execute(select(func.coalesce(func.max(table.c.id), 0))).scalar_one())
    if conn.dialect.name == "sqlite":
        row = conn.exec_driver_sql(
            "SELECT seq FROM sqlite_sequence WHERE name = ?", (table.name,)
        ).first()
        return max(highest, int(row[0]) if row else 0)
    row = conn.exec_driver_sql(
        f"SELECT last_value, is_called FROM {_sequence(conn, table)}"
    ).first()
    return max(highest, int(row[0]) if row and row[1] else 0)


def set_high_water(conn: Connection, table: Table, mark: int) -> None:
    """Make the next id `table` gives at least `mark + 1`."""
    if mark < 1:
        return
    if conn.dialect.name == "sqlite":
        updated = conn.exec_driver_sql(
            "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (mark, table.name)
        )
        if updated.rowcount == 0:
            conn.exec_driver_sql(
                "INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table.name, mark)
            )
        return
    conn.exec_driver_sql(f"SELECT setval('{_sequence(conn, table)}', %s, true)", (mark,))


def _sequence(conn: Connection, table: Table) -> str:
    name = conn.exec_driver_sql(
        "SELECT pg_get_serial_sequence(%s, 'id')", (table.name,)
    ).scalar_one()
    return str(name)
