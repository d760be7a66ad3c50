"""PostgreSQL: how many statements and round trips each repository call costs, counted
on the wire (libpq's protocol trace of every pooled connection), not timed.

On the server's clock an append, and the creation of a session, is one statement run as
its own transaction: one round trip. A call of the asyncio API, which must roll back
when it is cancelled before COMMIT, wraps that statement in BEGIN … COMMIT. A pooled
connection is pinged only after sitting idle (`database.PING_AFTER`)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import psycopg
import pytest
from sqlalchemy import Engine, event
from sqlalchemy.pool import Pool

from aisopod_session import (
    AsyncSessionRepository,
    NewMessage,
    Role,
    SessionExistsError,
    SessionKey,
    SessionNotFoundError,
    SessionRepository,
    database,
    open_async_database,
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


def test_an_append_is_one_statement_in_one_round_trip(
    repo: SessionRepository, tracer: Tracer
) -> None:
    assert tracer.count(lambda: repo.append_message(KEY, Role.USER, "hi")) == ONE
    batch = [NewMessage(Role.USER, f"message {n}", meta={"n": n}) for n in range(50)]
    assert tracer.count(lambda: repo.append_messages(KEY, batch, tokens=7)) == ONE
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
    assert tracer.count(lambda: repo.get_or_create(new_key)) == Wire(
        round_trips=2, commands=("SELECT 0", "INSERT 0 1")
    )
    other = SessionKey("agent", "telegram", "bot", "dm", "other")
    assert tracer.count(lambda: repo.create(other)) == Wire(1, ("INSERT 0 1",))
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
    assert tracer.end().commands[0] == "SELECT 0"  # the one statement found nothing
    repo.append_message(KEY, Role.USER, "first", tokens=2**63 - 3)
    with pytest.raises(ValueError, match="tokens"):
        repo.append_message(KEY, Role.USER, "second", tokens=5)
    session = repo.get(KEY)
    assert session is not None
    assert (session.message_count, session.token_usage) == (1, 2**63 - 3)
    assert [m.content for m in repo.get_history(KEY)] == ["first"]


def test_an_async_append_is_one_statement_between_begin_and_commit(
    pg_url: str, pg_store: Engine, tracer: Tracer
) -> None:
    """The asyncio API's call can be cancelled before its COMMIT (docs/async.md), so its
    statement runs inside BEGIN … COMMIT: three round trips."""
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
    assert append.round_trips == 3
    assert append.commands == ("BEGIN", "SET", "SELECT 1", "COMMIT")
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
