"""`open_database`, `open_async_database` and `open_async_database_sync`: the engine, its
per-connection pragmas, its transaction mode, and the migrations, all set up in one
call."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.pool import StaticPool

from aisopod_session.connections import (
    connection_lost_at,
    forked_open_error,
    register,
    tainted,
)
from aisopod_session.errors import (
    SessionStoreError,
    is_busy,
    translated_errors,
)
from aisopod_session.migrations import (
    MIGRATIONS,
    SCHEMA_VERSION,
    check_schema,
    migrate_from,
    version_of,
)
from aisopod_session.settings import (
    DEFAULT_BUSY_TIMEOUT,
    Clock,
    busy_timeout_of,
    clock_of,
    set_store_options,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from aisopod_session.asyncbridge import Bridge

from aisopod_session.transactions import (
    Synchronous,
    check_busy_timeout,
    enable_wal,
    prepare_engine,
    read_transaction,
)
from aisopod_session.validation import check_int


def open_database(
    target: str | os.PathLike[str] | URL,
    *,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    synchronous: Synchronous = "NORMAL",
    migrate: bool = True,
    echo: bool = False,
    clock: Clock | None = None,
    pool_size: int | None = None,
    max_overflow: int | None = None,
) -> Engine:
    """Open (creating if needed) a session store and return its engine, migrated.

    `target` is a file path (missing parent folders are created), `":memory:"`, or a
    SQLAlchemy URL such as `sqlite:///path/to.db` or `postgresql+psycopg://…` (a bare
    `postgresql://` means the same driver). Every pooled SQLite connection gets
    `foreign_keys=ON`, `busy_timeout` (seconds) and `synchronous` (`NORMAL` survives any
    process crash; `FULL` also the last transactions of a power loss); a file is put in
    WAL mode. Transactions begin `IMMEDIATE` unless the store marks them read-only.
    With `migrate=False` the schema is left as it is (to inspect pending migrations or
    run `run_migrations` yourself), and a file behind this code's schema is not put in
    WAL mode either: nothing is written to it; a database newer than this code is
    refused either way.
    `busy_timeout` (0 to about 24.8 days) also bounds a PostgreSQL write's wait for a row
    lock (`lock_timeout`). Timestamps come from the store's clock (see `clock.py`): the
    server's on PostgreSQL, this host's (never going backwards) on SQLite, or `clock`, a
    callable returning an aware `datetime`, if given.

    On PostgreSQL psycopg prepares hot statements only on a connection that reaches the
    server directly, never through a pooler (safe behind PgBouncer's transaction
    pooling), unless the URL decides (`?prepare_threshold=N` or `none`); a URL's
    `?options=-csearch_path=…` is checked to have taken effect on every new connection.
    `pool_size` (at least 1) and `max_overflow` (at least 0) size the engine's pool of
    PostgreSQL connections (SQLAlchemy's defaults, 5 and 10, when not given; what to set
    for a gateway: docs/postgresql.md, "Pool and server settings"); on SQLite, whose
    calls keep a connection per thread, giving either is a `ValueError`.

    Raises `SchemaVersionError` for a database newer than this code and
    `SessionStoreError` when the target cannot be opened or migrated; the engine is
    disposed of then. An in-memory database lives as long as the engine and must be used
    from one thread at a time.
    """
    url = _checked_target(target, busy_timeout, synchronous, clock)
    pool = _pool_args(url, pool_size, max_overflow)
    engine = _new_engine(url, busy_timeout=busy_timeout, echo=echo, clock=clock, pool=pool)
    try:
        _set_up(engine, busy_timeout=busy_timeout, synchronous=synchronous, migrate=migrate)
    except BaseException:
        engine.dispose()
        raise
    return engine


async def open_async_database(
    target: str | os.PathLike[str] | URL,
    *,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    synchronous: Synchronous = "NORMAL",
    migrate: bool = True,
    echo: bool = False,
    clock: Clock | None = None,
) -> AsyncEngine:
    """`open_database` for asyncio: the same targets, arguments, checks, pragmas,
    transaction modes and migrations, returning an `AsyncEngine` for
    `AsyncSessionRepository`. Await it: `engine = await open_async_database(path)`.

    The `AsyncEngine` is the application's own (SQLite on aiosqlite, PostgreSQL on
    psycopg's asyncio connection), its connections set up like `open_database`'s. The
    repository's calls run on worker threads over a synchronous engine on the same
    database that comes with it (`asyncbridge.py`), made and migrated here by
    `open_database`'s own code, off the event loop, and disposed of with it. The same
    errors are raised, and both engines are disposed of then. `":memory:"` is the
    repository's database: the `AsyncEngine`'s own connections reach a separate one.
    """
    engine, bridge, steps = _async_store(target, busy_timeout, synchronous, migrate, echo, clock)
    try:
        for step in steps:
            await bridge.run(step)
    except BaseException:
        await engine.dispose()  # the companion with it
        raise
    return engine


def open_async_database_sync(
    target: str | os.PathLike[str] | URL,
    *,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    synchronous: Synchronous = "NORMAL",
    migrate: bool = True,
    echo: bool = False,
    clock: Clock | None = None,
) -> AsyncEngine:
    """`open_async_database` for synchronous code (a constructor, or start-up before
    the event loop runs): the same `AsyncEngine`, set up and migrated on the calling
    thread, which waits meanwhile. The same arguments and errors.

    Dispose of it with `await engine.dispose()`, or from synchronous code with
    `engine.sync_engine.dispose(close=False)` (which also stops the repository's worker
    threads and closes their connections)."""
    engine, _, steps = _async_store(target, busy_timeout, synchronous, migrate, echo, clock)
    try:
        for step in steps:
            step()
    except BaseException:
        engine.sync_engine.dispose(close=False)  # the companion with it
        raise
    return engine


def _async_store(
    target: str | os.PathLike[str] | URL,
    busy_timeout: float,
    synchronous: Synchronous,
    migrate: bool,
    echo: bool,
    clock: Clock | None,
) -> tuple[AsyncEngine, Bridge, list[Callable[[], None]]]:
    """The `AsyncEngine` on `target`, its bridge, and the set-up steps still to run
    (nothing connected yet): the migrations, then for a SQLite file the inline engine's
    warm-up."""
    url = _checked_target(target, busy_timeout, synchronous, clock)
    companion = _new_engine(url, busy_timeout=busy_timeout, echo=echo, clock=clock, pool=_WORKERS)
    try:
        engine = _async_twin(url, companion, echo=echo, synchronous=synchronous)
    except BaseException:
        companion.dispose()
        raise
    from aisopod_session.asyncbridge import attach  # asyncio's modules: only when used

    inline = _inline_twin(companion, synchronous)
    bridge = attach(engine, companion, inline)
    steps: list[Callable[[], None]] = [
        partial(
            _set_up, companion, busy_timeout=busy_timeout, synchronous=synchronous, migrate=migrate
        )
    ]
    if inline is not None:
        # The engine's first connection initialises its dialect (a few queries, some
        # milliseconds), and statements compile on first use: done in set-up, not by
        # the first inline calls.
        steps.append(partial(_warm_up, inline, busy_timeout=busy_timeout))
    return engine, bridge, steps


def companion_engines(engine: AsyncEngine) -> tuple[Engine, Engine | None]:
    """The synchronous engines on `engine`'s database for its repository's calls (the
    companion, and the inline one of a SQLite file), with the store settings `engine`
    carries: for an `AsyncEngine` that `open_async_database` did not make (its schema
    must already be migrated)."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        url = url.set(drivername="sqlite")
    else:
        url = url.set(drivername="postgresql+psycopg")
    companion = _new_engine(
        url,
        busy_timeout=busy_timeout_of(engine.sync_engine),
        echo=False,
        clock=clock_of(engine.sync_engine),
        pool=_WORKERS,
    )
    prepare_engine(companion, busy_timeout=busy_timeout_of(companion))
    return companion, _inline_twin(companion, "NORMAL")


