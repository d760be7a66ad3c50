"""How `AsyncSessionRepository` runs the synchronous repository's calls for asyncio
callers: on a bounded pool of worker threads, over a synchronous *companion* engine.

An `AsyncEngine` (from `open_async_database`, or made elsewhere) is the application's
handle; the repository's calls do not use its asyncio driver. Each `AsyncEngine` gets
one `Bridge`: a synchronous engine on the same database, set up like `open_database`'s
(pysqlite or psycopg, the same pragmas, begin modes, connection checks and store
settings), and `workers` threads. Every call runs the very code of `SessionRepository`
on one of those threads, which keep their per-thread SQLite connections between calls
(see `connections.py`), and the event loop awaits the result: one queue put, one thread
wake-up there and one `call_soon_threadsafe` back. Only public APIs are used.

Cancellation: a call not yet started on its thread never runs; one already running runs
to its end there, but if the cancellation reaches it before its COMMIT, it rolls back
(`connections.cancelled`), so the caller who cancelled finds either all of its write or
none of it. The event loop is free at once either way.

The companion engine is disposed of when the `AsyncEngine` is (SQLAlchemy's
`engine_disposed` event), and a fork gives the child new worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

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
    """One `AsyncEngine`'s companion engine and worker threads (started on first use in
    each process, stopped when the engine is disposed of or the bridge is collected)."""

    __slots__ = ("__weakref__", "_jobs", "_lock", "_pid", "engine", "workers")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        if isinstance(engine.pool, StaticPool | SingletonThreadPool):
            self.workers = 1  # one connection is the database (`:memory:`): one at a time
        elif engine.dialect.name == "sqlite":
            self.workers = SQLITE_WORKERS
        else:
            self.workers = POSTGRESQL_WORKERS
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] | None = None
        self._pid = 0

    def _queue(self) -> queue.SimpleQueue[_Job | None]:
        """The queue this process's worker threads take calls from (a fork's child starts
        its own threads: the parent's are not there)."""
        jobs = self._jobs
        if jobs is not None and self._pid == os.getpid():
            return jobs
        with self._lock:
            if self._jobs is None or self._pid != os.getpid():
                self._jobs = _start_workers(self.workers)
                self._pid = os.getpid()
                weakref.finalize(self, _stop_workers, self._jobs, self.workers)
            return self._jobs

    def close(self) -> None:
        """Stop the worker threads (each after the call it is running, if any; a later
        call starts new ones) and dispose of the companion engine."""
        with self._lock:
            jobs, self._jobs = self._jobs, None
        if jobs is not None and self._pid == os.getpid():
            _stop_workers(jobs, self.workers)
        self.engine.dispose()

    async def run(self, call: Callable[[], _T]) -> _T:
        """Run `call`, synchronous repository code, on a worker thread and await its
        result; cancelled, see the module docstring."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[_T] = loop.create_future()
        cancel = Cancel()
        self._queue().put((loop, done, cancel, call))
        try:
            return await done
        except asyncio.CancelledError:
            cancel.requested = True
            raise


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Cancel, Callable[[], Any]]


def _start_workers(count: int) -> queue.SimpleQueue[_Job | None]:
    """`count` daemon threads taking calls from a new queue until each takes a None. (A
    daemon thread does not hold up the interpreter's exit; one stopped there mid-call
    leaves its transaction uncommitted, which the database rolls back.)"""
    jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
    for _ in range(count):
        threading.Thread(
            target=_work, args=(jobs,), name="aisopod-session-worker", daemon=True
        ).start()
    return jobs


def _stop_workers(jobs: queue.SimpleQueue[_Job | None], count: int) -> None:
    for _ in range(count):
        jobs.put(None)


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    """A worker thread: run each call and hand its outcome to its event loop."""
    while (job := jobs.get()) is not None:
        loop, done, cancel, call = job
        try:
            outcome: tuple[bool, Any] = (True, run_cancellable(cancel, call))
        except BaseException as exc:  # every outcome goes to the caller, as its own
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
            loop.call_soon_threadsafe(_deliver, done, outcome)
        del job, loop, done, cancel, call, outcome


def _deliver(done: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if done.cancelled():
        return
    succeeded, value = outcome
    if succeeded:
        done.set_result(value)
    else:
        done.set_exception(value)


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
