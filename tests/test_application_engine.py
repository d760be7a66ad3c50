"""The application's own use of the engine `open_database` returns (SQLite): its plain
reads, through `engine.connect()` or a SQLModel session, are deferred transactions that
never take the write lock, so they neither stall the repository's writers nor each
other; `write_engine(engine)` is the documented way to do one's own read-then-write; and
the store's own writers (repository, migrations, copy, import) still take the write
lock before their first read."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session as OrmSession
from sqlmodel import col, select

from aisopod_session import (
    SCHEMA_VERSION,
    DatabaseBusyError,
    Role,
    Session,
    SessionKey,
    SessionRepository,
    SessionStatus,
    copy_database,
    export_jsonl,
    import_jsonl,
    open_database,
    run_migrations,
)
from tests.dbtools import raw_connect, run_threads

DEADLINE = 30.0
"""Seconds after which a call waiting in a thread counts as hung."""


class InThread:
    """A call running in a thread of its own; its result or error kept for the test."""

    def __init__(self, function: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self._function = function
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._function()
        except BaseException as exc:
            self.error = exc

    def running_after(self, seconds: float) -> bool:
        self._thread.join(seconds)
        return self._thread.is_alive()

    def outcome(self) -> object:
        """The call's result once it ends (its error re-raised)."""
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), f"the call did not end within {DEADLINE} s"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def quick(db_path: Path) -> Iterator[Engine]:
    """A store whose writers give up after 0.2 s, so that a lock held by mistake fails
    a test at once instead of stalling it."""
    engine = open_database(db_path, busy_timeout=0.2)
    yield engine
    engine.dispose()


@pytest.fixture
def session_id(quick: Engine, key: SessionKey) -> int:
    session = SessionRepository(quick).get_or_create(key)
    assert session.id is not None
    return session.id


# --- C1: the application's reads are deferred ---------------------------------------------


def test_a_read_through_engine_connect_leaves_writers_free(
    quick: Engine, key: SessionKey, session_id: int
) -> None:
    """A long read on `engine.connect()` holds a snapshot, not the write lock: the
    repository appends from another thread while it is open (it used to begin `BEGIN
    IMMEDIATE` and stall every writer until `DatabaseBusyError`)."""
    repo = SessionRepository(quick)
    with quick.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM messages").scalar_one() == 0
        appended = InThread(lambda: repo.append_message(key, Role.USER, "while reading"))
        appended.outcome()
        # Still the same read transaction: its snapshot predates the append.
        assert conn.exec_driver_sql("SELECT count(*) FROM messages").scalar_one() == 0
    assert [m.content for m in repo.get_history(key)] == ["while reading"]


def test_a_read_through_a_sqlmodel_session_leaves_writers_free(
    quick: Engine, key: SessionKey, session_id: int
) -> None:
    """The same for SQLModel's `Session(engine)`, the way an application reads models."""
    repo = SessionRepository(quick)
    with OrmSession(quick) as orm:
        assert [s.id for s in orm.exec(select(Session)).all()] == [session_id]
        appended = InThread(lambda: repo.append_message(key, Role.USER, "while reading"))
        appended.outcome()
    session = repo.get(key)
    assert session is not None
    assert session.message_count == 1


def test_two_plain_readers_open_at_once_in_one_thread_both_read(
    quick: Engine, session_id: int
) -> None:
    """Two `engine.connect()` transactions open together (say, a report paging one query
    while looking things up with another): both read (the second used to wait for the
    first's write lock and fail with `database is locked`)."""
    with quick.connect() as first, quick.connect() as second:
        assert first.exec_driver_sql("SELECT count(*) FROM sessions").scalar_one() == 1
        assert second.exec_driver_sql("SELECT count(*) FROM sessions").scalar_one() == 1
        assert first.exec_driver_sql("SELECT id FROM sessions").scalar_one() == session_id


def test_two_sqlmodel_sessions_open_at_once_in_one_thread_both_read(
    quick: Engine, session_id: int
) -> None:
    """The same with two SQLModel sessions."""
    with OrmSession(quick) as first, OrmSession(quick) as second:
        assert [s.id for s in first.exec(select(Session)).all()] == [session_id]
        assert [s.id for s in second.exec(select(Session)).all()] == [session_id]


