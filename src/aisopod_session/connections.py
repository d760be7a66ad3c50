"""Which connection each repository call runs on, how its transaction begins and ends,
and why no SQLite connection of ours ever crosses a `fork`.

The repository's calls do not go through SQLAlchemy's execution layer: they run
precompiled SQL on the driver connection (`driver_transaction`), which costs a fraction
as much per call. Which connection that is, is chosen once per repository (`DriverPath`),
from the engine's dialect and pool class:

- **SQLite.** Each thread keeps one connection per engine between calls (a *lease*),
  because checking one out of the pool and back costs as much as a whole indexed read.
  A lease is taken from the pool once and detached from it, so any number of threads
  may hold one. Writes begin `BEGIN IMMEDIATE`, reads run as single statements (or a
  deferred `BEGIN` for a snapshot over several).
- **PostgreSQL.** A pooled connection per call, switched to autocommit for the call: a
  single statement is one round trip; a write sends `BEGIN ISOLATION LEVEL READ
  COMMITTED; SET LOCAL lock_timeout = …` in one round trip (so every lock, a row's or
  a table's, is waited for at most `busy_timeout`, also behind PgBouncer's transaction
  pooling, where a session-level `SET` would not stick), then its statements, then
  `COMMIT`. A connection whose transaction cannot be ended (the
  server went away) is invalidated, never returned to the pool.
- **asyncio**: the calls run on worker threads, like any thread's (`asyncbridge.py`);
  a cancelled one rolls back instead of committing (`run_cancellable`).

**Text that is not UTF-8.** sqlite3 refuses a whole result when one text cell of it is
not UTF-8 (another program wrote bytes, plain SQL a `CAST(x'..' AS TEXT)`), naming only
the column. The repository's calls that store nothing they read (`lenient_text_retry`)
then run once more with such text read with U+FFFD in place of each bad sequence,
logged; reading every call that way would cost a Python call per text cell. A call made
inside another's transaction on the same thread (a `check` callback's) never rolls that
transaction back.

**Dispose.** `engine.dispose()` closes the leases that are not in a call; a lease in a
call is closed by its thread when the call ends (closing a sqlite3 connection another
thread is using crashes the process). An engine that is garbage-collected closes its
leases too.

**Fork.** SQLite keeps per-process bookkeeping of the locks it holds on a file, shared by
every connection of the process to that file. A child forked while the parent has a
connection open inherits that bookkeeping but not the POSIX locks behind it, so its own
connections to the file believe they hold locks they do not; the parent's last close
then checkpoints and deletes the WAL under the child's writes. So before a fork (an
`os.register_at_fork` hook) calls and checked-out pooled connections of other threads
are waited for (up to `_FORK_WAIT`), new calls wait, and every leased and pooled SQLite
connection of every registered engine is closed; the parent reopens lazily afterwards.
In the child every registered engine gets a new pool (`dispose(close=False)`: the
parent's connections, SQLite or PostgreSQL, are neither used nor closed there). A file
with a connection still open at the fork (the forking thread's own, one held past the
wait, an asyncio engine's) is refused in the child (`_TAINTED`), rather than written to
unsafely.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar

from sqlalchemy import Connection, Engine, event
from sqlalchemy.pool import PoolProxiedConnection, QueuePool, SingletonThreadPool, StaticPool

from aisopod_session.errors import SessionStoreError, driver_errors, translate
from aisopod_session.settings import lock_timeout_ms

logger = logging.getLogger("aisopod_session")

Mode = Literal["IMMEDIATE", "DEFERRED"]
"""How a call's transaction begins: see `driver_transaction`."""
_T = TypeVar("_T")

_FORK_WAIT = 60.0
"""Seconds a fork waits for calls in other threads to end before it goes ahead anyway."""


# --- the gate every SQLite call passes, so a fork can wait for calls in flight ----------


