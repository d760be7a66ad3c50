"""Plain-SQL helpers for tests: what a user writing SQL against the seed spec would do."""

from __future__ import annotations

import asyncio
import atexit
import os
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from inspect import iscoroutinefunction
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg
import pytest
from sqlalchemy import Engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.pool import Pool

from aisopod_session import AsyncSessionRepository, SessionRepository

T = TypeVar("T")

SEED_SCHEMA = Path(__file__).with_name("seed_schema.sql")


def python_clock() -> datetime:
    """Python's clock, for `open_database(clock=...)`: freezegun controls it."""
    return datetime.now(UTC)


def stress() -> int:
    """The `AISOPOD_STRESS` environment variable: a positive integer by which randomised
    and load tests multiply their work (default 1, the quick run)."""
    text = os.environ.get("AISOPOD_STRESS", "").strip() or "1"
    try:
        factor = int(text)
    except ValueError:
        factor = 0
    if factor < 1:
        raise ValueError(f"AISOPOD_STRESS must be a positive integer, got {text!r}")
    return factor


def raw_connect(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection, as a user writing SQL against the spec would open."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def run_sql(target: Path | Engine, sql: str, params: Sequence[Any] = ()) -> None:
    """Run one statement (with `?` parameters) as a user writing plain SQL would: on a
    file with plain sqlite3 (autocommit), or on an engine's database through its driver
    (`?` becomes psycopg's `%s`)."""
    if isinstance(target, Engine):
        if target.dialect.name == "postgresql":
            sql = sql.replace("?", "%s")
        with target.begin() as connection:
            connection.exec_driver_sql(sql, tuple(params))
        return
    path = target
    conn = raw_connect(path)
    try:
        conn.execute(sql, params)
    finally:
        conn.close()  # the last connection to close checkpoints the WAL into the file


def refuse_boom(store: Engine) -> None:
    """Make the database itself refuse every new message whose content cell holds
    "boom" (a trigger, as another program could add), with the error "boom refused": for
    tests of what a write leaves when the database fails in its middle."""
    if store.dialect.name == "postgresql":
        run_sql(
            store,
            "CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF position('boom' in NEW.content) > 0 THEN RAISE EXCEPTION 'boom refused'; "
            "END IF; RETURN NEW; END $$",
        )
        run_sql(
            store,
            "CREATE TRIGGER refuse_boom BEFORE INSERT ON messages "
            "FOR EACH ROW EXECUTE FUNCTION refuse_boom()",
        )
    else:
        run_sql(
            store,
            "CREATE TRIGGER refuse_boom BEFORE INSERT ON messages "
            "WHEN instr(NEW.content, 'boom') > 0 BEGIN SELECT RAISE(ABORT, 'boom refused'); END",
        )


def snapshot(target: Path | Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (and, for a SQLite file, the schema), to prove a call
    changed nothing. An engine is read through SQLAlchemy, so on either backend."""
    if isinstance(target, Engine):
        with target.connect() as connection:
            names = sorted(inspect(connection).get_table_names())
            return {
                name: [
                    tuple(row)
                    for row in connection.exec_driver_sql(f'SELECT * FROM "{name}" ORDER BY 1')
                ]
                for name in names
            }
    path = target
    with sqlite3.connect(path) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        # The search index by what it holds, not by its shadow tables' bytes, which
        # depend on how its segments were merged.
        result = {
            table: conn.execute(f'SELECT * FROM "{table}" ORDER BY 1').fetchall()
            for table in tables
            if not table.startswith("messages_fts")
        }
        if "messages_fts" in tables:
            result["messages_fts"] = conn.execute(
                "SELECT rowid, body FROM messages_fts ORDER BY rowid"
            ).fetchall()
        result["sqlite_master"] = conn.execute(
            "SELECT type, name, sql FROM sqlite_master ORDER BY name"
        ).fetchall()
    conn.close()
    return result


RUST_V2 = """
ALTER TABLE sessions ADD COLUMN compaction_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN last_compacted_at TEXT;
ALTER TABLE sessions ADD COLUMN last_compaction_summary TEXT;
"""
"""The Rust crate's schema version 2, typed from its spec (an independent copy of what
migration 2 must do)."""


def make_seed_file(path: Path, *, version: int = 1) -> None:
    """A database made by plain SQL from the seed spec's DDL (and, for `version=2`, the
    Rust crate's version 2), with no schema_version."""
    conn = sqlite3.connect(path)
    conn.executescript(SEED_SCHEMA.read_text())
    if version >= 2:
        conn.executescript(RUST_V2)
    conn.close()


def run_threads(worker: Callable[[int], object], count: int) -> None:
    """Run `worker(0)` … `worker(count - 1)` in threads started together; re-raise the
    first exception any of them raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        barrier.wait()
        try:
            worker(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def count_rows(engine: Engine, table: str) -> int:
    """How many rows `table` holds, on either backend."""
    with engine.connect() as connection:
        return int(connection.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())


POSTGRES_ENV = "AISOPOD_TEST_POSTGRES_URL"


@contextmanager
def store_location(backend: str, folder: Path, *, migrated: bool = False) -> Iterator[str]:
    """Where a test's store lives: a new SQLite file in `folder`, or a new schema of the
    PostgreSQL server named by AISOPOD_TEST_POSTGRES_URL, dropped afterwards. Without that
    variable the PostgreSQL case is skipped, saying so (or fails, under
    AISOPOD_REQUIRE_POSTGRES, as `.ci/run` sets it).

    With `migrated`, a PostgreSQL schema comes already migrated by `open_database` from a
    pool of this process (`_MigratedSchemas`): migrating a new schema costs the server
    about 80 ms, emptying a used one a few."""
    if backend == "sqlite":
        yield str(folder / "sessions.db")
        return
    server = os.environ.get(POSTGRES_ENV)
    if not server:
        reason = f"PostgreSQL not tested: set {POSTGRES_ENV} (.ci/run does)"
        if os.environ.get("AISOPOD_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    if migrated:
        schema = _POOL.take(server)
    else:
        schema = f"test_{uuid.uuid4().hex[:12]}"
        _POOL.admin(server).execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema_url(server, schema)
    finally:
        if not (migrated and _POOL.give_back(server, schema)):
            _POOL.admin(server).execute(f'DROP SCHEMA "{schema}" CASCADE')


def schema_url(server: str, schema: str) -> str:
    """The store URL of `schema` on `server` (its search path set by the URL)."""
    url = make_url(server).set(drivername="postgresql+psycopg")
    url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


_SHAPE = """
SELECT 'c ' || table_name || '.' || column_name || ' ' || data_type || ' '
       || coalesce(column_default, '') || ' ' || is_nullable || ' ' || ordinal_position
  FROM information_schema.columns WHERE table_schema = %(schema)s
UNION ALL
SELECT 'r ' || c.relkind::text || ' ' || c.relname FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(schema)s
UNION ALL
SELECT 'i ' || indexdef FROM pg_indexes WHERE schemaname = %(schema)s
UNION ALL
SELECT 'k ' || conname || ' ' || pg_get_constraintdef(c.oid) FROM pg_constraint c
  JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname = %(schema)s
UNION ALL
SELECT 't ' || tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname = %(schema)s AND NOT t.tgisinternal
UNION ALL
SELECT 'f ' || p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
  WHERE n.nspname = %(schema)s
"""


class _MigratedSchemas:
    """Migrated PostgreSQL schemas for reuse by the tests of this process. One goes back
    to the pool only if its shape (tables, columns, defaults, indexes, constraints,
    triggers, functions and the migration records, schema name aside) is exactly what
    `open_database` made; it is then emptied (DELETE, and the id sequences restarted, so
    ids start at 1 again; TRUNCATE after a test that left many rows). Any other is
    dropped. The pool's schemas are dropped at exit. Its own checks and clean-ups go
    through one connection per process and server, kept open (a new one costs a few
    milliseconds and starts with cold catalogue caches)."""

    def __init__(self) -> None:
        self.idle: list[str] = []
        self.shape: str | None = None
        self.made: list[tuple[str, str]] = []
        self._admin: dict[str, tuple[int, psycopg.Connection[Any]]] = {}

    def admin(self, server: str) -> psycopg.Connection[Any]:
        """This process's kept connection to `server` (a new one after a fork)."""
        kept = self._admin.get(server)
        if kept is not None and kept[0] == os.getpid() and not kept[1].closed:
            return kept[1]
        conn = psycopg.connect(server, autocommit=True)
        # A test that leaves a lock behind must not hang the clean-up: it fails, and
        # the schema is dropped instead.
        conn.execute("SET lock_timeout = '10s'")
        self._admin[server] = (os.getpid(), conn)
        return conn

    def take(self, server: str) -> str:
        if self.idle:
            return self.idle.pop()
        from aisopod_session import open_database

        schema = f"test_{uuid.uuid4().hex[:12]}"
        self.admin(server).execute(f'CREATE SCHEMA "{schema}"')
        if not self.made:
            atexit.register(self._drop_all)
        self.made.append((server, schema))
        open_database(schema_url(server, schema)).dispose()
        if self.shape is None:
            self.shape = self._shape(self.admin(server), schema)
        return schema

    def give_back(self, server: str, schema: str) -> bool:
        """Whether `schema` was emptied and kept for the next test."""
        try:
            conn = self.admin(server)
            if self._shape(conn, schema) != self.shape:
                return False
            with conn.transaction():
                removed = conn.execute(f'DELETE FROM "{schema}".messages').rowcount
                removed += conn.execute(f'DELETE FROM "{schema}".sessions').rowcount
                conn.execute(
                    "SELECT setval(%s, 1, false), setval(%s, 1, false)",
                    (f'"{schema}".messages_id_seq', f'"{schema}".sessions_id_seq'),
                )
            if removed > 1000:
                # Dead rows by the thousand would slow the next tests (no autovacuum).
                conn.execute(f'TRUNCATE "{schema}".messages, "{schema}".sessions')
        except psycopg.Error:
            return False
        self.idle.append(schema)
        return True

    @staticmethod
    def _shape(conn: psycopg.Connection[Any], schema: str) -> str:
        rows = [row[0] for row in conn.execute(_SHAPE, {"schema": schema})]
        rows += [
            f"v {row}"
            for row in conn.execute(
                f'SELECT version, name, checksum FROM "{schema}".schema_version ORDER BY version'
            )
        ]
        return "\n".join(sorted(row.replace(schema, "<schema>") for row in rows))

    def _drop_all(self) -> None:
        for server, schema in self.made:
            with suppress(psycopg.Error):
                self.admin(server).execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


_POOL = _MigratedSchemas()


@contextmanager
def event_loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in its own thread for the block: what a service's loop is to
    its callers. Coroutines go to it with `run_coroutine_threadsafe`, from any thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="event-loop", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def run_on(loop: asyncio.AbstractEventLoop, awaitable: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on `loop` (in its thread) and wait for its result."""
    return asyncio.run_coroutine_threadsafe(awaitable, loop).result()


class AwaitingRepository:
    """An `AsyncSessionRepository` behind `SessionRepository`'s synchronous interface:
    each call runs the real coroutine on one event loop (`event_loop_thread`) and waits
    for it. Calls made from several threads become concurrent tasks on that loop. It lets
    one test body check both APIs; nothing is faked below the async API."""

    def __init__(self, repo: AsyncSessionRepository, loop: asyncio.AbstractEventLoop) -> None:
        self.repo = repo
        self._loop = loop

    @classmethod
    def over(
        cls, repo: AsyncSessionRepository, loop: asyncio.AbstractEventLoop
    ) -> SessionRepository:
        """The wrapper, typed as what the tests take (it answers the same calls)."""
        return cast(SessionRepository, cls(repo, loop))

    def for_agent(self, agent_id: str) -> SessionRepository:
        return AwaitingRepository.over(self.repo.for_agent(agent_id), self._loop)

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.repo, name)
        if not iscoroutinefunction(found):
            if not callable(found):
                return found

            def plain(*args: Any, **kwargs: Any) -> Any:
                result = found(*args, **kwargs)
                if isinstance(result, AsyncIterator):  # `prune_batches`: each step on the loop
                    return self._steps(result)
                return result

            return plain

        def call(*args: Any, **kwargs: Any) -> Any:
            return run_on(self._loop, found(*args, **kwargs))

        return call

    def _steps(self, steps: AsyncIterator[T]) -> Iterator[T]:
        """An async iterator's steps, each awaited on the loop."""

        async def step() -> tuple[bool, T | None]:
            try:
                return True, await anext(steps)
            except StopAsyncIteration:
                return False, None

        while True:
            more, value = run_on(self._loop, step())
            if not more:
                return
            yield cast(T, value)


_WATCHED: list[list[str]] = []
"""The statement lists of the `no_statements` blocks now open (at most one, in practice)."""


def _trace(statement: str) -> None:
    # Cut short: a statement is traced with its values, which may be megabytes of text.
    for ran in _WATCHED:
        ran.append(statement[:200])


@event.listens_for(Pool, "connect")
def _traced(dbapi_connection: Any, _record: Any) -> None:
    # Every SQLite connection any pool of this process opens reports its statements to
    # `no_statements`; the repository's calls run on the driver connection, under
    # SQLAlchemy's execution events, so those would not see them.
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.set_trace_callback(_trace)


@contextmanager
def no_statements() -> Iterator[None]:
    """Fail if, inside the block, any SQLite connection from a pool of this process runs
    a statement, or a PostgreSQL connection is taken from a pool (each call of the
    repository takes one there), from any thread: what a call refuses inside the block it
    refused before any I/O, so the backend cannot change the outcome, and a check of it on
    SQLite stands for PostgreSQL too."""
    ran: list[str] = []

    def checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if not isinstance(dbapi_connection, sqlite3.Connection):
            ran.append("a connection to the server, taken from its pool")

    _WATCHED.append(ran)
    event.listen(Pool, "checkout", checkout)
    try:
        yield
    finally:
        event.remove(Pool, "checkout", checkout)
        _WATCHED.remove(ran)
    assert not ran, f"statements ran before the refusal: {len(ran)}, first {ran[:3]}"


before_io = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
"""For a test of refusals that each run inside `no_statements`: on SQLite alone (still
through both APIs), as nothing it checks reaches the backend."""
