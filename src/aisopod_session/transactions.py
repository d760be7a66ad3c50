"""The two kinds of transaction the store runs, and how each begins on SQLite.

pysqlite's own transaction handling begins lazily and *deferred*: a transaction that
reads and then writes fails at once with "database is locked" if another connection
wrote in between, and `busy_timeout` cannot help, because SQLite will not upgrade a
stale read snapshot to a write. So `database.py` turns pysqlite's handling off and this
module's `begin` mode decides what to emit: writes take the write lock up front with
`BEGIN IMMEDIATE` (waiting up to `busy_timeout` for it), reads use a deferred `BEGIN`,
which in WAL mode never waits for writers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from sqlalchemy import Connection, Engine, event

from aisopod_session.errors import SessionStoreError

BEGIN_MODE_OPTION = "aisopod_begin_mode"
"""Execution option read by the `begin` listener; absent means `IMMEDIATE`."""

BeginMode = Literal["IMMEDIATE", "DEFERRED"]


def begin_listener(conn: Connection) -> None:
    """The engine's `begin` listener (installed by `open_database` on SQLite engines)."""
    mode = conn.get_execution_options().get(BEGIN_MODE_OPTION, "IMMEDIATE")
    driver = conn.connection.driver_connection
    assert driver is not None
    # Straight to the driver: BEGIN needs no parameters, compilation or result handling.
    driver.execute("BEGIN" if mode == "DEFERRED" else "BEGIN IMMEDIATE")


def require_store_engine(engine: Engine) -> None:
    """Refuse a SQLite engine that `open_database` did not set up.

    On such an engine pysqlite would run DDL outside any transaction and begin writes
    deferred, so neither migrations nor repository calls could be atomic.
    """
    if engine.dialect.name == "sqlite" and not event.contains(engine, "begin", begin_listener):
        raise SessionStoreError(
            "this SQLite engine was not created by aisopod_session.open_database(); "
            "open the database with it so that transactions are atomic"
        )


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the write lock from its first statement; it commits when
    the block ends and rolls back everything if the block raises."""
    with _transaction(engine, "IMMEDIATE") as conn:
        yield conn


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction: one consistent snapshot, no write lock, never blocked by a
    writer in WAL mode."""
    with _transaction(engine, "DEFERRED") as conn:
        yield conn


@contextmanager
def _transaction(engine: Engine, mode: BeginMode) -> Iterator[Connection]:
    with engine.connect() as conn:
        conn.execution_options(**{BEGIN_MODE_OPTION: mode})
        with conn.begin():
            yield conn
