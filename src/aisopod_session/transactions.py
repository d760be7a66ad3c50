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

The repository's calls do not go through SQLAlchemy's execution layer at all: they run
precompiled SQL on the driver connection (`driver_transaction`), which costs a fraction
as much per call. Each thread keeps one connection for that between calls (`lease`),
because checking one out of the pool and back costs as much as a whole indexed read.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Literal, TypeVar, cast

from sqlalchemy import Connection, Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import (
    ConnectionPoolEntry,
    PoolProxiedConnection,
    SingletonThreadPool,
    StaticPool,
)
from sqlalchemy.util import await_, greenlet_spawn

from aisopod_session.errors import DRIVER_ERRORS, SessionStoreError, translate

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
    mode = conn.get_execution_options().get(BEGIN_MODE_OPTION, "IMMEDIATE")
    # Straight to the DBAPI connection: BEGIN needs no parameters, compilation or result
    # handling. (On an asyncio engine this is SQLAlchemy's adapter of aiosqlite's.)
    conn.connection.dbapi_connection.execute(  # type: ignore[union-attr]
        "BEGIN" if mode == "DEFERRED" else "BEGIN IMMEDIATE"
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


# --- the repository's connections -------------------------------------------------------


class _Lease:
    """A pooled connection detached from the pool and kept by one thread between calls.

    Detached, it does not count against the pool's size, so any number of threads can
    hold one. It is closed when its thread ends (the thread-local holding it is cleared),
    when the engine is disposed of, or never, in a forked child: a SQLite connection must
    not be used or closed across `fork`, so a child opens its own.
    """

    __slots__ = ("__weakref__", "_proxy", "driver", "pid", "pool")

    def __init__(self, engine: Engine) -> None:
        self.pool = engine.pool
        self.pid = os.getpid()
        self._proxy: PoolProxiedConnection | None = engine.raw_connection()
        try:
            driver = self._proxy.driver_connection  # gone from the proxy once detached
            assert isinstance(driver, sqlite3.Connection)
            self._proxy.detach()
        except BaseException:
            self.close()
            raise
        self.driver: sqlite3.Connection = driver

    def close(self) -> None:
        proxy, self._proxy = self._proxy, None
        if proxy is None:
            return
        if self.pid == os.getpid():
            proxy.close()
        else:
            # Inherited through fork: freeing it would close the parent's SQLite
            # connection from this process, so it is kept, unused, until the process ends.
            _INHERITED.append(proxy)

    def __del__(self) -> None:
        self.close()


_INHERITED: list[PoolProxiedConnection] = []


class _Leases(threading.local):
    lease: _Lease | None = None


_LEASES: weakref.WeakKeyDictionary[Engine, tuple[_Leases, weakref.WeakSet[_Lease]]] = (
    weakref.WeakKeyDictionary()
)
_LEASES_LOCK = threading.Lock()


def lease(engine: Engine) -> sqlite3.Connection:
    """This thread's driver connection to `engine`'s database, set up like every pooled
    one (pragmas, implicit transactions off). No transaction is open on it between calls.

    Not used for pools that hand out fixed connections (`StaticPool`, as
    `open_database` uses for `":memory:"`, and `SingletonThreadPool`): an in-memory
    database lives in its one connection, which must stay the pool's.
    """
    entry = _LEASES.get(engine)
    if entry is not None:
        held = entry[0].lease
        if held is not None and held.pool is engine.pool and held.pid == os.getpid():
            return held.driver
    return _new_lease(engine)


def _new_lease(engine: Engine) -> sqlite3.Connection:
    with _LEASES_LOCK:
        entry = _LEASES.get(engine)
        if entry is None:
            entry = (_Leases(), weakref.WeakSet())
            _LEASES[engine] = entry
            event.listen(engine, "engine_disposed", _close_leases)
    leases, every = entry
    if leases.lease is not None:
        leases.lease.close()  # from a disposed pool, or inherited through fork
    held = _Lease(engine)
    leases.lease = held
    with _LEASES_LOCK:
        every.add(held)
    return held.driver


def _close_leases(engine: Engine) -> None:
    entry = _LEASES.get(engine)
    if entry is not None:
        with _LEASES_LOCK:
            held = list(entry[1])
        for each in held:
            each.close()


class driver_transaction:  # noqa: N801 - used like a function: `with driver_transaction(...)`
    """Run the block in one transaction on a driver connection: on SQLite this thread's
    leased one, on PostgreSQL one checked out of the pool for the block.

    On SQLite `mode` is `"IMMEDIATE"` (the write lock first: every write), `"DEFERRED"`
    (a read snapshot over several statements) or None (a single statement, which SQLite
    runs as its own transaction); PostgreSQL's transaction begins with the first
    statement and commits at the end whatever the mode. The block's driver and SQL
    errors become `SessionStoreError`s naming `action`; any exception rolls everything
    back.
    """

    __slots__ = ("_action", "_begin", "_conn", "_engine", "_server", "_shared")

    def __init__(self, engine: Engine, action: str, mode: BeginMode | None) -> None:
        self._engine = engine
        self._action = action
        self._begin = None if mode is None else _BEGIN[mode]
        self._shared: PoolProxiedConnection | None = None
        self._server = False
        self._conn: Any = None  # the driver's connection: sqlite3's or psycopg's

    def __enter__(self) -> Any:
        try:
            bound = _BOUND.get()
            if bound is not None:
                # An asyncio call (`run_bound`): its connection was checked out for it.
                self._conn = bound
                if isinstance(bound, AwaitedConnection):
                    self._begin = None
                    self._server = True
                    return bound
                if self._begin is not None:
                    bound.execute(self._begin)
                return bound
            if self._engine.dialect.is_async:
                raise SessionStoreError(
                    "this engine is an asyncio one (from open_async_database): use "
                    "AsyncSessionRepository, not SessionRepository, with it"
                )
            if self._engine.dialect.name != "sqlite":
                # PostgreSQL (psycopg): a pooled connection per call, whose transaction
                # begins with the first statement; rows are locked by the statements
                # themselves (UPDATE, SELECT … FOR UPDATE), so no BEGIN mode is needed.
                self._shared = self._engine.raw_connection()
                self._conn = self._shared.driver_connection
                self._begin = None
                self._server = True
                return self._conn
            if isinstance(self._engine.pool, StaticPool | SingletonThreadPool):
                self._shared = self._engine.raw_connection()
                conn = self._shared.driver_connection
                assert isinstance(conn, sqlite3.Connection)
            else:
                conn = lease(self._engine)
            self._conn = conn
            if self._begin is not None:
                conn.execute(self._begin)
        except BaseException as exc:
            self._release()
            translated = translate(exc, self._action)
            if translated is exc:
                raise
            raise translated from exc
        return conn

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        conn = self._conn
        if self._server:
            self._end_server_transaction(error)
            return
        try:
            if error is None and self._begin is not None:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    error = exc
            if error is not None and conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    # A connection that cannot roll back is not reused: SQLite has
                    # rolled back already if it lost the transaction, and closing it
                    # rolls back otherwise.
                    self._discard()
        finally:
            self._release()
        if isinstance(error, sqlite3.Error):
            raise translate(error, self._action) from error

    def _end_server_transaction(self, error: BaseException | None) -> None:
        conn = self._conn
        try:
            if error is None:
                try:
                    conn.commit()
                except DRIVER_ERRORS as exc:
                    error = exc
            if error is not None:
                conn.rollback()
        finally:
            self._release()
        if isinstance(error, DRIVER_ERRORS):
            raise translate(error, self._action) from error

    def _discard(self) -> None:
        if self._shared is None and _BOUND.get() is None:
            entry = _LEASES.get(self._engine)
            if entry is not None and entry[0].lease is not None:
                entry[0].lease.close()
                entry[0].lease = None

    def _release(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.close()


_BEGIN: dict[BeginMode, str] = {"IMMEDIATE": "BEGIN IMMEDIATE", "DEFERRED": "BEGIN"}


# --- the asyncio repository's connections -----------------------------------------------

_BOUND: ContextVar[Any] = ContextVar("aisopod_bound_connection", default=None)
"""The connection every `driver_transaction` uses while `run_bound` runs a call."""

_T = TypeVar("_T")


async def run_bound(engine: AsyncEngine, call: Callable[[], _T]) -> _T:
    """Run `call`, synchronous repository code, for an asyncio caller: its transactions
    use one connection checked out of `engine`'s pool for the call.

    On SQLite (aiosqlite) the whole call runs on the connection's own thread, which
    aiosqlite keeps to run that connection's blocking sqlite3 calls: one trip there and
    back per call, and the write lock is taken and released inside that trip, never held
    while the event loop runs other tasks. On PostgreSQL (psycopg's asyncio connection)
    the call runs on the event loop under SQLAlchemy's greenlet bridge, and each
    statement awaits the server (`AwaitedConnection`). Either way the connection goes
    back to the pool with no transaction open.
    """
    return await greenlet_spawn(_run_checked_out, engine.sync_engine, call)


def _run_checked_out(engine: Engine, call: Callable[[], _T]) -> _T:
    pooled = engine.raw_connection()
    broken: list[bool] = []
    try:
        driver: Any = pooled.driver_connection
        if engine.dialect.name == "sqlite":
            # aiosqlite queues functions for its thread with `_execute`, as its own
            # cursors do; `_conn` is the sqlite3 connection that thread owns. If the
            # caller is cancelled, the call still runs to its end there, and whoever
            # checks the connection out next queues behind it.
            return cast(
                _T, await_(driver._execute(lambda: _call_bound(driver._conn, call, broken)))
            )
        return _call_bound(AwaitedConnection(driver), call, broken)
    finally:
        if broken:
            pooled.invalidate()  # closed, and replaced by a new one at the next check-out
        else:
            pooled.close()


def _call_bound(conn: Any, call: Callable[[], _T], broken: list[bool]) -> _T:
    token = _BOUND.set(conn)
    try:
        return call()
    finally:
        _BOUND.reset(token)
        # A transaction that could not be ended (its COMMIT and ROLLBACK both failed, or
        # the caller was cancelled in between) is rolled back here, so the pool needs no
        # reset of its own (open_async_database turns that round trip off). A connection
        # that cannot even do that is not reused; the call's own error stands.
        try:
            if conn.in_transaction:
                conn.rollback()
        except Exception:
            broken.append(True)


_PG_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE


class AwaitedConnection:
    """psycopg's asyncio connection behind the synchronous calls the repository makes
    (`execute(...).fetchone()`, `commit()`, ...), each awaited through SQLAlchemy's
    greenlet bridge. Rows are read when the statement runs (psycopg has them already)."""

    __slots__ = ("_driver",)

    def __init__(self, driver: Any) -> None:
        self._driver = driver

    def execute(self, sql: str, params: Any = ()) -> _Rows:
        cursor = await_(self._driver.execute(sql, params))
        rows = await_(cursor.fetchall()) if cursor.description is not None else []
        return _Rows(rows, cursor.rowcount)

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open (psycopg knows without a round trip)."""
        return bool(self._driver.info.transaction_status != _PG_IDLE)

    def commit(self) -> None:
        await_(self._driver.commit())

    def rollback(self) -> None:
        await_(self._driver.rollback())


class _Rows:
    """A statement's result as the repository reads it from a DBAPI cursor."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


_GATES: weakref.WeakKeyDictionary[
    Engine, weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]
] = weakref.WeakKeyDictionary()


def write_gate(engine: AsyncEngine) -> asyncio.Lock | None:
    """The lock this event loop's writers to a SQLite `engine` take turns on (None for
    PostgreSQL, whose writers lock only the rows they change). One per engine and event
    loop, shared by every repository on the engine."""
    if engine.dialect.name != "sqlite":
        return None
    loop = asyncio.get_running_loop()
    gates = _GATES.get(engine.sync_engine)
    if gates is None:
        gates = _GATES.setdefault(engine.sync_engine, weakref.WeakKeyDictionary())
    gate = gates.get(loop)
    if gate is None:
        gate = gates.setdefault(loop, asyncio.Lock())
    return gate