def _warm_up(engine: Engine, *, busy_timeout: float) -> None:
    """Make `engine`'s first connection (its dialect's initialisation) and compile the
    fixed statements for it.

    `engine` is the inline engine, whose connections never wait for a lock: while
    another connection holds one a new connection's first statements fail at once (as
    when the last connection to a WAL file has closed and the next one to open it
    recovers the WAL). Here that is retried within `busy_timeout`, as `open_database`
    would wait, before `DatabaseBusyError`."""
    from aisopod_session.statements import compile_all

    deadline = time.monotonic() + busy_timeout
    pause = 0.001
    with translated_errors(f"open {engine.url.database}"):
        while True:
            try:
                with engine.connect():
                    break
            except OperationalError as exc:
                if exc.orig is None or not is_busy(exc.orig) or time.monotonic() >= deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
    compile_all(engine.dialect)


def _inline_twin(companion: Engine, synchronous: Synchronous) -> Engine | None:
    """For a SQLite file, an engine on it like `companion` whose connections never wait
    for a lock (`busy_timeout` 0) and never checkpoint the WAL, for the inline calls of
    `asyncbridge.py` (which has a worker checkpoint instead); else None."""
    url = companion.url
    if url.get_backend_name() != "sqlite" or _in_memory(url):
        return None
    inline = _new_engine(url, busy_timeout=0, echo=False, clock=clock_of(companion))
    prepare_engine(inline, busy_timeout=0, synchronous=synchronous)
    event.listen(inline, "connect", _no_autocheckpoint)
    return inline


