"""open_database: targets, per-connection pragmas, WAL, and the transaction mode."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import QueuePool

from aisopod_session import (
    SCHEMA_VERSION,
    DatabaseBusyError,
    Role,
    SessionKey,
    SessionRepository,
    SessionStoreError,
    open_database,
    run_migrations,
)
from aisopod_session.transactions import read_transaction, write_transaction
from tests.dbtools import run_threads, snapshot


def pragmas(engine: Engine, connections: int = 3) -> list[tuple[int, int, int]]:
    """foreign_keys, busy_timeout and synchronous of connections checked out at once."""
    conns = [engine.raw_connection() for _ in range(connections)]
    try:
        return [
            (
                conn.execute("PRAGMA foreign_keys").fetchone()[0],
                conn.execute("PRAGMA busy_timeout").fetchone()[0],
                conn.execute("PRAGMA synchronous").fetchone()[0],
            )
            for conn in (c.driver_connection for c in conns)
            if conn is not None
        ]
    finally:
        for conn in conns:
            conn.close()


def test_every_pooled_connection_gets_the_pragmas(engine: Engine) -> None:
    # synchronous: 1 is NORMAL.
    assert pragmas(engine) == [(1, 5000, 1)] * 3


def test_busy_timeout_and_synchronous_are_settable(db_path: Path) -> None:
    engine = open_database(db_path, busy_timeout=0.25, synchronous="FULL")
    assert pragmas(engine) == [(1, 250, 2)] * 3
    engine.dispose()


def test_file_is_in_wal_mode(engine: Engine, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


@pytest.mark.parametrize("kind", ["str", "pathlike", "url"])
def test_targets_create_missing_parent_folders(tmp_path: Path, kind: str, key: SessionKey) -> None:
    path = tmp_path / "deep" / "er" / "store.db"
    targets: dict[str, str | Path] = {
        "str": str(path),
        "pathlike": path,
        "url": f"sqlite:///{path}",
    }
    target = targets[kind]
    engine = open_database(target)
    SessionRepository(engine).get_or_create(key)
    engine.dispose()
    assert path.is_file()
    reopened = open_database(path)
    assert SessionRepository(reopened).get(key) is not None
    reopened.dispose()


def test_memory_database_keeps_its_data_for_the_engines_life(key: SessionKey) -> None:
    engine = open_database(":memory:")
    repo = SessionRepository(engine)
    repo.get_or_create(key)
    repo.append_message(key, Role.USER, "hi")
    assert [m.content for m in repo.get_history(key)] == ["hi"]
    assert pragmas(engine, connections=1) == [(1, 5000, 1)]
    engine.dispose()


@pytest.mark.parametrize("busy_timeout", [-1, "5", True, float("nan")])
def test_bad_busy_timeout_is_refused(db_path: Path, busy_timeout: object) -> None:
    with pytest.raises(ValueError, match="busy_timeout"):
        open_database(db_path, busy_timeout=busy_timeout)  # type: ignore[arg-type]
    assert not db_path.exists()


def test_bad_synchronous_is_refused(db_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        open_database(db_path, synchronous="OFF")  # type: ignore[arg-type]


@pytest.mark.parametrize("target", ["", "   ", "not a url://x"])
def test_bad_targets_are_refused(target: str) -> None:
    with pytest.raises(ValueError, match="target"):
        open_database(target)


def test_other_backends_are_refused_clearly() -> None:
    with pytest.raises(SessionStoreError, match="unsupported database 'mysql'"):
        open_database("mysql://user@localhost/db")


def test_writes_wait_for_the_lock_then_fail_clearly_with_nothing_written(
    repo: SessionRepository, db_path: Path, key: SessionKey
) -> None:
    repo.get_or_create(key)
    impatient = open_database(db_path, busy_timeout=0.1)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DatabaseBusyError, match=r"append_messages.*locked"):
            SessionRepository(impatient).append_message(key, Role.USER, "lost?")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        impatient.dispose()
    assert repo.get_history(key) == []
    assert repo.get_or_create(key).message_count == 0


def test_reads_do_not_wait_for_a_writer(
    repo: SessionRepository, db_path: Path, key: SessionKey
) -> None:
    repo.get_or_create(key)
    repo.append_message(key, Role.USER, "committed")
    reader = SessionRepository(open_database(db_path, busy_timeout=0.05))
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    blocker.execute("UPDATE sessions SET message_count = 99")
    blocker.execute("DELETE FROM messages")
    try:
        # A 50 ms busy timeout would fail if reading waited for the lock.
        assert [m.content for m in reader.get_history(key)] == ["committed"]
        session = reader.get(key)
        assert session is not None
        assert session.message_count == 1
        assert reader.count_sessions() == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        reader.engine.dispose()


def test_write_transactions_take_the_lock_up_front(engine: Engine, db_path: Path) -> None:
    other = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    with write_transaction(engine) as conn:
        conn.execute(text("SELECT 1"))  # no write yet, but the lock is ours
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    with read_transaction(engine) as conn:
        conn.execute(text("SELECT count(*) FROM sessions"))
        other.execute("BEGIN IMMEDIATE")  # a reader leaves the lock free
        other.execute("ROLLBACK")
    other.close()


def test_a_read_transaction_sees_one_snapshot_on_either_backend(
    store: Engine, key: SessionKey
) -> None:
    """What another connection commits while a read transaction is open stays out of
    all of its statements (on PostgreSQL too, whose default READ COMMITTED would show it
    to the next statement), and the next read transaction sees it."""
    repo = SessionRepository(store)
    repo.get_or_create(key)
    repo.append_message(key, Role.USER, "before", tokens=1)
    counts = "SELECT (SELECT count(*) FROM messages), (SELECT sum(token_usage) FROM sessions)"
    with read_transaction(store) as conn:
        assert tuple(conn.execute(text(counts)).one()) == (1, 1)
        # Another connection of the same engine (the repository's own) commits meanwhile.
        repo.append_message(key, Role.USER, "during", tokens=2)
        assert conn.execute(text("SELECT count(*) FROM messages")).scalar_one() == 1
        assert conn.execute(text("SELECT sum(token_usage) FROM sessions")).scalar_one() == 1
    with read_transaction(store) as conn:
        assert tuple(conn.execute(text(counts)).one()) == (2, 3)


def test_a_failed_write_transaction_rolls_back_everything(engine: Engine, db_path: Path) -> None:
    before = snapshot(db_path)

    def insert_then_fail() -> None:
        with write_transaction(engine) as conn:
            conn.execute(
                text(
                    "INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id, "
                    "created_at, updated_at) VALUES ('a', 'c', 'x', 'dm', 'p', 't', 't')"
                )
            )
            raise RuntimeError("half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        insert_then_fail()
    assert snapshot(db_path) == before


def test_concurrent_metadata_merges_lose_no_update(
    repo: SessionRepository, key: SessionKey
) -> None:
    # update_metadata reads, merges in Python and writes: only a transaction that holds
    # the write lock from its first read keeps every thread's key.
    repo.get_or_create(key)

    def merge(worker: int) -> None:
        for round_ in range(25):
            repo.update_metadata(key, {f"w{worker}-{round_}": round_})

    run_threads(merge, 6)
    session = repo.get(key)
    assert session is not None
    assert len(session.meta) == 6 * 25


def hold_write_lock(path: Path, seconds: float) -> threading.Thread:
    """A legacy writer in rollback-journal mode holding the write lock for a while."""
    ready = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE legacy (x)")
        ready.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    ready.wait()
    return thread


def test_switching_to_wal_waits_for_a_writer_in_rollback_mode(db_path: Path) -> None:
    # SQLite refuses the switch at once ("locked") without calling the busy handler while
    # another connection holds the write lock; open_database must wait instead.
    holder = hold_write_lock(db_path, 0.3)
    engine = open_database(db_path)
    holder.join()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_switching_to_wal_gives_up_after_the_busy_timeout(db_path: Path) -> None:
    holder = hold_write_lock(db_path, 1.0)
    try:
        with pytest.raises(DatabaseBusyError, match="WAL"):
            open_database(db_path, busy_timeout=0.1)
    finally:
        holder.join()


def test_a_file_opened_without_migrating_goes_to_wal_once_run_migrations_migrates_it(
    db_path: Path,
) -> None:
    """`open_database(migrate=False)` writes nothing to a file behind the schema (a new
    one stays empty, in no journal mode of its own); `run_migrations` on that engine
    migrates it and puts it in WAL mode, as `open_database` would have."""
    engine = open_database(db_path, migrate=False)
    try:
        assert db_path.stat().st_size == 0
        assert run_migrations(engine) == SCHEMA_VERSION
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


def test_run_migrations_on_a_shared_in_memory_database_leaves_its_journal_alone() -> None:
    """An in-memory database named by a URI (`file:…?mode=memory`) cannot be in WAL
    mode: `run_migrations` migrates it and leaves its journal as it is."""
    engine = create_engine(
        "sqlite:///file:aisopod_memory?mode=memory&cache=shared&uri=true", poolclass=QueuePool
    )
    try:
        with engine.connect() as keeper:  # the shared database lives while one is open
            assert run_migrations(engine) == SCHEMA_VERSION
            assert keeper.exec_driver_sql("PRAGMA journal_mode").scalar() == "memory"
    finally:
        engine.dispose()


def test_a_postgresql_pool_is_sized_by_open_database(pg_url: str, key: SessionKey) -> None:
    """`pool_size` and `max_overflow` size the engine's pool (the per-connection checks
    of `open_database` still apply), and 6 threads share the 2 + 1 connections."""
    engine = open_database(pg_url, pool_size=2, max_overflow=1)
    try:
        assert engine.pool.size() == 2  # type: ignore[attr-defined]
        repo = SessionRepository(engine)
        repo.get_or_create(key)
        most: list[int] = []

        def append_some(_: int) -> None:
            for n in range(10):
                repo.append_message(key, Role.USER, f"{n}")
                most.append(engine.pool.checkedout())  # type: ignore[attr-defined]

        run_threads(append_some, 6)
        assert max(most) <= 3
        session = repo.get(key)
        assert session is not None
        assert session.message_count == 60
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"pool_size": 0}, "pool_size"),
        ({"pool_size": "5"}, "pool_size"),
        ({"pool_size": True}, "pool_size"),
        ({"max_overflow": -1}, "max_overflow"),
        ({"max_overflow": 1.5}, "max_overflow"),
    ],
)
def test_bad_pool_sizes_are_refused_naming_them(
    options: dict[str, object], named: str, tmp_path: Path
) -> None:
    """Checked before anything is opened: a PostgreSQL URL with no server behind it is
    not even connected to."""
    with pytest.raises(ValueError, match=named):
        open_database("postgresql://nobody@127.0.0.1:1/none", **options)  # type: ignore[arg-type]


def test_pool_sizes_are_for_postgresql_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pool_size: PostgreSQL only"):
        open_database(tmp_path / "s.db", pool_size=3)
    assert list(tmp_path.iterdir()) == []


def test_the_asyncio_companions_pool_keeps_a_connection_per_worker() -> None:
    from aisopod_session import asyncbridge, database

    assert database._WORKERS["pool_size"] == asyncbridge.POSTGRESQL_WORKERS
