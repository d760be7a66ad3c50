"""PostgreSQL under failure: a row lock held by someone else, a connection killed in the
middle of a call, a session deleted while it is being fetched. Every call ends within
its busy timeout with a `SessionStoreError` (the driver error chained as its cause) or
succeeds; none hangs, leaks a raw psycopg error or logs a traceback; the engine goes on
working afterwards."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from aisopod_session import (
    DatabaseBusyError,
    NewMessage,
    Role,
    Session,
    SessionKey,
    SessionRepository,
    SessionStoreError,
    copy_database,
    export_jsonl,
    import_jsonl,
    open_database,
)
from tests.dbtools import snapshot, stress

DEADLINE = 30.0
"""Seconds a call may take before the test calls it hung (far past any busy timeout used
here, so only a call that waits forever reaches it)."""


def plain_connect(url: str) -> psycopg.Connection[Any]:
    """A plain psycopg connection to the store's schema, as another program would open."""
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    return psycopg.connect(conninfo)


@dataclass
class Call:
    """A repository call running in a thread of its own, so that a hang fails the test
    instead of blocking the suite."""

    function: Callable[[], object]
    result: object = None
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.function()
        except BaseException as exc:
            self.error = exc

    def finished(self, timeout: float = DEADLINE) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def session_with_history(engine: Engine, key: SessionKey) -> int:
    """A session with three messages and some metadata; its id."""
    repo = SessionRepository(engine)
    session = repo.get_or_create(key)
    repo.append_messages(key, [NewMessage(Role.USER, f"m{i}") for i in range(3)], tokens=3)
    repo.update_metadata(key, {"lang": "pt"})
    assert session.id is not None
    return session.id


def lock_row(holder: psycopg.Connection[Any], session_id: int) -> None:
    """Lock the session's row in `holder`'s open transaction, as a plain SQL program
    would (`SELECT … FOR UPDATE`)."""
    holder.execute("SELECT id FROM sessions WHERE id = %s FOR UPDATE", (session_id,))


# --- B1: a row lock held past busy_timeout ------------------------------------------------

