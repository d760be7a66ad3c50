"""How `AsyncSessionRepository` runs the synchronous repository's calls for asyncio
callers: on a bounded pool of worker threads, over a synchronous *companion* engine.

An `AsyncEngine` (from `open_async_database`, or made elsewhere) is the application's
handle; the repository's calls do not use its asyncio driver. Each `AsyncEngine` gets
one `Bridge`: a synchronous engine on the same database, set up like `open_database`'s
(pysqlite or psycopg, the same pragmas, begin modes, connection checks and store
settings), and a `ThreadPoolExecutor` of `workers` threads. Every call runs the very
code of `SessionRepository` on one of those threads, which keep their per-thread SQLite
connections between calls (see `connections.py`), and the event loop awaits the result
(`loop.run_in_executor`). Only public APIs are used: asyncio's and `concurrent.futures`'.

Cancellation: a call not yet started on its thread never runs; one already running runs
to its end there, but if the cancellation reaches it before its COMMIT, it rolls back
(`connections.cancelled`), so the caller who cancelled finds either all of its write or
none of it. The event loop is free at once either way.

The companion engine is disposed of when the `AsyncEngine` is (SQLAlchemy's
`engine_disposed` event), and a fork gives the child new worker threads.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from aisopod_session.connections import Cancel, run_cancellable

_T = TypeVar("_T")

SQLITE_WORKERS = 4
"""Worker threads per SQLite store: its writers take turns anyway (on the write gate,
below), and more threads would only compete with the event loop for the GIL."""
POSTGRESQL_WORKERS = 8
"""Worker threads per PostgreSQL store: each waits on a server round trip most of the
time; SQLAlchemy's default pool (5 + 10 overflow) has a connection for each."""


class Bridge:
    """One `AsyncEngine`'s companion engine and worker threads (made per process)."""

    __slots__ = ("__weakref__", "_executor", "_lock", "_pid", "engine", "workers")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        if isinstance(engine.pool, StaticPool | SingletonThreadPool):
            self.workers = 1  # one connection is the database (`:memory:`): one at a time
        elif engine.dialect.name == "sqlite":
            self.workers = SQLITE_WORKERS
        else:
            self.workers = POSTGRESQL_WORKERS
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pid = 0

    def executor(self) -> ThreadPoolExecutor:
        """This process's worker threads (a fork's child makes its own: the parent's
        threads are not there)."""
        executor = self._executor
        if executor is not None and self._pid == os.getpid():
            return executor
        with self._lock:
            if self._executor is None or self._pid != os.getpid():
                self._executor = ThreadPoolExecutor(
                    self.workers, thread_name_prefix="aisopod-session"
                )
                self._pid = os.getpid()
            return self._executor

    def close(self) -> None:
        """Dispose of the companion engine and let the worker threads end (a call still
        running finishes first; a later call starts new ones)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None and self._pid == os.getpid():
            executor.shutdown(wait=False)
        self.engine.dispose()

    async def run(self, call: Callable[[], _T]) -> _T:
        """Run `call`, synchronous repository code, on a worker thread and await its
        result; cancelled, see the module docstring."""
        cancel = Cancel()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor(), run_cancellable, cancel, call)
        except asyncio.CancelledError:
            cancel.requested = True
            raise


_BRIDGES: weakref.WeakKeyDictionary[Engine, Bridge] = weakref.WeakKeyDictionary()
_BRIDGING = threading.Lock()


def attach(engine: AsyncEngine, companion: Engine) -> Bridge:
    """Make `companion` the engine `engine`'s repository calls run on."""
    return bridge_of(engine, lambda _engine: companion)


def bridge_of(engine: AsyncEngine, make: Callable[[AsyncEngine], Engine]) -> Bridge:
    """`engine`'s bridge, made with the companion engine `make(engine)` returns the first
    time (an engine that `open_async_database` did not make)."""
    bridge = _BRIDGES.get(engine.sync_engine)
    if bridge is not None:
        return bridge
    with _BRIDGING:
        bridge = _BRIDGES.get(engine.sync_engine)
        if bridge is None:
            bridge = _BRIDGES[engine.sync_engine] = Bridge(make(engine))
            event.listen(engine.sync_engine, "engine_disposed", _on_dispose)
    return bridge


def _on_dispose(sync_engine: Engine) -> None:
    bridge = _BRIDGES.get(sync_engine)
    if bridge is not None:
        bridge.close()


_GATES: weakref.WeakKeyDictionary[
    Bridge, weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]
] = weakref.WeakKeyDictionary()


def write_gate(bridge: Bridge) -> asyncio.Lock | None:
    """The lock this event loop's writers to a SQLite store take turns on (None for
    PostgreSQL, whose writers lock only the rows they change). One per store and event
    loop, shared by every repository on the store."""
    if bridge.engine.dialect.name != "sqlite":
        return None
    loop = asyncio.get_running_loop()
    gates = _GATES.get(bridge)
    if gates is None:
        gates = _GATES.setdefault(bridge, weakref.WeakKeyDictionary())
    gate = gates.get(loop)
    if gate is None:
        gate = gates.setdefault(loop, asyncio.Lock())
    return gate