def _no_autocheckpoint(dbapi_connection: Any, _record: Any) -> None:
    # A commit that takes the WAL past 1 000 pages copies them into the database file
    # there and then (milliseconds): not on an event loop.
    dbapi_connection.execute("PRAGMA wal_autocheckpoint = 0")


# The asyncio API's companion engine on PostgreSQL: a pooled connection for each of the
# bridge's worker threads (asyncbridge.POSTGRESQL_WORKERS), kept, rather than SQLAlchemy's
# 5 kept and the rest opened and closed as overflow under load.
_WORKERS = {"pool_size": 8, "max_overflow": 2}


def _pool_args(url: URL, pool_size: Any, max_overflow: Any) -> dict[str, int]:
    """`create_engine`'s pool arguments from `open_database`'s, checked."""
    given = {"pool_size": pool_size, "max_overflow": max_overflow}
    pool = {name: value for name, value in given.items() if value is not None}
    if pool and url.get_backend_name() != "postgresql":
        raise ValueError(
            f"{', '.join(pool)}: PostgreSQL only (a SQLite store keeps one connection per thread)"
        )
    for name, value in pool.items():
        check_int(name, value, minimum=1 if name == "pool_size" else 0)
    return pool


def _new_engine(
    url: URL,
    *,
    busy_timeout: float,
    echo: bool,
    clock: Clock | None,
    pool: dict[str, int] | None = None,
) -> Engine:
    """The store's synchronous engine for `url` (nothing connected yet); `pool` sizes a
    PostgreSQL engine's pool (ignored on SQLite)."""
    if url.get_backend_name() == "postgresql":
        url, connect_args, choose_prepare = _psycopg_url(url)
        engine = create_engine(url, echo=echo, connect_args=connect_args, **(pool or {}))
        _on_connect(engine, choose_prepare=choose_prepare)
        _ping_when_idle(engine)
    else:
        engine = create_engine(url, **_sqlite_engine_args(url, busy_timeout, echo))
    set_store_options(engine, busy_timeout=busy_timeout, clock=clock)
    register(engine)
    return engine


