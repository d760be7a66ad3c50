"""How `AsyncSessionRepository` runs the synchronous repository's code for asyncio
callers, and the write gate its SQLite writers take turns on.

It relies on two internals, each named here and guarded by tests/test_async.py:
- SQLAlchemy's greenlet bridge (`greenlet_spawn`, and `await_`, spelled `await_only`
  before SQLAlchemy 2.1), which lets synchronous code await the asyncio driver;
- aiosqlite's `Connection._execute` and `Connection._conn` (the queue of the
  connection's own thread, and the sqlite3 connection that thread owns), hence the pin
  of aiosqlite below 0.23.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, cast

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

from aisopod_session.connections import AwaitedConnection, bound, unbind

try:
    from sqlalchemy.util import await_  # SQLAlchemy 2.1
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util import await_only as await_

_T = TypeVar("_T")
_PG_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE


async def run_bound(engine: AsyncEngine, call: Callable[[], _T]) -> _T:
    """Run `call`, synchronous repository code, for an asyncio caller: its transactions
    use one connection checked out of `engine`'s pool for the call.

    On SQLite (aiosqlite) the whole call runs on the connection's own thread, which
    aiosqlite keeps to run that connection's blocking sqlite3 calls: one trip there and
    back per call, and the write lock is taken and released inside that trip, never held
    while the event loop runs other tasks. On PostgreSQL (psycopg's asyncio connection)
    the call runs on the event loop under SQLAlchemy's greenlet bridge, in autocommit
    mode like the synchronous calls, and each statement awaits the server
    (`AwaitedConnection`). Either way the connection goes back to the pool with no
    transaction open, or is invalidated if it cannot be brought back to that state.
    """
    return await greenlet_spawn(_run_checked_out, engine.sync_engine, call)


def _run_checked_out(engine: Engine, call: Callable[[], _T]) -> _T:
    pooled = engine.raw_connection()
    usable = [False]
    try:
        driver: Any = pooled.driver_connection
        if engine.dialect.name == "sqlite":
            # aiosqlite queues functions for its thread with `_execute`, as its own
            # cursors do; `_conn` is the sqlite3 connection that thread owns. If the
            # caller is cancelled, the call still runs to its end there, and whoever
            # checks the connection out next queues behind it.
            sqlite = driver._conn
            return cast(_T, await_(driver._execute(lambda: _call_on(sqlite, call, usable))))
        await_(driver.set_autocommit(True))
        try:
            return _call_on(AwaitedConnection(driver, await_), call, usable)
        finally:
            if usable[0]:
                try:
                    await_(driver.set_autocommit(False))  # as SQLAlchemy's pool expects
                except Exception:
                    usable[0] = False
    finally:
        if usable[0]:
            pooled.close()
        else:
            _discard(pooled)


def _discard(pooled: Any) -> None:
    """Invalidate a connection that cannot go back to the pool (closed, and replaced by a
    new one at the next check-out). When the call was cancelled, SQLAlchemy 2.0's close
    of psycopg's asyncio connection awaits and is cancelled too, leaving the connection
    open for the garbage collector: psycopg's `pgconn.finish()` then closes it at once,
    without awaiting."""
    driver: Any = pooled.driver_connection
    try:
        pooled.invalidate()
    finally:
        pgconn = getattr(driver, "pgconn", None)
        if pgconn is not None and not driver.closed:
            pgconn.finish()


def _call_on(conn: Any, call: Callable[[], _T], usable: list[bool]) -> _T:
    """Run `call` with its transactions on `conn`, then record in `usable` whether `conn`
    can go back to the pool."""
    token = bound(conn)
    try:
        return call()
    finally:
        unbind(token)
        usable[0] = _settled(conn)


def _settled(conn: Any) -> bool:
    """Whether `conn` is left with no transaction open. One the call could not end (its
    COMMIT and ROLLBACK both failed, or it was cancelled in between) is rolled back here,
    so the pool needs no reset of its own (open_async_database turns that round trip
    off); a connection that cannot even do that is not reused."""
    try:
        if isinstance(conn, AwaitedConnection):
            if conn.closed or conn.broken:
                return False
            if conn.info.transaction_status != _PG_IDLE:
                conn.execute("ROLLBACK")
            return bool(conn.info.transaction_status == _PG_IDLE)
        if conn.in_transaction:
            conn.rollback()
        return True
    except Exception:
        return False


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