class _Gate:
    """The thread that is forking (if any), and how many leases are being opened. Its
    lock guards every lease's `busy` and `retired` flags too. One per process; the
    child of a fork makes a new one (its lock may have been held by a thread that does
    not exist there)."""

    __slots__ = ("closing", "cond", "forking", "lock", "opening", "pid")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.forking: int | None = None
        self.opening = 0
        self.closing = 0
        self.pid = os.getpid()


_gate = _Gate()


# --- leases -------------------------------------------------------------------------------


class _Lease:
    """A driver connection kept by one thread (`owner`) between calls. `busy` while a
    call runs on it (`depth`: how many, a call made inside another's counting too, so
    the lease is busy until the outermost ends); `retired` when it must be closed as soon
    as that call ends. Closed when its thread ends (the thread's reference to it goes)."""

    __slots__ = (
        "__weakref__",
        "busy",
        "closed",
        "depth",
        "driver",
        "held",
        "owner",
        "pid",
        "retired",
    )

    def __init__(self, driver: sqlite3.Connection, held: weakref.WeakSet[_Lease]) -> None:
        self.driver = driver
        self.held = held
        self.owner = threading.get_ident()
        self.pid = os.getpid()
        self.busy = False
        self.depth = 0
        self.retired = False
        self.closed = False

    def __del__(self) -> None:
        _close(self)


class _Leases:
    """One SQLite engine's leases: the calling thread's (`local.lease`) and every open one
    (`held`); the pooled connections checked out of it, by the thread holding each
    (`pooled`: the migrator's, an export's, the application's own); and the identity of
    its file (`file`, None in memory). Holds only a weak reference to the engine, so the
    engine can be collected."""

    __slots__ = ("__weakref__", "_file", "database", "engine", "held", "local", "pooled")

    def __init__(self, engine: Engine) -> None:
        self.engine = weakref.ref(engine)
        self.local = threading.local()
        self.held: weakref.WeakSet[_Lease] = weakref.WeakSet()
        self.pooled: dict[int, int] = {}
        self.database = engine.url.database
        self._file: tuple[int, int] | None = None

    @property
    def file(self) -> tuple[int, int] | None:
        """The (device, inode) of the engine's file, once it exists."""
        if self._file is None:
            self._file = file_identity(self.database)
        return self._file

    def refuse_if_forked_open(self) -> None:
        """`SessionStoreError` if this process was forked while its parent held this
        store's file open in a way the fork could not close (see `_before_fork`)."""
        if _TAINTED and self.file in _TAINTED:
            raise forked_open_error(str(self.database))

    def retire(self) -> None:
        """Close every lease not in a call; each one in a call closes when the call ends."""
        with _gate.lock:
            idle = _retire(list(self.held))
        for held in idle:
            _close(held)
        _drain()

    def abandon(self) -> None:
        """`retire` for an engine that was garbage-collected (so no call runs on it): from
        a finaliser, which may run in any thread at any moment, even one holding the
        gate's lock, so it takes no lock and closes nothing itself (see `_close`)."""
        for held in list(self.held):
            held.retired = True
            _close(held)


def _retire(leases: list[_Lease]) -> list[_Lease]:
    """Mark `leases` retired (under the gate's lock) and return those not in a call."""
    idle = []
    for held in leases:
        held.retired = True
        if not held.busy:
            held.held.discard(held)
            idle.append(held)
    return idle


_INHERITED: list[Any] = []
"""Connections inherited through fork: kept, never used or closed, in the child (closing
one there could let SQLite delete the parent's WAL)."""

_PENDING: deque[sqlite3.Connection] = deque()
"""Connections of leases that ended while another thread was forking, closed by
`_drain` (the forking thread's, or the next check-out's or check-in's)."""

_CLOSING: list[int] = []
"""One entry per `_close` closing a connection outside the gate's lock (list append and
pop are atomic), so that a fork waits for it."""