# --- C2: write_engine, the application's own read-then-write ------------------------------


def test_write_engine_is_an_engine_on_the_same_pool(quick: Engine) -> None:
    """`write_engine(engine)` adds no connections of its own: it shares the pool."""
    from aisopod_session import write_engine

    writing = write_engine(quick)
    assert isinstance(writing, Engine)
    assert writing.pool is quick.pool
    assert writing.url == quick.url


def bump_counter(writing: Engine, session_id: int) -> None:
    """The application's read-increment-write of a counter in a session's metadata."""
    with OrmSession(writing) as orm:
        row = orm.exec(select(Session).where(col(Session.id) == session_id)).one()
        row.meta = {**row.meta, "counter": row.meta.get("counter", 0) + 1}
        row.status = SessionStatus.ACTIVE
        orm.add(row)
        orm.commit()


def test_read_increment_write_through_write_engine_loses_no_update(
    db_path: Path, key: SessionKey
) -> None:
    """8 threads each increment a metadata counter 50 times through
    `Session(write_engine(engine))` while 2 threads append through the repository: the
    counter ends at exactly 400, every message is there, and no call fails with
    `database is locked`."""
    from aisopod_session import write_engine

    engine = open_database(db_path)
    try:
        repo = SessionRepository(engine)
        session = repo.get_or_create(key)
        assert session.id is not None
        session_id = session.id
        writing = write_engine(engine)

        def work(index: int) -> None:
            for turn in range(50):
                if index < 8:
                    bump_counter(writing, session_id)
                else:
                    repo.append_message(key, Role.USER, f"{index}/{turn}")

        run_threads(work, 10)
        after = repo.get(key)
        assert after is not None
        assert after.meta == {"counter": 400}
        assert after.message_count == 100
        assert len(repo.get_history(key)) == 100
    finally:
        engine.dispose()


def test_a_write_engine_session_holds_the_lock_from_its_first_read(
    db_path: Path, key: SessionKey
) -> None:
    """Why it is safe: its transaction takes the write lock before reading, so a writer
    that comes in between waits for its commit instead of invalidating what it read."""
    from aisopod_session import write_engine

    engine = open_database(db_path)  # writers wait up to 5 s: long enough to see it wait
    try:
        repo = SessionRepository(engine)
        session_id = repo.get_or_create(key).id
        with OrmSession(write_engine(engine)) as orm:
            row = orm.exec(select(Session).where(col(Session.id) == session_id)).one()
            appended = InThread(lambda: repo.append_message(key, Role.USER, "meanwhile"))
            assert appended.running_after(0.3)  # waiting for our lock
            row.meta = {"seen_messages": row.message_count}
            orm.add(row)
            orm.commit()
        appended.outcome()
        after = repo.get(key)
        assert after is not None
        assert after.meta == {"seen_messages": 0}
        assert after.message_count == 1
    finally:
        engine.dispose()


def test_a_plain_sqlmodel_session_cannot_write_after_another_writer_committed(
    quick: Engine, key: SessionKey, session_id: int
) -> None:
    """What the docs warn against: a plain `Session(engine)` reads on a snapshot, and if
    another writer commits before it writes, SQLite refuses its write with `database is
    locked` at once (busy_timeout cannot help a stale snapshot). Deterministic here: the
    other write is made, and committed, between the read and the write."""
    repo = SessionRepository(quick)
    with OrmSession(quick) as orm:
        row = orm.exec(select(Session).where(col(Session.id) == session_id)).one()
        repo.append_message(key, Role.USER, "in between")  # commits at once
        row.meta = {"seen_messages": row.message_count}
        orm.add(row)
        with pytest.raises(OperationalError, match="database is locked"):
            orm.commit()
    after = repo.get(key)
    assert after is not None
    assert (after.meta, after.message_count) == ({}, 1)


# --- C3: the store's own writers take the lock up front -------------------------------------


