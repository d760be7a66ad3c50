"""The two kinds of transaction the store runs, and how each begins on SQLite.

pysqlite's own transaction handling begins lazily and *deferred*: a transaction that
reads and then writes fails at once with "database is locked" if another connection
wrote in between, and `busy_timeout` cannot help, because SQLite will not upgrade a
stale read snapshot to a write. So `database.py` turns pysqlite's handling off and this
module's `begin` mode decides what to emit: writes take the write lock up front with
`BEGIN IMMEDIATE` (waiting up to `busy_timeout` for it), reads use a deferred `BEGIN`,
which in WAL mode never waits for writers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from sqlalchemy import Connection, Engine

BEGIN_MODE_OPTION = "aisopod_begin_mode"
"""Execution option read by the `begin` listener; absent means `IMMEDIATE`."""

BeginMode = Literal["IMMEDIATE", "DEFERRED"]


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