def _close(lease: _Lease) -> None:
    """Close `lease`'s connection, without taking the gate's lock: this runs from
    `__del__` and finalisers too (any thread, any moment, perhaps one holding that lock).
    A close must not overlap a fork (a close in flight in another thread would carry
    SQLite's half-updated lock bookkeeping into the child): it announces itself in
    `_CLOSING` before it looks whether a fork is under way, and the forking thread
    announces itself in `forking` before it counts `_CLOSING`, so one of the two always
    sees the other; a close that sees a fork queues its connection for the forking
    thread to close instead."""
    if lease.closed:
        return
    lease.closed = True
    if lease.pid != os.getpid():
        _INHERITED.append(lease.driver)
        return
    _CLOSING.append(1)
    try:
        forking = _gate.forking
        if forking is not None and forking != threading.get_ident():
            _PENDING.append(lease.driver)
            return
        try:
            lease.driver.close()
        except sqlite3.Error:  # a connection of another thread (an engine made elsewhere)
            _INHERITED.append(lease.driver)
    finally:
        _CLOSING.pop()


def _drain() -> None:
    """Close the queued connections, never while another thread forks (a fork waits for
    the closing to end). Takes the gate's lock: not for `__del__` or finalisers."""
    if not _PENDING:
        return
    gate = _gate
    me = threading.get_ident()
    with gate.lock:
        while gate.forking is not None and gate.forking != me:
            gate.cond.wait()
        gate.closing += 1
    try:
        while _PENDING:
            try:
                driver = _PENDING.popleft()
            except IndexError:
                break
            try:
                driver.close()
            except sqlite3.Error:  # a connection of another thread (an engine made elsewhere)
                _INHERITED.append(driver)
    finally:
        with gate.lock:
            gate.closing -= 1
            if gate.forking is not None:
                gate.cond.notify_all()


_TAINTED: set[tuple[int, int]] = set()
"""Files (device, inode) that were open in the parent when this process was forked and
could not be closed first: SQLite's lock bookkeeping for them came along, so this process
never opens them (its writes could be lost when the parent closes its connections)."""
_CROSSING: set[tuple[int, int]] = set()
"""The files `_before_fork` could not close, for the child's `_TAINTED`."""


def file_identity(database: str | None) -> tuple[int, int] | None:
    """The (device, inode) of a SQLite database file that exists, or None."""
    if database in (None, "", ":memory:") or str(database).startswith("file:"):
        return None
    try:
        found = os.stat(str(database))
    except OSError:
        return None
    return found.st_dev, found.st_ino


def forked_open_error(name: str) -> SessionStoreError:
    """The refusal of a store whose file crossed a fork (see `_TAINTED`)."""
    return SessionStoreError(
        f"{name}: this process was forked while its parent held the store's file open "
        "in another thread (a call that outlasted the fork's wait, an export, a "
        "connection of the application's own) or through an asyncio engine: SQLite's "
        "locks on that file cannot be trusted in this process, so it does not open it; "
        "fork when no call is running, and open asyncio engines after the fork"
    )


def tainted(database: str | None) -> bool:
    """Whether this process must not open the SQLite file `database` (see `_TAINTED`)."""
    identity = file_identity(database)
    return identity is not None and identity in _TAINTED


# Keyed by id(engine) (checked against the engine's weak reference): a plain dictionary
# lookup, where a WeakKeyDictionary would make a weak reference on every call.
_LEASES: dict[int, _Leases] = {}
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_REGISTERING = threading.Lock()


def register(engine: Engine) -> None:
    """Make `engine` one of the store's engines: its leases are closed when it is
    disposed of or collected, and it is made safe across `fork` (module docstring).
    Idempotent."""
    if engine in _ENGINES:
        return
    with _REGISTERING:
        if engine in _ENGINES:
            return
        if engine.dialect.name == "sqlite":
            leases = _Leases(engine)
            _LEASES[id(engine)] = leases
            event.listen(engine, "engine_disposed", _on_dispose)
            _track_pooled(engine, leases)
            weakref.finalize(engine, _forget, id(engine), leases)
        _ENGINES.add(engine)