WRITES: dict[str, Callable[[SessionRepository, SessionKey], object]] = {
    "append_message": lambda r, k: r.append_message(k, Role.USER, "blocked"),
    "append_messages": lambda r, k: r.append_messages(k, [NewMessage(Role.USER, "blocked")]),
    "set_status": lambda r, k: r.set_status(k, "archived"),
    "update_metadata": lambda r, k: r.update_metadata(k, {"blocked": True}),
    "compact": lambda r, k: r.compact(k, keep_last=1, summary="blocked"),
    "reset": lambda r, k: r.reset(k),
    "delete": lambda r, k: r.delete(k),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_a_write_on_a_row_locked_by_another_connection_gives_up_after_busy_timeout(
    pg_url: str, key: SessionKey, write: str
) -> None:
    """A plain connection holds the session's row with `SELECT … FOR UPDATE`: with
    `busy_timeout=0.5` the write raises `DatabaseBusyError` (the driver's lock-timeout
    error as its cause) instead of waiting forever, and writes nothing."""
    engine = open_database(pg_url, busy_timeout=0.5)
    holder = plain_connect(pg_url)
    try:
        session_id = session_with_history(engine, key)
        before = snapshot(engine)
        lock_row(holder, session_id)
        call = Call(lambda: WRITES[write](SessionRepository(engine), key))
        hung = not call.finished()
        holder.rollback()  # releases a hung call too, so that its thread ends
        assert call.finished(), "the call did not end even after the lock was released"
        assert not hung, f"{write} waited more than {DEADLINE} s for the row lock"
        assert isinstance(call.error, DatabaseBusyError), call.error
        assert isinstance(call.error.__cause__, psycopg.Error)
        assert snapshot(engine) == before
    finally:
        holder.close()
        engine.dispose()


def test_a_call_finding_every_pooled_connection_in_use_gives_up_as_busy(
    pg_store: Engine, pg_url: str, key: SessionKey
) -> None:
    """More threads calling at once than the pool holds, each waiting on a lock, leave
    a call without a connection: past the pool's timeout that is a `DatabaseBusyError`
    naming the call (SQLAlchemy's own `TimeoutError` escaped), and the engine works on."""
    engine = create_engine(
        make_url(pg_url).set(drivername="postgresql+psycopg"),
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.2,
    )
    try:
        repo = SessionRepository(engine)
        repo.get_or_create(key)
        held = engine.raw_connection()  # the pool's one connection, checked out
        try:
            with pytest.raises(DatabaseBusyError, match=r"^get: no connection of the engine"):
                repo.get(key)
        finally:
            held.close()
        assert repo.get(key) is not None
    finally:
        engine.dispose()


def test_the_engine_works_normally_once_the_lock_is_released(pg_url: str, key: SessionKey) -> None:
    """A timed-out write leaves no state behind: the same engine appends right after."""
    engine = open_database(pg_url, busy_timeout=0.5)
    holder = plain_connect(pg_url)
    try:
        session_id = session_with_history(engine, key)
        lock_row(holder, session_id)
        call = Call(lambda: SessionRepository(engine).append_message(key, Role.USER, "x"))
        hung = not call.finished()
        holder.rollback()
        assert call.finished()
        assert not hung
        assert isinstance(call.error, DatabaseBusyError), call.error
        repo = SessionRepository(engine)
        repo.append_message(key, Role.USER, "after")
        session = repo.get(key)
        assert session is not None
        assert session.message_count == 4
    finally:
        holder.close()
        engine.dispose()


# --- B2: a connection killed mid-call -----------------------------------------------------


def terminate_backend_blocked_by(admin: psycopg.Connection[Any], holder_pid: int) -> int:
    """Wait until a backend is blocked by `holder_pid`'s locks, terminate it, return its
    pid (what an operator's `pg_terminate_backend`, or a server restart, does to it)."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        row = admin.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND %s = ANY(pg_blocking_pids(pid))",
            (holder_pid,),
        ).fetchone()
        if row is not None:
            pid = int(row[0])
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            return pid
        time.sleep(0.02)
    raise AssertionError("no call ever blocked on the test's lock")


@dataclass
class Killing:
    """The store, a holder of locks, and an autocommit connection to kill backends with."""

    engine: Engine
    holder: psycopg.Connection[Any]
    admin: psycopg.Connection[Any]
    session_id: int


@pytest.fixture
def killing(pg_url: str, key: SessionKey) -> Iterator[Killing]:
    # A busy timeout long enough for the test to find and kill the waiting backend.
    engine = open_database(pg_url, busy_timeout=20)
    holder = plain_connect(pg_url)
    admin = plain_connect(pg_url)
    admin.autocommit = True
    try:
        yield Killing(engine, holder, admin, session_with_history(engine, key))
    finally:
        holder.close()
        admin.close()
        engine.dispose()


def assert_clean_store_error(call: Call, caplog: pytest.LogCaptureFixture) -> None:
    """The call ended with a `SessionStoreError` caused by psycopg's error, and nothing
    logged an error with a traceback (SQLAlchemy's pool does, when it cannot reset a
    dead connection)."""
    assert call.finished(), "the call did not end after its connection was killed"
    assert isinstance(call.error, SessionStoreError), repr(call.error)
    assert isinstance(call.error.__cause__, psycopg.Error), repr(call.error.__cause__)
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert logged == [], [f"{r.name}: {r.getMessage()}" for r in logged]


def test_a_write_whose_connection_is_killed_raises_a_store_error_and_the_engine_recovers(
    killing: Killing, key: SessionKey, caplog: pytest.LogCaptureFixture
) -> None:
    """An append waiting for a row lock loses its connection: it raises a
    `SessionStoreError` (never a raw `psycopg.OperationalError` from the rollback), no
    traceback is logged, and the next call on the same engine works."""
    caplog.set_level(logging.WARNING)
    lock_row(killing.holder, killing.session_id)
    repo = SessionRepository(killing.engine)
    call = Call(lambda: repo.append_message(key, Role.USER, "lost"))
    try:
        terminate_backend_blocked_by(killing.admin, killing.holder.info.backend_pid)
        assert call.finished()
    finally:
        killing.holder.rollback()
    assert_clean_store_error(call, caplog)
    repo.append_message(key, Role.USER, "after")
    assert [m.content for m in repo.get_history(key)] == ["m0", "m1", "m2", "after"]


READS: dict[str, Callable[[SessionRepository, SessionKey], object]] = {
    "get_history": lambda r, k: r.get_history(k),
    "get": lambda r, k: r.get(k),
    "list_sessions": lambda r, k: r.list_sessions(),
}


@pytest.mark.parametrize("read", list(READS))
def test_a_read_whose_connection_is_killed_raises_a_store_error_and_the_engine_recovers(
    killing: Killing, key: SessionKey, caplog: pytest.LogCaptureFixture, read: str
) -> None:
    """A read in flight (held up by a table lock, so that it can be caught in the act)
    loses its connection: a `SessionStoreError`, no traceback logged, and the next read
    on the same engine works."""
    caplog.set_level(logging.WARNING)
    # ACCESS EXCLUSIVE is the one lock a plain read waits for.
    killing.holder.execute("LOCK TABLE sessions, messages IN ACCESS EXCLUSIVE MODE")
    repo = SessionRepository(killing.engine)
    call = Call(lambda: READS[read](repo, key))
    try:
        terminate_backend_blocked_by(killing.admin, killing.holder.info.backend_pid)
        assert call.finished()
    finally:
        killing.holder.rollback()
    assert_clean_store_error(call, caplog)
    assert [m.content for m in repo.get_history(key)] == ["m0", "m1", "m2"]


# --- B3: get_or_create racing delete ------------------------------------------------------


def test_get_or_create_racing_delete_of_the_same_key_always_returns_that_session(
    pg_url: str, key: SessionKey
) -> None:
    """Four threads get_or_create a key while two delete it, for two seconds: no call
    fails (the row may vanish between the insert that found it present and the read that
    follows), and every get_or_create returns a session with that key."""
    engine = open_database(pg_url)
    repo = SessionRepository(engine)
    stop = time.monotonic() + 2.0 * stress()
    errors: list[BaseException] = []
    got: list[Session] = []
    deletes = [0]

    def create() -> None:
        while time.monotonic() < stop:
            try:
                got.append(repo.get_or_create(key))
            except Exception as exc:
                errors.append(exc)

    def delete() -> None:
        while time.monotonic() < stop:
            try:
                if repo.delete(key):
                    deletes[0] += 1
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    threads += [threading.Thread(target=delete) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        assert not any(thread.is_alive() for thread in threads)
        print(f"\n{len(got)} get_or_create calls beside {deletes[0]} deletes, {len(errors)} errors")
        assert errors == [], f"{len(errors)} call(s) failed, the first: {errors[0]!r}"
        assert got
        assert deletes[0] > 0  # the race really happened
        assert all(session.key == key for session in got)
    finally:
        engine.dispose()


def test_copy_and_import_into_a_locked_store_give_up_after_busy_timeout(
    pg_url: str, key: SessionKey, tmp_path: Path
) -> None:
    """copy_database (overwrite=True) and import_jsonl write through SQLAlchemy, not the
    repository's calls: their waits for a row lock are bounded by busy_timeout too."""
    engine = open_database(pg_url, busy_timeout=0.5)
    source = open_database(tmp_path / "source.db")
    holder = plain_connect(pg_url)
    try:
        SessionRepository(source).get_or_create(key)
        SessionRepository(source).append_message(key, Role.USER, "to copy")
        export = io.StringIO()
        export_jsonl(source, export)
        # Without ids, the message is new to the target: importing it recounts the
        # session's messages, an UPDATE of the locked row.
        lines = [json.loads(line) for line in export.getvalue().splitlines()]
        for line in lines:
            if line["type"] == "message":
                del line["id"]
        to_import = [json.dumps(line) for line in lines]
        session_id = session_with_history(engine, key)
        lock_row(holder, session_id)
        for name, function in (
            ("copy_database", lambda: copy_database(source, engine, overwrite=True)),
            ("import_jsonl", lambda: import_jsonl(engine, to_import)),
        ):
            call = Call(function)
            hung = not call.finished()
            assert not hung, f"{name} waited more than {DEADLINE} s for the row lock"
            assert isinstance(call.error, DatabaseBusyError), (name, call.error)
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()
        source.dispose()
