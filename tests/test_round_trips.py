"""PostgreSQL: how many statements and round trips each repository call costs, counted
on the wire (libpq's protocol trace of every pooled connection), not timed.

On the server's clock an append, and the creation of a session, is one statement in its
write transaction: `BEGIN …; SET LOCAL lock_timeout` (one round trip, so that every lock
the statement waits for, its tables' too, is waited for at most `busy_timeout`), the
statement, COMMIT. A read is one statement, one round trip. A pooled connection is
pinged only after sitting idle (`database.PING_AFTER`), or after another connection of
the pool was found cut."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import psycopg
import pytest
from sqlalchemy import Engine, event, make_url
from sqlalchemy.pool import Pool

from aisopod_session import (
    AsyncSessionRepository,
    DatabaseBusyError,
    NewMessage,
    Role,
    SessionExistsError,
    SessionKey,
    SessionNotFoundError,
    SessionRepository,
    SessionStoreError,
    database,
    open_async_database,
    open_database,
)

KEY = SessionKey("agent", "telegram", "bot", "dm", "peer")
SERVER_URL = os.environ.get("AISOPOD_TEST_POSTGRES_URL", "")


@dataclass(frozen=True)
class Wire:
    """What one call sent: the round trips (each answered by ReadyForQuery) and the
    server's command tags, in order (an empty query, a ping, has none)."""

    round_trips: int
    commands: tuple[str, ...]


class Tracer:
    """Traces every psycopg connection that any pool opens from now on (a listener on
    SQLAlchemy's `Pool` class), and counts what a call puts on the wire."""

    def __init__(self) -> None:
        self.connections: list[Any] = []
        self.file: IO[bytes] | None = None
        event.listen(Pool, "connect", self._connected)

    def close(self) -> None:
        event.remove(Pool, "connect", self._connected)
        self._stop()

    def _connected(self, dbapi_connection: Any, _record: Any) -> None:
        if isinstance(dbapi_connection, psycopg.Connection):
            self.connections.append(dbapi_connection)
            if self.file is not None:
                self._trace(dbapi_connection)

    def _trace(self, connection: psycopg.Connection[Any]) -> None:
        assert self.file is not None
        connection.pgconn.trace(self.file.fileno())
        connection.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)

    def _stop(self) -> None:
        for connection in self.connections:
            if not connection.closed:
                connection.pgconn.untrace()  # flushes its trace

    def begin(self) -> None:
        """Start counting, on every connection open now or opened until `end`."""
        self.file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by `end`
        for connection in self.connections:
            if not connection.closed:
                self._trace(connection)

    def end(self) -> Wire:
        """What went on the wire since `begin`."""
        assert self.file is not None
        self._stop()
        self.file.seek(0)
        lines = self.file.read().decode(errors="replace").splitlines()
        self.file.close()
        self.file = None
        fields = [line.split("\t") for line in lines]
        return Wire(
            round_trips=sum(1 for f in fields if f[0] == "B" and f[2] == "ReadyForQuery"),
            commands=tuple(
                f[3].strip().strip('"') for f in fields if f[0] == "B" and f[2] == "CommandComplete"
            ),
        )

    def count(self, call: Callable[[], object]) -> Wire:
        """What `call` sent and received on every connection it used."""
        self.begin()
        try:
            call()
        finally:
            wire = self.end()
        return wire


@pytest.fixture
def tracer() -> Iterator[Tracer]:
    tracing = Tracer()
    try:
        yield tracing
    finally:
        tracing.close()


@pytest.fixture
def repo(pg_store: Engine, tracer: Tracer) -> SessionRepository:
    """A repository on the server's clock, its connections opened under `tracer`."""
    pg_store.dispose()  # the migration's connections were opened before the tracer
    repository = SessionRepository(pg_store)
    repository.get_or_create(KEY)  # a connection in the pool, used a moment ago
    return repository


ONE = Wire(round_trips=1, commands=("SELECT 1",))
WRITE = Wire(round_trips=3, commands=("BEGIN", "SET", "SELECT 1", "COMMIT"))