def _track_pooled(engine: Engine, leases: _Leases) -> None:
    """Keep `leases.pooled` (the pool's connections checked out, by thread) up to date,
    so that a fork waits for them too; refuse a check-out in a process that must not
    open the file."""

    def checkout(_dbapi: Any, record: Any, _proxy: Any) -> None:
        leases.refuse_if_forked_open()
        with _gate.lock:
            leases.pooled[id(record)] = threading.get_ident()

    def checkin(_dbapi: Any, record: Any) -> None:
        with _gate.lock:
            leases.pooled.pop(id(record), None)
            if _gate.forking is not None:
                _gate.cond.notify_all()

    event.listen(engine, "checkout", checkout)
    event.listen(engine, "checkin", checkin)
    event.listen(engine, "detach", checkin)  # a lease: tracked as one from then on


def _forget(key: int, leases: _Leases) -> None:
    """An engine was collected: close its leases and drop its entry (a finaliser)."""
    if _LEASES.get(key) is leases:
        del _LEASES[key]
    leases.abandon()


def _on_dispose(engine: Engine) -> None:
    _leases_of(engine).retire()


def _leases_of(engine: Engine) -> _Leases:
    leases = _LEASES.get(id(engine))
    if leases is None or leases.engine() is not engine:
        register(engine)
        leases = _LEASES[id(engine)]
    return leases


def _open_lease(engine: Engine, leases: _Leases) -> _Lease:
    """A connection from the pool, set up like every pooled one (pragmas, implicit
    transactions off), then detached from it."""
    proxy = engine.raw_connection()
    try:
        driver = proxy.driver_connection  # gone from the proxy once detached
        assert isinstance(driver, sqlite3.Connection)
        proxy.detach()
    except BaseException:
        proxy.close()
        raise
    return _Lease(driver, leases.held)


def _check_out(engine: Engine) -> _Lease:
    """This thread's lease on `engine`, marked busy (waiting while a fork is under way)."""
    if _PENDING:
        _drain()
    leases = _leases_of(engine)
    lease: _Lease | None = getattr(leases.local, "lease", None)
    gate = _gate
    with gate.lock:
        if gate.forking is not None and gate.forking != threading.get_ident():
            while gate.forking is not None:
                gate.cond.wait()
        if lease is not None and not lease.retired and lease.pid == gate.pid:
            lease.busy = True
            lease.depth += 1
            return lease
        leases.refuse_if_forked_open()
        gate.opening += 1  # a fork waits for the connection being opened too
    lease = None
    try:
        lease = _open_lease(engine, leases)
    finally:
        with gate.lock:
            gate.opening -= 1
            if lease is not None:
                lease.busy = True
                lease.depth = 1
                leases.held.add(lease)
            if gate.forking is not None:
                gate.cond.notify_all()
    leases.local.lease = lease
    return lease


def _check_in(lease: _Lease, *, discard: bool = False) -> None:
    """End a call on `lease`; close it if it was retired meanwhile or cannot be reused."""
    gate = _gate
    with gate.lock:
        lease.depth -= 1
        if discard:
            lease.retired = True
        if lease.depth > 0:
            return  # a call made inside another's: that one still runs on it, and ends it
        lease.busy = False
        close = lease.retired
        if close:
            lease.held.discard(lease)
        if gate.forking is not None:
            gate.cond.notify_all()
    if close:
        _close(lease)
    if _PENDING:
        _drain()


def lease(engine: Engine) -> sqlite3.Connection:
    """This thread's driver connection to `engine`'s database (for tests and tools: the
    repository's calls check it out themselves). No transaction is open on it."""
    held = _check_out(engine)
    _check_in(held)
    return held.driver


# --- fork ---------------------------------------------------------------------------------