def _async_twin(
    url: URL, companion: Engine, *, echo: bool, synchronous: Synchronous
) -> AsyncEngine:
    """The application's `AsyncEngine` on `url`, `companion`'s database, its connections
    set up the same way (nothing connected yet)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    busy_timeout = busy_timeout_of(companion)
    if url.get_backend_name() == "postgresql":
        url, connect_args, choose_prepare = _psycopg_url(url)
        engine = create_async_engine(url, echo=echo, pool_pre_ping=True, connect_args=connect_args)
        _on_connect(engine.sync_engine, choose_prepare=choose_prepare)
    else:
        engine = create_async_engine(
            url.set(drivername="sqlite+aiosqlite"),
            **_sqlite_engine_args(url, busy_timeout, echo),
        )
    set_store_options(engine.sync_engine, busy_timeout=busy_timeout, clock=clock_of(companion))
    register(engine.sync_engine)
    prepare_engine(engine.sync_engine, busy_timeout=busy_timeout, synchronous=synchronous)
    return engine


def _checked_target(
    target: str | os.PathLike[str] | URL, busy_timeout: float, synchronous: str, clock: Any
) -> URL:
    """The URL of `target`, after checking the arguments every opener takes."""
    check_busy_timeout(busy_timeout)
    if clock is not None and not callable(clock):
        raise ValueError(f"clock: must be a callable returning a datetime, got {clock!r}")
    if synchronous not in ("NORMAL", "FULL"):
        raise ValueError(f"synchronous: must be 'NORMAL' or 'FULL', got {synchronous!r}")
    url = database_url(target)
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise SessionStoreError(
            f"unsupported database {url.get_backend_name()!r}: sessions are stored in "
            "SQLite or PostgreSQL"
        )
    return url


def _sqlite_engine_args(url: URL, busy_timeout: float, echo: bool) -> dict[str, Any]:
    """`create_engine`'s arguments for a SQLite URL; a file's path is checked first."""
    args: dict[str, Any] = {
        "connect_args": {"check_same_thread": False, "timeout": busy_timeout},
        "echo": echo,
    }
    if _in_memory(url):
        # Every connection to ":memory:" would be a new, empty database: share one.
        args["poolclass"] = StaticPool
        # Not rolled back when returned: a call made inside another's transaction (a
        # `check` callback's) returns the one connection while that transaction runs.
        # Every user ends its own (the repository's calls, SQLAlchemy's `Connection`).
        args["pool_reset_on_return"] = None
    else:
        _check_file(Path(str(url.database)))
    return args


def _in_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


AUTO_PREPARE_THRESHOLD = 5
"""psycopg's own default: a statement run this many times on a direct connection is
prepared (see `_on_connect`)."""


def _psycopg_url(url: URL) -> tuple[URL, dict[str, Any], bool]:
    """A PostgreSQL URL on psycopg 3, which must be installed; psycopg's connect
    arguments; and whether each connection is to decide on prepared statements itself
    (the URL's `prepare_threshold` is absent). `?prepare_threshold=N` sets it (psycopg
    would be given the text), `?prepare_threshold=none` turns preparing off."""
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    if url.drivername != "postgresql+psycopg":
        raise SessionStoreError(
            f"unsupported PostgreSQL driver {url.drivername!r}: use postgresql+psycopg://"
        )
    try:
        import psycopg  # noqa: F401 - only to give a clear error when it is missing
    except ImportError:
        raise SessionStoreError(
            "PostgreSQL needs psycopg 3: pip install 'aisopod-session[postgresql]'"
        ) from None
    given = url.query.get("prepare_threshold")
    if given is None:
        # Nothing is prepared until the connection has shown it is not behind a pooler.
        return url, {"prepare_threshold": None}, True
    text = (given if isinstance(given, str) else given[-1]).strip().lower()
    threshold: int | None
    if text in ("none", "off"):
        threshold = None
    elif text.isascii() and text.isdigit() and int(text) <= 2**31 - 1:
        threshold = int(text)
    else:
        raise ValueError(
            f"target: prepare_threshold must be a count of runs (0 or more) or none, got {text!r}"
        )
    url = url.difference_update_query(["prepare_threshold"])
    return url, {"prepare_threshold": threshold}, False


PING_AFTER = 1.0
"""Seconds a pooled PostgreSQL connection of the repository's engine may sit idle and
still be handed out without a ping."""
_IDLE_SINCE = "aisopod_idle_since"


def _ping_when_idle(engine: Engine) -> None:
    """A pooled connection idle for `PING_AFTER` seconds or more is pinged before it is
    handed out, and replaced if the ping fails, so that a gateway's pool outlives server
    restarts and the reaping of idle connections (PgBouncer's `server_idle_timeout`, a
    firewall). SQLAlchemy's `pool_pre_ping` would ping before every call: a second
    round trip for each call (docs/postgresql.md). A connection used within the second
    may still have been cut by a restart: the first call to meet one fails with a
    `SessionStoreError`, its connection is replaced, and every connection checked in
    before that moment is pinged before its next use, so that one call fails, not one
    per pooled connection."""

    def checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    def checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None:
            return  # just connected
        if time.monotonic() - since < PING_AFTER and since > connection_lost_at(engine):
            return  # used a moment ago, and no connection was found cut since
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool closes this connection and hands out a new one.
            raise DisconnectionError(f"a pooled connection failed its ping: {exc}") from exc

    event.listen(engine, "checkin", checked_in)
    event.listen(engine, "checkout", checked_out)


def _on_connect(engine: Engine, *, choose_prepare: bool) -> None:
    """Check every new PostgreSQL connection, in one query, before it is used:

    - its search path: a pooler may drop the URL's `options` (PgBouncer with
      `ignore_startup_parameters = options`), and the connection would then read and
      write the default schema's tables, another tenant's sessions: refused, naming the
      schema;
    - whether it reaches the server directly (the address and port it connected to are
      the server's own): only then, unless the URL decided, does psycopg prepare hot
      statements. Through a pooler (PgBouncer's transaction pooling, a proxy, a NAT, a
      Unix socket) statements prepared under a connection's own names would meet other
      clients' statements on shared server connections.
    """
    wanted = _first_schema(engine.url)
    if wanted is None and not choose_prepare:
        return

    def check(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(
                "SELECT current_schema(), current_setting('search_path'), "
                "host(inet_server_addr()), inet_server_port()"
            )
            schema, setting, server_address, server_port = cursor.fetchone()
        finally:
            cursor.close()
        dbapi_connection.rollback()
        if wanted is not None and schema != wanted:
            dbapi_connection.close()
            raise SessionStoreError(
                f"the URL's search_path names schema {wanted!r}, but the connection's "
                f"current schema is {schema!r} (search_path {setting!r}): the schema does "
                "not exist, or a pooler such as PgBouncer dropped the URL's options "
                "(ignore_startup_parameters); refusing it, so that no other schema's "
                "sessions are read or written (docs/postgresql.md: PgBouncer)"
            )
        if choose_prepare:
            driver = record.driver_connection
            if _direct(driver.info, server_address, server_port):
                driver.prepare_threshold = AUTO_PREPARE_THRESHOLD

    event.listen(engine, "connect", check)


def _direct(info: Any, server_address: str | None, server_port: int | None) -> bool:
    """Whether the client's end of a connection is the server's own: the same address
    and port (no pooler, proxy or translation in between)."""
    if server_address is None or server_port is None:
        return False  # a Unix socket at the server's end: it may be a pooler's
    try:
        client = ipaddress.ip_address(info.hostaddr)
        server = ipaddress.ip_address(server_address)
    except ValueError:
        return False
    return bool(client == server and int(info.port) == int(server_port))


def _first_schema(url: URL) -> str | None:
    """The first schema of the search path set by the URL's `options` (`-csearch_path=…`,
    `-c search_path=…` or `--search_path=…`), as PostgreSQL names it; None if the URL
    sets none (or starts it with `$user`)."""
    given = url.query.get("options")
    if given is None:
        return None
    text = given if isinstance(given, str) else " ".join(given)
    tokens = shlex.split(text)
    value = None
    for index, token in enumerate(tokens):
        if token == "-c" and index + 1 < len(tokens):
            setting = tokens[index + 1]
        elif token.startswith("-c") or token.startswith("--"):
            setting = token[2:]
        else:
            continue
        name, _, found = setting.partition("=")
        if name.strip().lower().replace("-", "_") == "search_path":
            value = found
    if value is None:
        return None
    first = value.split(",")[0].strip()
    if first.startswith('"') and first.endswith('"') and len(first) > 1:
        return first[1:-1].replace('""', '"')
    if not first or first == "$user":
        return None
    return first.lower()


def _set_up(
    engine: Engine, *, busy_timeout: float, synchronous: Synchronous, migrate: bool
) -> None:
    """Check a new engine's database and bring it up to date: SQLite's pragmas and WAL,
    the schema's version, the migrations."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        # The migrator serialises hosts with an advisory lock (see `run_migrations`).
        with translated_errors(f"open {url.render_as_string(hide_password=True)}"):
            applied = check_schema(engine)
            if migrate:
                migrate_from(engine, applied, MIGRATIONS)
        return
    prepare_engine(engine, busy_timeout=busy_timeout, synchronous=synchronous)
    with translated_errors(f"open {url.database}"):
        # A file that is not a database, or a damaged one, fails this first read,
        # which names the file; nothing has been written to it yet.
        with read_transaction(engine) as conn:
            conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar_one()
        # Refuse a newer or edited schema before anything, WAL included, touches the file.
        applied = check_schema(engine)
        # A store this code works on goes to WAL mode (a change stored in the file); one
        # left behind its schema (`migrate=False`: to inspect it, or to be refused, as the
        # command's reading commands refuse it) is not written at all.
        if migrate or version_of(applied) >= SCHEMA_VERSION:
            enable_wal(engine, busy_timeout=busy_timeout)
        if migrate:
            migrate_from(engine, applied, MIGRATIONS)