def test_an_append_is_one_statement_in_its_write_transaction(
    repo: SessionRepository, tracer: Tracer
) -> None:
    """Before: BEGIN, the row lock, the counters, the insert, COMMIT (five round trips)."""
    assert tracer.count(lambda: repo.append_message(KEY, Role.USER, "hi")) == WRITE
    batch = [NewMessage(Role.USER, f"message {n}", meta={"n": n}) for n in range(50)]
    assert tracer.count(lambda: repo.append_messages(KEY, batch, tokens=7)) == WRITE
    session = repo.get(KEY)
    assert session is not None
    assert (session.message_count, session.token_usage, session.status.value) == (51, 7, "active")
    history = repo.get_history(KEY)
    assert [m.content for m in history] == ["hi", *(f"message {n}" for n in range(50))]
    ids = [m.id for m in history]
    assert ids == sorted(i for i in ids if i is not None)
    # Every message of a batch has the one stamp, read after the row lock.
    assert len({m.created_at for m in history[1:]}) == 1
    assert history[0].created_at < history[1].created_at <= session.updated_at


def test_reads_and_creations_are_one_round_trip_each(
    repo: SessionRepository, tracer: Tracer
) -> None:
    assert tracer.count(lambda: repo.get_or_create(KEY)) == ONE
    assert tracer.count(lambda: repo.get_history(KEY, limit=50)) == ONE
    new_key = SessionKey("agent", "telegram", "bot", "dm", "new")
    # A new key: the read that finds nothing, then the insert (stamped by the server).
    created = Wire(round_trips=3, commands=("BEGIN", "SET", "INSERT 0 1", "COMMIT"))
    assert tracer.count(lambda: repo.get_or_create(new_key)) == Wire(
        round_trips=1 + created.round_trips, commands=("SELECT 0", *created.commands)
    )
    other = SessionKey("agent", "telegram", "bot", "dm", "other")
    assert tracer.count(lambda: repo.create(other)) == created
    with pytest.raises(SessionExistsError):
        repo.create(other)


def test_a_refused_append_takes_the_careful_path_and_writes_nothing(
    repo: SessionRepository, tracer: Tracer
) -> None:
    """No session, or no room in a counter: the one statement writes nothing, and the
    steps under the row lock say which (the same errors as before)."""
    missing = SessionKey("agent", "telegram", "bot", "dm", "missing")
    tracer.begin()
    with pytest.raises(SessionNotFoundError):
        repo.append_message(missing, Role.USER, "x")
    assert tracer.end().commands[2] == "SELECT 0"  # the one statement found nothing
    repo.append_message(KEY, Role.USER, "first", tokens=2**63 - 3)
    with pytest.raises(ValueError, match="tokens"):
        repo.append_message(KEY, Role.USER, "second", tokens=5)
    session = repo.get(KEY)
    assert session is not None
    assert (session.message_count, session.token_usage) == (1, 2**63 - 3)
    assert [m.content for m in repo.get_history(KEY)] == ["first"]


def test_an_async_append_has_the_same_shape(pg_url: str, pg_store: Engine, tracer: Tracer) -> None:
    """The asyncio API runs the same calls on its worker threads: the same statements
    (its COMMIT is where a cancellation is honoured, docs/async.md)."""
    SessionRepository(pg_store).get_or_create(KEY)

    async def main() -> tuple[Wire, Wire]:
        engine = await open_async_database(pg_url)
        repository = AsyncSessionRepository(engine)
        try:
            await repository.append_message(KEY, Role.USER, "warm-up")
            tracer.begin()
            await repository.append_message(KEY, Role.USER, "hi")
            append = tracer.end()
            tracer.begin()
            await repository.get_or_create(KEY)
            return append, tracer.end()
        finally:
            await engine.dispose()

    append, read = asyncio.run(main())
    assert append == WRITE
    assert read == ONE