def _calls_elsewhere(me: int) -> int:
    """Calls running, connections being opened, and pooled connections checked out, in
    threads other than `me` (under the gate's lock)."""
    busy = 0
    for leases in list(_LEASES.values()):
        busy += sum(1 for held in list(leases.held) if held.busy and held.owner != me)
        busy += sum(1 for owner in leases.pooled.values() if owner != me)
    return busy + _gate.opening + _gate.closing + len(_CLOSING)


def _still_open() -> set[tuple[int, int]]:
    """The files of which a connection is still open, with the fork about to happen:
    a call in flight or a pooled connection checked out (by any thread, the forking one
    included), or an asyncio engine's connections (under the gate's lock)."""
    files: set[tuple[int, int]] = set()
    for leases in list(_LEASES.values()):
        if leases.file is None:
            continue
        engine = leases.engine()
        if (
            any(held.busy for held in list(leases.held))
            or leases.pooled
            or (engine is not None and engine.dialect.is_async and _pool_holds(engine))
        ):
            files.add(leases.file)
    return files


def _pool_holds(engine: Engine) -> bool:
    """Whether an asyncio engine's pool holds open connections."""
    pool: Any = engine.pool
    try:
        return bool(pool.checkedin() + pool.checkedout())
    except AttributeError:  # a pool that does not count (NullPool)
        return False


def _before_fork() -> None:
    gate = _gate
    me = threading.get_ident()
    with gate.lock:
        gate.forking = me
        deadline = time.monotonic() + _FORK_WAIT
        while (waiting := _calls_elsewhere(me)) > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                logger.warning(
                    "fork: %d call(s) in other threads did not end within %.0f s; their "
                    "SQLite connections cross the fork",
                    waiting,
                    _FORK_WAIT,
                )
                break
            # Closes outside the lock do not notify: look again soon.
            gate.cond.wait(min(remaining, 0.005) if _CLOSING else remaining)
        idle: list[_Lease] = []
        for leases in list(_LEASES.values()):
            idle += _retire(list(leases.held))
        _CROSSING.clear()
        _CROSSING.update(_still_open())
    for held in idle:
        _close(held)
    _drain()  # this thread is the forking one: no other thread closes meanwhile
    for engine in list(_ENGINES):
        if _closes_before_fork(engine) and _pool_holds_idle(engine):
            engine.dispose()  # its idle pooled connections; the pool is replaced


def _pool_holds_idle(engine: Engine) -> bool:
    """Whether `engine`'s pool may hold a checked-in connection: a process with many
    engines (one per tenant, or a test suite's) forks without remaking every pool."""
    pool = engine.pool
    return not isinstance(pool, QueuePool) or pool.checkedin() > 0


def _pool_is_empty(engine: Engine) -> bool:
    """Whether `engine`'s pool is a queue that holds no connection at all, in or out."""
    return isinstance(engine.pool, QueuePool) and not _pool_holds(engine)


def _closes_before_fork(engine: Engine) -> bool:
    """Whether `engine` has SQLite file connections this process can close now: not an
    asyncio engine (aiosqlite's connections close on their own threads, awaited), and not
    a pool that is the database itself (`:memory:`)."""
    return (
        engine.dialect.name == "sqlite"
        and not engine.dialect.is_async
        and not isinstance(engine.pool, StaticPool | SingletonThreadPool)
    )


def _after_fork_in_parent() -> None:
    gate = _gate
    with gate.lock:
        gate.forking = None
        _CROSSING.clear()
        gate.cond.notify_all()


def _after_fork_in_child() -> None:
    global _gate
    _gate = _Gate()
    _TAINTED.update(_CROSSING)
    _CROSSING.clear()
    # Queued by the parent's threads after the fork's drain: the parent's to close.
    _INHERITED.extend(_PENDING)
    _PENDING.clear()
    for leases in list(_LEASES.values()):
        leases.pooled.clear()  # held by the parent's threads, which are not here
    for engine in list(_ENGINES):
        if _pool_is_empty(engine):
            continue  # no connection of the parent's to keep away from
        # A new pool; the parent's connections (SQLite's or PostgreSQL's sockets) are
        # kept unused, so that nothing in this process closes them.
        _INHERITED.append(engine.pool)
        engine.dispose(close=False)


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