_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


def database_url(target: str | os.PathLike[str] | URL) -> URL:
    """The SQLAlchemy URL for a path, `":memory:"` or URL (string or object)."""
    if isinstance(target, URL):
        return target
    if isinstance(target, os.PathLike):
        return URL.create("sqlite", database=os.fspath(target))
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target: must be a path, ':memory:' or a URL, got {target!r}")
    if target == ":memory:":
        return URL.create("sqlite", database=":memory:")
    if "://" in target:
        try:
            return make_url(target)
        except Exception as exc:
            # Neither the URL nor SQLAlchemy's message about it is quoted: both may hold
            # the password.
            shown = _PASSWORD.sub(r"\1***@", target)
            raise ValueError(f"target: {shown!r} is not a valid database URL") from exc
    return URL.create("sqlite", database=target)


def _check_file(path: Path) -> None:
    """Refuse, before SQLite touches anything, a path the store could not read and write.

    SQLite would open a read-only file read-only without a word and fail at the first
    write, and report a missing folder as "unable to open database file"; here each case
    gets its own message and nothing is created, changed or deleted.
    """
    if tainted(str(path)):
        raise forked_open_error(str(path))
    if path.is_dir():
        raise SessionStoreError(f"cannot open {path}: it is a folder, not a database file")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SessionStoreError(
            f"cannot open {path}: its folder {folder} is missing and cannot be created "
            f"({exc.strerror or exc})"
        ) from exc
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise SessionStoreError(
            f"cannot open {path}: the file is read-only (or unreadable) for this process; "
            "the session store must read and write it"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SessionStoreError(
            f"cannot open {path}: its folder {folder} is read-only for this process; "
            f"SQLite must create {path.name}-wal and {path.name}-shm beside the database"
        )