def test_an_idle_connection_is_pinged_and_a_dead_one_replaced(
    repo: SessionRepository, tracer: Tracer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection used within `PING_AFTER` is handed out as it is; one idle longer is
    pinged first (an empty query), and if its server process is gone (a restart, an
    idle-connection reaper), the pool replaces it and the call works."""
    monkeypatch.setattr(database, "PING_AFTER", 0.2)
    assert tracer.count(lambda: repo.get(KEY)) == ONE
    time.sleep(0.3)
    assert tracer.count(lambda: repo.get(KEY)) == Wire(round_trips=2, commands=("SELECT 1",))
    pids = [c.info.backend_pid for c in tracer.connections if not c.closed]
    with psycopg.connect(SERVER_URL, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    time.sleep(0.3)
    repo.append_message(KEY, Role.USER, "after the restart")
    assert [m.content for m in repo.get_history(KEY)] == ["after the restart"]


@pytest.mark.parametrize("table", ["messages", "sessions"])
def test_a_table_lock_is_waited_for_at_most_busy_timeout(
    pg_url: str, pg_store: Engine, table: str
) -> None:
    """Another program holds a lock on a whole table (as `CREATE INDEX`, `VACUUM FULL`
    or another host's migration do): an append or a creation gives up after
    `busy_timeout` with `DatabaseBusyError`, writing nothing. The statement takes its
    tables' locks before it runs, so `lock_timeout` is set by the statement before it."""
    SessionRepository(pg_store).get_or_create(KEY)
    engine = open_database(pg_url, busy_timeout=0.5)
    repo = SessionRepository(engine)
    schema = str(make_url(pg_url).query["options"]).split("=")[-1]
    try:
        with psycopg.connect(SERVER_URL) as holder:
            holder.execute(f"SET search_path = {schema}")
            holder.execute(f"LOCK TABLE {table} IN SHARE MODE")
            # Released after 3 s whatever happens: a call that waited for it (with no
            # limit) then goes through, and the test fails instead of hanging.
            release = threading.Timer(3, holder.rollback)
            release.start()
            started = time.monotonic()
            with pytest.raises(DatabaseBusyError):
                repo.append_message(KEY, Role.USER, "waits")
            if table == "sessions":  # a creation writes no message
                with pytest.raises(DatabaseBusyError):
                    repo.create(SessionKey("agent", "telegram", "bot", "dm", "new"))
            assert time.monotonic() - started < 3
            release.cancel()
            holder.rollback()
        assert repo.get_history(KEY) == []
        assert repo.get(SessionKey("agent", "telegram", "bot", "dm", "new")) is None
    finally:
        engine.dispose()


def test_writes_hold_on_a_server_whose_default_isolation_is_serializable(
    pg_url: str, pg_store: Engine
) -> None:
    """A database or role may make `serializable` the default; the store's writes ask
    for READ COMMITTED themselves (they lock the rows they change and read them after
    the lock), so concurrent appends to one session still all succeed, counted exactly."""
    url = make_url(pg_url)
    options = f"{url.query['options']} -cdefault_transaction_isolation=serializable"
    engine = open_database(url.update_query_dict({"options": options}))
    repo = SessionRepository(engine)
    try:
        repo.get_or_create(KEY)

        def append_some() -> None:
            for n in range(15):
                repo.append_message(KEY, Role.USER, f"{n}", tokens=1)

        workers = [threading.Thread(target=append_some) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        session = repo.get(KEY)
        assert session is not None
        assert (session.message_count, session.token_usage) == (60, 60)
        assert len(repo.get_history(KEY)) == 60
    finally:
        engine.dispose()


def test_after_a_restart_one_call_fails_not_one_per_pooled_connection(
    repo: SessionRepository, tracer: Tracer
) -> None:
    """Every pooled connection cut at once, each used a moment ago (under `PING_AFTER`):
    the first call to meet one fails with a `SessionStoreError`, and every connection
    checked in before then is pinged (and replaced) before its next use."""
    barrier = threading.Barrier(4)

    def hold_one() -> None:  # four calls at once: four connections in the pool
        barrier.wait()
        repo.append_message(KEY, Role.USER, "before")

    workers = [threading.Thread(target=hold_one) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    alive = [c for c in tracer.connections if not c.closed]
    assert len(alive) >= 2
    with psycopg.connect(SERVER_URL, autocommit=True) as admin:
        for connection in alive:
            admin.execute("SELECT pg_terminate_backend(%s)", (connection.info.backend_pid,))
    outcomes = []
    for _ in range(6):
        try:
            repo.get(KEY)
            outcomes.append("ok")
        except SessionStoreError:
            outcomes.append("failed")
    assert outcomes == ["failed", *["ok"] * 5]


def test_a_compaction_is_one_transaction_of_five_statements(
    repo: SessionRepository, tracer: Tracer
) -> None:
    """Lock and stamp, find the cut, delete, write the summary in the place of the newest
    removed message (its id: so not in the delete's statement, whose sub-statements
    PostgreSQL runs in no set order), record the compaction."""
    repo.append_messages(KEY, [NewMessage(Role.USER, f"m{n}") for n in range(5)])
    wire = tracer.count(lambda: repo.compact(KEY, keep_last=2, summary="so far"))
    assert wire == Wire(
        round_trips=7,
        commands=(
            "BEGIN",
            "SET",
            "SELECT 1",
            "SELECT 1",
            "DELETE 3",
            "INSERT 0 1",
            "UPDATE 1",
            "COMMIT",
        ),
    )
    assert [m.content for m in repo.get_history(KEY)] == ["so far", "m3", "m4"]