# --- one call's transaction ---------------------------------------------------------------

_CANCEL: ContextVar[Cancel | None] = ContextVar("aisopod_cancel", default=None)
"""The cancellation of the asyncio call this thread is running (`run_cancellable`)."""


class Cancel:
    """Whether the asyncio caller of a call running on a worker thread has been cancelled
    (`asyncbridge.Bridge.run` sets `requested`; the call's transaction reads it before
    its COMMIT)."""

    __slots__ = ("requested",)

    def __init__(self) -> None:
        self.requested = False


class OffTheLoop(Exception):  # noqa: N818 - a signal to the bridge, not an error
    """Raised by an inline call (`asyncbridge.Bridge.run`) that finds, once in its
    transaction, more work than the event loop should do (a popped message of megabytes
    to decode): its transaction rolls back, nothing is written, and the same call runs
    on a worker thread instead."""


def run_cancellable(cancel: Cancel, call: Callable[[], _T]) -> _T:
    """Run `call` on this (worker) thread; its transactions roll back instead of
    committing once `cancel` is requested (`asyncio.CancelledError`)."""
    if cancel.requested:
        raise asyncio.CancelledError
    token = _CANCEL.set(cancel)
    try:
        return call()
    finally:
        _CANCEL.reset(token)


_LENIENT_TEXT: ContextVar[bool] = ContextVar("aisopod_lenient_text", default=False)
_P = ParamSpec("_P")


class LenientText:
    """A sqlite3 `text_factory` reading text that is not UTF-8 with U+FFFD in place of
    each bad byte sequence; `replaced` counts such cells."""

    __slots__ = ("replaced",)

    def __init__(self) -> None:
        self.replaced = 0

    def __call__(self, raw: bytes) -> str:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            self.replaced += 1
            return raw.decode("utf-8", "replace")


@contextmanager
def text_read_leniently(conn: Connection) -> Iterator[LenientText]:
    """While the block runs, `conn` (if SQLite's) reads text that is not UTF-8 leniently
    (`LenientText`, yielded); for a long read that cannot start again, such as an
    export's, where a Python call per text cell costs little beside the rest."""
    text = LenientText()
    driver = conn.connection.dbapi_connection if conn.dialect.name == "sqlite" else None
    if not isinstance(driver, sqlite3.Connection):
        yield text
        return
    before = driver.text_factory
    driver.text_factory = text
    try:
        yield text
    finally:
        driver.text_factory = before


_UNDECODABLE = re.compile(r"Could not decode to UTF-8 column '([^']*)'")


def _undecodable_column(error: BaseException) -> str | None:
    """The column named by sqlite3's refusal of a text cell that is not UTF-8, if
    `error` is (or was translated from) one."""
    cause = error.__cause__ if isinstance(error, SessionStoreError) else error
    if not isinstance(cause, sqlite3.OperationalError):
        return None
    found = _UNDECODABLE.match(str(cause))
    return None if found is None else found[1]


