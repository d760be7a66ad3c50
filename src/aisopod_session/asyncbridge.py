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
(`connections.run_cancellable`), so the caller who cancelled finds either all of its write or
none of it. The event loop is free at once either way.

Inline calls (SQLite files only): a short call (a key's session, an append of a few
messages, a page of history: `asyncrepository.py` says which) costs SQLite less than a
hand-off to a thread and back, so it runs on the event loop itself, over a second
engine on the same file whose connections never wait for a lock (`busy_timeout` 0):
if the lock is taken, it rolls back at once and the call goes to a worker thread,
which waits for it. Inline calls may hold a loop for `INLINE_BUDGET` seconds between
two of its turns; past that, calls go to the workers until the loop has turned, so a
burst of tasks cannot hold it longer. The inline engine's connections never checkpoint
the WAL (SQLite does it in the commit that takes the WAL past 1 000 pages: milliseconds
of copying, which would be spent on the loop); after every `CHECKPOINT_EVERY` inline
writes a worker thread runs a passive checkpoint instead, the writer that made it due
awaiting it with the write gate held (so it reaches the WAL's end), and the WAL stays
small.

The companion engine is disposed of when the `AsyncEngine` is (SQLAlchemy's
`engine_disposed` event), and a fork gives the child new worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from aisopod_session.connections import Cancel, DriverPath, OffTheLoop, run_cancellable
from aisopod_session.errors import DatabaseBusyError, SessionStoreError

_T = TypeVar("_T")

SQLITE_WORKERS = 4
"""Worker threads per SQLite store: its writers take turns anyway (on the write gate,
below), and more threads would only compete with the event loop for the GIL."""
POSTGRESQL_WORKERS = 8
"""Worker threads per PostgreSQL store: each waits on a server round trip most of the
time; the companion engine's pool keeps a connection for each (`database._WORKERS`)."""


CHECKPOINT_EVERY = 50
"""Inline writes between two passive WAL checkpoints on a worker thread: an append adds
about seven pages to the WAL (the rows and their indexes), so the WAL stays near 350
pages, where SQLite's own threshold is 1 000."""

INLINE_BUDGET = 0.001
"""Seconds of inline calls (below) an event loop may run between two of its turns; past
that, calls go to the worker threads until the loop has turned."""


class Bridge:
    """One `AsyncEngine`'s companion engine and worker threads (started on first use in
    each process, stopped when the engine is disposed of or the bridge is collected),
    and for a SQLite file the engine of its inline calls."""

    __slots__ = (
        "__weakref__",
        "_inline_writes",
        "_jobs",
        "_lock",
        "_path",
        "_pid",
        "_stop",
        "engine",
        "inline",
        "workers",
    )

    def __init__(self, engine: Engine, inline: Engine | None = None) -> None:
        self.engine = engine
        self.inline = inline
        if isinstance(engine.pool, StaticPool | SingletonThreadPool):
            self.workers = 1  # one connection is the database (`:memory:`): one at a time
        elif engine.dialect.name == "sqlite":
            self.workers = SQLITE_WORKERS
        else:
            self.workers = POSTGRESQL_WORKERS
        self._path = DriverPath(engine)
        self._inline_writes = 0
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] | None = None
        self._stop: weakref.finalize[Any, Any] | None = None
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
                # Stops them when the bridge is collected, or at `close` (run once).
                self._stop = weakref.finalize(self, _stop_workers, self._jobs, self.workers)
            return self._jobs

    def close(self) -> None:
        """Stop the worker threads (each after the call it is running, if any; a later
        call starts new ones) and dispose of the companion engine."""
        with self._lock:
            stop, self._stop, self._jobs = self._stop, None, None
        if stop is not None and self._pid == os.getpid():
            stop()
        self.engine.dispose()
        if self.inline is not None:
            self.inline.dispose()

    async def run(
        self,
        call: Callable[[], _T],
        inline: Callable[[], _T] | None = None,
        *,
        writes: bool = False,
    ) -> _T:
        """Run `call`, synchronous repository code, on a worker thread and await its
        result; cancelled, see the module docstring. `inline`, the same call on the
        inline engine, runs on the event loop itself instead when the store has one and
        the loop's budget allows (module docstring); if it finds the lock taken, or more
        work than the loop should do (`OffTheLoop`), `call` goes to a worker thread
        after all. `writes`: the call
        writes (an inline write counts towards the next checkpoint)."""
        loop = asyncio.get_running_loop()
        if inline is not None and self.inline is not None:
            budget = _budget(loop)
            if budget.spent < INLINE_BUDGET:
                start = time.perf_counter()
                try:
                    result = inline()
                except (DatabaseBusyError, OffTheLoop):
                    # Rolled back, nothing written: a worker waits for the lock, or does
                    # the work too big for the loop.
                    pass
                else:
                    if writes and self._checkpoint_due():
                        # Its writer waits for it, still holding this loop's write gate,
                        # so that no inline write comes in between: the WAL is copied
                        # up to its end, and the next write starts it again from the top.
                        await self._on_worker(loop, self._checkpoint)
                    return result
                finally:
                    budget.spend(time.perf_counter() - start, loop)
        return await self._on_worker(loop, call)

    async def _on_worker(self, loop: asyncio.AbstractEventLoop, call: Callable[[], _T]) -> _T:
        done: asyncio.Future[_T] = loop.create_future()
        cancel = Cancel()
        self._queue().put((loop, done, cancel, call))
        try:
            return await done
        except asyncio.CancelledError:
            cancel.requested = True
            raise

    def _checkpoint_due(self) -> bool:
        self._inline_writes += 1
        if self._inline_writes < CHECKPOINT_EVERY:
            return False
        self._inline_writes = 0
        return True

    def _checkpoint(self) -> None:
        """A passive checkpoint of the WAL on this worker's connection: it copies into the
        database file what no reader still needs, waiting for nobody; a busy or failed
        one is left to the next."""
        with (
            contextlib.suppress(SessionStoreError),
            self._path.transaction("checkpoint", None) as conn,
        ):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


