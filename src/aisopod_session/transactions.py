"""How the store's engines are set up: SQLite's per-connection pragmas, the two kinds of
transaction and how each begins, and the store-wide settings an engine carries.

pysqlite's own transaction handling begins lazily and *deferred*: a transaction that
reads and then writes fails at once with "database is locked" if another connection
wrote in between, and `busy_timeout` cannot help, because SQLite will not upgrade a
stale read snapshot to a write. It also runs DDL outside any transaction. So
`prepare_engine` turns pysqlite's handling off and the `begin` listener decides what to
emit: a plain `BEGIN` (deferred) by default, so that the application's own reads on the
engine never take the write lock, and `BEGIN IMMEDIATE` for the store's writes
(`write_transaction`, and every engine made by `write_engine`), which take the write lock
up front, waiting up to `busy_timeout` for it. In WAL mode a deferred reader never waits
for a writer.

The repository's own calls do not go through SQLAlchemy's execution layer: see
`connections.py`.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from sqlalchemy import Connection, Engine, event
from sqlalchemy.pool import ConnectionPoolEntry

from aisopod_session import connections
from aisopod_session.errors import DatabaseBusyError, SessionStoreError, is_busy
from aisopod_session.settings import DEFAULT_BUSY_TIMEOUT, busy_timeout_of, lock_timeout_ms

MAX_BUSY_TIMEOUT = 2_147_483.0
"""The longest `busy_timeout` in seconds: SQLite counts it in milliseconds in a signed
32-bit integer (about 24.8 days); a longer one would wrap around to no wait at all."""

BEGIN_MODE_OPTION = "aisopod_begin_mode"
"""Execution option read by the `begin` listener: `"IMMEDIATE"` or `"DEFERRED"` (the
default when absent)."""

BeginMode = Literal["IMMEDIATE", "DEFERRED"]
Synchronous = Literal["NORMAL", "FULL"]

_PREPARED = "aisopod_prepared"


def check_busy_timeout(busy_timeout: Any) -> float:
    """`busy_timeout` if it is a number of seconds the databases can honour, else
    `ValueError` naming it."""
    if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int | float):
        raise ValueError(f"busy_timeout: must be a number of seconds, got {busy_timeout!r}")
    if not (math.isfinite(busy_timeout) and 0 <= busy_timeout <= MAX_BUSY_TIMEOUT):
        raise ValueError(
            f"busy_timeout: must be between 0 and {MAX_BUSY_TIMEOUT:.0f} seconds, "
            f"got {busy_timeout!r}"
        )
    return float(busy_timeout)


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
    module docstring. The engine is also registered for `fork` safety (see
    `connections.py`). Idempotent: an engine already prepared keeps its settings. Engines
    of other databases are only registered.
    """
    busy_timeout = check_busy_timeout(busy_timeout)
    connections.register(engine)
    if engine.dialect.name != "sqlite" or event.contains(engine, "begin", begin_listener):
        return
    statements = (
        "PRAGMA foreign_keys = ON",
        f"PRAGMA busy_timeout = {round(busy_timeout * 1000)}",
        f"PRAGMA synchronous = {synchronous}",
    )

    def on_checkout(dbapi_connection: Any, entry: ConnectionPoolEntry, _proxy: Any) -> None:
        # `dbapi_connection` is sqlite3's connection, or on an asyncio engine SQLAlchemy's
        # adapter of aiosqlite's (same calls, each awaited through the greenlet bridge).
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
    mode = conn.get_execution_options().get(BEGIN_MODE_OPTION, "DEFERRED")
    # Straight to the DBAPI connection: BEGIN needs no parameters, compilation or result
    # handling. (On an asyncio engine this is SQLAlchemy's adapter of aiosqlite's.)
    conn.connection.dbapi_connection.execute(  # type: ignore[union-attr]
        "BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN"
    )


def write_engine(engine: Engine) -> Engine:
    """The same engine (same pool, connections and settings) with every transaction
    beginning `IMMEDIATE` on SQLite: bind an ORM `Session` to it for the application's
    own read-then-write work, so the write lock is held from the first read and the
    write cannot fail on a stale snapshot. (On PostgreSQL it behaves like `engine`;
    lock the rows you will change with `SELECT … FOR UPDATE` there.)"""
    return engine.execution_options(**{BEGIN_MODE_OPTION: "IMMEDIATE"})


@contextmanager
def write_transaction(engine: Engine, *, bounded: bool = True) -> Iterator[Connection]:
    """A transaction that holds the write lock from its first statement; it commits when
    the block ends and rolls back everything if the block raises. On PostgreSQL a wait
    for a row lock lasts at most the store's `busy_timeout` (`DatabaseBusyError`), unless
    `bounded` is False (the migrator, which waits for another host's migration)."""
    with _transaction(engine, "IMMEDIATE") as conn:
        if bounded and conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {lock_timeout_ms(engine)}")
        yield conn


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A read transaction seeing one consistent snapshot of the whole store across its
    statements: SQLite's deferred transaction (no write lock, never blocked by a writer
    in WAL mode); on PostgreSQL, REPEATABLE READ (READ COMMITTED, the server's default,
    would give each statement its own snapshot)."""
    with _transaction(engine, "DEFERRED") as conn:
        yield conn


@contextmanager
def _transaction(engine: Engine, mode: BeginMode) -> Iterator[Connection]:
    with engine.connect() as conn:
        conn.execution_options(**{BEGIN_MODE_OPTION: mode})
        if mode == "DEFERRED" and conn.dialect.name == "postgresql":
            # Set on the connection for this check-out only: the pool resets it on return.
            conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def enable_wal(engine: Engine, *, busy_timeout: float | None = None) -> None:
    """Put a SQLite file in WAL mode (stored in the file: once is enough), waiting up to
    `busy_timeout` (the store's, if not given) for the file to itself; nothing for
    PostgreSQL or an in-memory database. `DatabaseBusyError` past the timeout."""
    if engine.url.get_backend_name() != "sqlite":
        return
    if busy_timeout is None:
        busy_timeout = busy_timeout_of(engine)
    # journal_mode is stored in the file and cannot change inside a transaction, so it is
    # set here, on a connection with no transaction open. Changing it needs the file to
    # itself, and SQLite answers "locked" at once instead of calling the busy handler, so
    # processes opening a fresh file together retry here within their busy timeout.
    deadline = time.monotonic() + busy_timeout
    pause = 0.001
    with engine.connect() as conn:
        driver = conn.connection.dbapi_connection
        assert driver is not None
        while True:
            try:
                mode = _pragma(driver, "PRAGMA journal_mode")
                if str(mode).lower() == "memory":
                    return  # an in-memory database, `:memory:` or `file:…?mode=memory`
                if str(mode).lower() != "wal":
                    mode = _pragma(driver, "PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise DatabaseBusyError(
                        f"could not switch the database to WAL mode within the busy timeout "
                        f"({busy_timeout} s): another connection kept it locked ({exc})"
                    ) from exc
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
                continue
            if str(mode).lower() != "wal":
                raise SessionStoreError(
                    f"could not put the database in WAL mode (journal_mode stays {mode!r})"
                )
            return


def _pragma(driver: Any, sql: str) -> Any:
    """The one value a PRAGMA returns, through a DB-API cursor: the one interface both
    sqlite3 and SQLAlchemy's aiosqlite adapter (2.0's as 2.1's) give alike."""
    cursor = driver.cursor()
    try:
        cursor.execute(sql)
        row = cursor.fetchone()
    finally:
        cursor.close()
    return None if row is None else row[0]