def lenient_text_retry(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """A repository call that, if SQLite refuses a text cell that is not UTF-8, runs
    once more reading such text with U+FFFD in place of each bad byte sequence (logged
    as a warning naming the call and the column, not the text). Only for calls that
    store nothing they read: one that did would store the replaced text back. (The
    first run, refused, wrote nothing: every call is one transaction.)"""
    return _lenient(method, method.__name__)


def lenient_text_retry_as(call: str) -> Callable[[Callable[_P, _T]], Callable[_P, _T]]:
    """`lenient_text_retry` for a helper of the public call named `call`, which its
    warning names."""
    return lambda method: _lenient(method, call)


def _lenient(method: Callable[_P, _T], name: str) -> Callable[_P, _T]:
    @functools.wraps(method)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return method(*args, **kwargs)
        except SessionStoreError as exc:
            column = None if _LENIENT_TEXT.get() else _undecodable_column(exc)
            if column is None:
                raise
            logger.warning(
                "%s read text that is not UTF-8 (column %s) with U+FFFD in its place",
                name,
                column,
            )
        token = _LENIENT_TEXT.set(True)
        try:
            return method(*args, **kwargs)
        finally:
            _LENIENT_TEXT.reset(token)

    return call


_BEGIN: dict[Mode, str] = {"IMMEDIATE": "BEGIN IMMEDIATE", "DEFERRED": "BEGIN"}
_SERVER_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
_PG_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE


def server_begin(engine: Engine, mode: Mode) -> str:
    """What a PostgreSQL transaction of `mode` begins with (one round trip)."""
    if mode == "DEFERRED":
        return _SERVER_READ
    # READ COMMITTED whatever the server's default: a write locks the rows it changes
    # and reads them after the lock, which a serializable transaction would refuse.
    return (
        f"BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL lock_timeout = {lock_timeout_ms(engine)}"
    )


_SERVER, _SHARED, _LEASED, _ASYNC = range(4)


class DriverPath:
    """Which driver connection the calls on `engine` run on (see the module docstring),
    chosen once from its dialect and pool class, when a repository is made: a PostgreSQL
    connection from the pool per call, the one connection of a `:memory:` database's pool,
    or this thread's lease on a SQLite file. An asyncio engine's calls are refused, at
    each call, naming the API to use instead."""

    __slots__ = ("engine", "kind")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        if engine.dialect.is_async:
            self.kind = _ASYNC
        elif engine.dialect.name != "sqlite":
            self.kind = _SERVER
        elif isinstance(engine.pool, StaticPool | SingletonThreadPool):
            # Disposing of the engine makes a new pool of the same class: still right.
            self.kind = _SHARED
        else:
            self.kind = _LEASED

    def transaction(self, action: str, mode: Mode | None) -> driver_transaction:
        """`driver_transaction` on this path."""
        return driver_transaction(self, action, mode)


class driver_transaction:  # noqa: N801 - used like a function: `with driver_transaction(...)`
    """Run the block in one transaction on `path`'s driver connection.

    `mode` is `"IMMEDIATE"` (every write: on SQLite the write lock first, on PostgreSQL
    a `lock_timeout` of `busy_timeout`), `"DEFERRED"` (a read snapshot over several
    statements) or None (a single statement, which runs as its own transaction). The
    block's driver and SQL errors become `SessionStoreError`s naming `action`; any
    exception rolls everything back (but a call made inside another's transaction on
    this thread's SQLite connection leaves that transaction to its owner).
    """

    __slots__ = (
        "_action",
        "_conn",
        "_factory",
        "_lease",
        "_mode",
        "_outer",
        "_path",
        "_pool",
        "_shared",
    )

    def __init__(self, path: DriverPath, action: str, mode: Mode | None) -> None:
        self._path = path
        self._action = action
        self._mode = mode
        self._shared: PoolProxiedConnection | None = None
        self._lease: _Lease | None = None
        self._pool: Any = None
        self._conn: Any = None  # the driver's connection: sqlite3's or psycopg's
        # Whether this thread's SQLite connection was in a transaction already: a call
        # made inside another's (a `check` callback's read), whose transaction is not
        # this call's to roll back.
        self._outer = False
        self._factory: Any = None  # the text_factory a lenient call replaced, to restore

    def __enter__(self) -> Any:
        try:
            return self._begin()
        except BaseException as exc:
            self._end(exc, commit=False)
            translated = translate(exc, self._action)
            if translated is exc:
                raise
            raise translated from exc

    def _begin(self) -> Any:
        engine, mode, kind = self._path.engine, self._mode, self._path.kind
        if kind == _SERVER:
            self._pool = engine.pool
            self._shared = engine.raw_connection()
            conn: Any = self._shared.driver_connection
            self._conn = conn
            conn.autocommit = True  # no implicit BEGIN: a single read is one round trip
            if mode is not None:
                conn.execute(server_begin(engine, mode), prepare=False)
            return conn
        if kind == _LEASED:
            self._lease = _check_out(engine)
            conn = self._lease.driver
            self._outer = self._lease.depth > 1
        elif kind == _SHARED:
            # The pool's one connection is the database (`:memory:`): borrow it per call.
            self._shared = engine.raw_connection()
            conn = self._shared.driver_connection
            assert isinstance(conn, sqlite3.Connection)
            self._outer = conn.in_transaction
        else:
            raise SessionStoreError(
                "this engine is an asyncio one (from open_async_database): use "
                "AsyncSessionRepository, not SessionRepository, with it"
            )
        self._conn = conn
        if _LENIENT_TEXT.get():
            self._factory = conn.text_factory
            conn.text_factory = LenientText()  # for this call only: see `_end`
        if mode is not None:
            conn.execute(_BEGIN[mode])
        return conn

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        ended = self._end(error, commit=True)
        if ended is None or (ended is error and not isinstance(error, driver_errors())):
            return  # committed, or the block's own error goes on as it is
        if isinstance(ended, driver_errors()):
            raise translate(ended, self._action) from ended
        raise ended  # the caller was cancelled before COMMIT: rolled back

    def _end(self, error: BaseException | None, *, commit: bool) -> BaseException | None:
        """Commit (if asked and all went well) or roll back, release the connection, and
        return the error that ends the call, if any."""
        conn = self._conn
        broken = False
        try:
            if conn is not None:
                if error is None and commit and self._mode is not None:
                    cancel = _CANCEL.get()
                    if cancel is not None and cancel.requested:
                        error = asyncio.CancelledError()
                if error is None and commit and self._mode is not None:
                    try:
                        conn.execute("COMMIT")
                    except driver_errors() as exc:
                        error = exc
                if (
                    error is not None
                    and not self._outer
                    and _in_transaction(conn, self._path.kind == _SERVER)
                ):
                    try:
                        conn.execute("ROLLBACK")
                    except driver_errors():
                        # Not reused: SQLite has rolled back already if it lost the
                        # transaction (closing rolls back otherwise); a PostgreSQL
                        # connection that cannot roll back has lost its server.
                        broken = True
        finally:
            factory, self._factory = self._factory, None
            if factory is not None:
                conn.text_factory = factory
            self._release(broken=broken)
        return error

    def _release(self, *, broken: bool) -> None:
        held, self._lease = self._lease, None
        if held is not None:
            _check_in(held, discard=broken)
        shared, self._shared = self._shared, None
        if shared is None:
            return
        if self._path.kind == _SERVER:
            conn = self._conn
            if self._path.engine.pool is not self._pool:
                # The engine was disposed of during the call: its old pool would keep the
                # connection open, unused, until the garbage collector found it.
                broken = True
            if conn is not None and not (broken or conn.closed or conn.broken):
                try:
                    conn.autocommit = False  # as SQLAlchemy's own use of the pool expects
                except driver_errors():
                    broken = True
            else:
                broken = True
            if broken:
                shared.invalidate()  # closed and replaced, not reset: no traceback logged
                _LOST_AT[self._path.engine] = time.monotonic()
                return
        shared.close()


_LOST_AT: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()


def connection_lost_at(engine: Engine) -> float:
    """When (`time.monotonic()`) a call on `engine` last found its PostgreSQL connection
    broken (or 0.0): a server restart, or a killed server process, cuts every pooled
    connection at once, so each connection checked in before then is pinged before it
    is handed out again (database.py, `_ping_when_idle`)."""
    return _LOST_AT.get(engine, 0.0)


def _in_transaction(conn: Any, server: bool) -> bool:
    if server:
        return bool(conn.info.transaction_status != _PG_IDLE)
    return bool(conn.in_transaction)