class _Budget:
    """How long inline calls have held one event loop since it last turned."""

    __slots__ = ("resetting", "spent")

    def __init__(self) -> None:
        self.spent = 0.0
        self.resetting = False

    def spend(self, seconds: float, loop: asyncio.AbstractEventLoop) -> None:
        self.spent += seconds
        if not self.resetting:
            # Runs at the loop's next turn: the callbacks ready now run first.
            self.resetting = True
            loop.call_soon(self._reset)

    def _reset(self) -> None:
        self.spent = 0.0
        self.resetting = False


_BUDGETS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Budget] = (
    weakref.WeakKeyDictionary()
)


def _budget(loop: asyncio.AbstractEventLoop) -> _Budget:
    budget = _BUDGETS.get(loop)
    if budget is None:
        budget = _BUDGETS.setdefault(loop, _Budget())
    return budget


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


def attach(engine: AsyncEngine, companion: Engine, inline: Engine | None) -> Bridge:
    """Make `companion` the engine `engine`'s repository calls run on (and `inline` that
    of its inline calls)."""
    return bridge_of(engine, lambda _engine: (companion, inline))


def bridge_of(
    engine: AsyncEngine, make: Callable[[AsyncEngine], tuple[Engine, Engine | None]]
) -> Bridge:
    """`engine`'s bridge, made with the companion and inline engines `make(engine)`
    returns the first time (an engine that `open_async_database` did not make)."""
    bridge = _BRIDGES.get(engine.sync_engine)
    if bridge is not None:
        return bridge
    with _BRIDGING:
        bridge = _BRIDGES.get(engine.sync_engine)
        if bridge is None:
            bridge = _BRIDGES[engine.sync_engine] = Bridge(*make(engine))
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
