"""How the store's SQLite connections are set up, and how its two kinds of transaction
begin.

pysqlite's own transaction handling begins lazily and *deferred*: a transaction that
reads and then writes fails at once with "database is locked" if another connection
wrote in between, and `busy_timeout` cannot help, because SQLite will not upgrade a
stale read snapshot to a write. It also runs DDL outside any transaction. So
`prepare_engine` turns pysqlite's handling off and the `begin` listener decides what to
emit: writes take the write lock up front with `BEGIN IMMEDIATE` (waiting up to
`busy_timeout` for it), reads use a deferred `BEGIN`, which in WAL mode never waits for
writers.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from sqlalchemy import Connection, Engine, event
from sqlalchemy.pool import ConnectionPoolEntry

DEFAULT_BUSY_TIMEOUT = 5.0
"""Seconds a writer waits for another writer's lock before `DatabaseBusyError`."""

BEGIN_MODE_OPTION = "aisopod_begin_mode"
"""Execution option read by the `begin` listener; absent means `IMMEDIATE`."""

BeginMode = Literal["IMMEDIATE", "DEFERRED"]
Synchronous = Literal["NORMAL", "FULL"]

_PREPARED = "aisopod_prepared"


def prepare_engine(
    engine: Engine,
    *,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    synchronous: Synchronous = "NORMAL",
) -> None:
    """Make a SQLite engine's transactions atomic and its connections safe to share.

    Every connection, on its next check-out from the pool (so also connections that
    existed before), gets pysqlite's implicit transactions turned off, `foreign_keys=ON`,
    `busy_timeout` and `synchronous`; every transaction then begins as described in the
    module docstring. Idempotent: an engine already prepared keeps its settings. Engines
    of other databases are left alone.
    """
    if engine.dialect.name != "sqlite" or event.contains(engine, "begin", begin_listener):
        return
    statements = (
        "PRAGMA foreign_keys = ON",
        f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}",
        f"PRAGMA synchronous = {synchronous}",
    )

    def on_checkout(
        dbapi_connection: sqlite3.Connection, entry: ConnectionPoolEntry, _proxy: Any
    ) -> None:
        if entry.info.get(_PREPARED):
            return
        # No transaction is open on a checked-in connection, so foreign_keys (ignored
        # inside a transaction) takes effect, and turning implicit transactions off
        # commits nothing by surprise.
        dbapi_connection.isolation_level = None
        for statement in statements:
            dbapi_connection.execute(statement)
        entry.info[_PREPARED] = True

    event.listen(engine, "checkout", on_checkout)
    event.listen(engine, "begin", begin_listener)


def begin_listener(conn: Connection) -> None:
    """The `begin` listener that `prepare_engine` installs."""
    mode = conn.get_execution_options().get(BEGIN_MODE_OPTION, "IMMEDIATE")
    driver = conn.connection.driver_connection
    assert driver is not None
    # Straight to the driver: BEGIN needs no parameters, compilation or result handling.
    driver.execute("BEGIN" if mode == "DEFERRED" else "BEGIN IMMEDIATE")


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
