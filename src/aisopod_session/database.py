"""`open_database`: the engine, its per-connection pragmas, its transaction mode, and the
migrations, all set up in one call."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from aisopod_session.errors import SessionStoreError, translated_errors
from aisopod_session.migrations import check_schema, run_migrations
from aisopod_session.transactions import begin_listener

DEFAULT_BUSY_TIMEOUT = 5.0
"""Seconds a writer waits for another writer's lock before `DatabaseBusyError`."""

Synchronous = Literal["NORMAL", "FULL"]


def open_database(
    target: str | os.PathLike[str] | URL,
    *,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    synchronous: Synchronous = "NORMAL",
    migrate: bool = True,
    echo: bool = False,
) -> Engine:
    """Open (creating if needed) a session store and return its engine, migrated.

    `target` is a file path (missing parent folders are created), `":memory:"`, or a
    SQLAlchemy URL such as `sqlite:///path/to.db`. Every pooled connection gets
    `foreign_keys=ON`, `busy_timeout` (seconds) and `synchronous` (`NORMAL` survives any
    process crash; `FULL` also the last transactions of a power loss); a file is put in
    WAL mode. Transactions begin `IMMEDIATE` unless the store marks them read-only.
    With `migrate=False` the schema is left as it is (to inspect pending migrations or
    run `run_migrations` yourself); a database newer than this code is refused either way.

    Raises `SchemaVersionError` for a database newer than this code and
    `SessionStoreError` when the target cannot be opened or migrated; the engine is
    disposed of then. An in-memory database lives as long as the engine and must be used
    from one thread at a time.
    """
    if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int | float):
        raise ValueError(f"busy_timeout: must be a number of seconds, got {busy_timeout!r}")
    if not busy_timeout >= 0:
        raise ValueError(f"busy_timeout: must be >= 0 seconds, got {busy_timeout!r}")
    if synchronous not in ("NORMAL", "FULL"):
        raise ValueError(f"synchronous: must be 'NORMAL' or 'FULL', got {synchronous!r}")

    url = database_url(target)
    if url.get_backend_name() != "sqlite":
        raise SessionStoreError(
            f"unsupported database {url.get_backend_name()!r}: this version stores sessions "
            "in SQLite only"
        )
    in_memory = url.database in (None, "", ":memory:")
    engine_args: dict[str, Any] = {
        "connect_args": {"check_same_thread": False, "timeout": busy_timeout},
        "echo": echo,
    }
    if in_memory:
        # Every connection to ":memory:" would be a new, empty database: share one.
        engine_args["poolclass"] = StaticPool
    else:
        with translated_errors(f"create the folder for {url.database}"):
            try:
                Path(str(url.database)).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SessionStoreError(
                    f"cannot create the folder for {url.database}: {exc}"
                ) from exc
    engine = create_engine(url, **engine_args)
    _install_sqlite_settings(engine, busy_timeout=busy_timeout, synchronous=synchronous)
    try:
        with translated_errors(f"open {url.render_as_string(hide_password=True)}"):
            # Refuse a newer or edited schema before anything, WAL included, touches the file.
            check_schema(engine)
            if not in_memory:
                _enable_wal(engine)
            if migrate:
                run_migrations(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


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
            raise ValueError(f"target: {target!r} is not a valid database URL: {exc}") from exc
    return URL.create("sqlite", database=target)


def _install_sqlite_settings(engine: Engine, *, busy_timeout: float, synchronous: str) -> None:
    busy_ms = int(busy_timeout * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _entry: ConnectionPoolEntry) -> None:
        # Hand transaction control to the `begin` listener below (see transactions.py).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # Per-connection settings; foreign_keys is ignored inside a transaction, and
            # none is in progress on a new connection.
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
        finally:
            cursor.close()

    event.listen(engine, "begin", begin_listener)


def _enable_wal(engine: Engine) -> None:
    # journal_mode is stored in the file and cannot change inside a transaction, so it is
    # set once here, on a connection with no transaction open.
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        mode = driver.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise SessionStoreError(
                f"could not put the database in WAL mode (journal_mode is {mode and mode[0]!r})"
            )