@pytest.fixture
def file_writer(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to the store's file, with a table of its own to write
    to (created before the store's engine is opened by the test)."""
    conn = raw_connect(db_path)
    conn.execute("CREATE TABLE IF NOT EXISTS app_notes (note TEXT)")
    yield conn
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


def test_a_repository_write_waits_for_the_write_lock_and_gives_up_after_busy_timeout(
    file_writer: sqlite3.Connection, quick: Engine, key: SessionKey, session_id: int
) -> None:
    """While another program holds `BEGIN IMMEDIATE`, `append_message` waits
    `busy_timeout` (0.2 s) and raises `DatabaseBusyError`; nothing is written."""
    file_writer.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DatabaseBusyError):
            SessionRepository(quick).append_message(key, Role.USER, "blocked")
    finally:
        file_writer.execute("ROLLBACK")
    session = SessionRepository(quick).get(key)
    assert session is not None
    assert session.message_count == 0


def while_another_writer_commits(
    file_writer: sqlite3.Connection, call: Callable[[], object]
) -> object:
    """Run `call` in a thread while `file_writer` holds the write lock with a change of
    its own, which it commits 0.3 s later. A call that takes the write lock before its
    first read waits and then succeeds; one that read first would hold a snapshot older
    than that commit, and SQLite would refuse its write with `database is locked`."""
    file_writer.execute("BEGIN IMMEDIATE")
    file_writer.execute("INSERT INTO app_notes (note) VALUES ('written meanwhile')")
    running = InThread(call)
    time.sleep(0.3)  # the call is now waiting for the lock (or has read, if deferred)
    file_writer.execute("COMMIT")
    return running.outcome()


def test_update_metadata_takes_the_write_lock_before_reading(
    file_writer: sqlite3.Connection, db_path: Path, key: SessionKey
) -> None:
    """`update_metadata` reads the metadata, then writes the merge: the lock comes first."""
    engine = open_database(db_path)
    try:
        repo = SessionRepository(engine)
        repo.get_or_create(key)
        while_another_writer_commits(file_writer, lambda: repo.update_metadata(key, {"a": 1}))
        session = repo.get(key)
        assert session is not None
        assert session.meta == {"a": 1}
    finally:
        engine.dispose()


def test_migrations_take_the_write_lock_before_reading_the_version(
    file_writer: sqlite3.Connection, db_path: Path
) -> None:
    """The migrator reads `schema_version`, then applies what is missing."""
    engine = open_database(db_path, migrate=False)
    try:
        assert while_another_writer_commits(file_writer, lambda: run_migrations(engine)) == (
            SCHEMA_VERSION
        )
    finally:
        engine.dispose()


def test_import_takes_the_write_lock_before_reading(
    file_writer: sqlite3.Connection, db_path: Path, tmp_path: Path, key: SessionKey
) -> None:
    """An import batch reads which ids and sessions exist, then inserts."""
    source = open_database(tmp_path / "source.db")
    target = open_database(db_path)
    try:
        SessionRepository(source).get_or_create(key)
        SessionRepository(source).append_message(key, Role.USER, "exported")
        out = io.StringIO()
        export_jsonl(source, out)
        lines = out.getvalue().splitlines()
        result = while_another_writer_commits(file_writer, lambda: import_jsonl(target, lines))
        assert getattr(result, "errors", None) == []
        assert [m.content for m in SessionRepository(target).get_history(key)] == ["exported"]
    finally:
        source.dispose()
        target.dispose()


def test_copy_takes_the_write_lock_on_the_target_before_reading_it(
    file_writer: sqlite3.Connection, db_path: Path, tmp_path: Path, key: SessionKey
) -> None:
    """`copy_database` counts the target's sessions, then (with `overwrite=True`)
    deletes them and writes the copy."""
    source = open_database(tmp_path / "source.db")
    target = open_database(db_path)
    try:
        SessionRepository(source).get_or_create(key)
        SessionRepository(source).append_message(key, Role.USER, "copied")
        SessionRepository(target).get_or_create(SessionKey("old", "c", "a", "dm", "p"))
        while_another_writer_commits(
            file_writer, lambda: copy_database(source, target, overwrite=True)
        )
        assert [s.key for s in SessionRepository(target).list_sessions()] == [key]
        assert [m.content for m in SessionRepository(target).get_history(key)] == ["copied"]
    finally:
        source.dispose()
        target.dispose()
