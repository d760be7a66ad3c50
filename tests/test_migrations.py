"""The version-table migrator: fresh files, re-opens, failures, newer files, races."""

from __future__ import annotations

import hashlib
import multiprocessing
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from freezegun import freeze_time
from sqlalchemy import Engine, create_engine, inspect

from aisopod_session import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
    MigrationError,
    SchemaVersionError,
    SessionKey,
    SessionRepository,
    applied_migrations,
    current_version,
    open_database,
    run_migrations,
)
from tests.dbtools import make_seed_file, run_sql, snapshot, stress

BROKEN = Migration(
    version=SCHEMA_VERSION + 1,
    name="add a table and a column, then fail",
    statements=(
        "CREATE TABLE extra (x TEXT)",
        "ALTER TABLE sessions ADD COLUMN label TEXT",
        "INSERT INTO no_such_table VALUES (1)",
    ),
)
FIXED = Migration(
    version=SCHEMA_VERSION + 1,
    name="add a table and a column",
    statements=("CREATE TABLE extra (x TEXT)", "ALTER TABLE sessions ADD COLUMN label TEXT"),
)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def table_names(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        names = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    conn.close()
    return names


def test_migrations_are_numbered_in_order() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert MIGRATIONS[-1].version == SCHEMA_VERSION


def test_fresh_file_gets_every_migration_with_its_version_row(db_path: Path) -> None:
    with freeze_time("2026-11-26T03:59:48.123456+00:00"):
        engine = open_database(db_path)
    rows = applied_migrations(engine)
    engine.dispose()
    assert [(r.version, r.name, r.checksum) for r in rows] == [
        (m.version, m.name, m.checksum) for m in MIGRATIONS
    ]
    assert all(r.applied_at == datetime(2026, 11, 26, 3, 59, 48, 123456, tzinfo=UTC) for r in rows)
    assert {"sessions", "messages", "schema_version"} <= table_names(db_path)


def test_reopening_applies_nothing_and_changes_nothing(db_path: Path, key: SessionKey) -> None:
    engine = open_database(db_path)
    SessionRepository(engine).get_or_create(key)
    before = applied_migrations(engine)
    engine.dispose()
    state = snapshot(db_path)
    with freeze_time("2030-01-01T00:00:00+00:00"):
        engine = open_database(db_path)
        assert run_migrations(engine) == SCHEMA_VERSION
        assert applied_migrations(engine) == before
    engine.dispose()
    assert snapshot(db_path) == state


def test_up_to_date_database_is_checked_without_the_write_lock(
    engine: Engine, db_path: Path
) -> None:
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        # With the write lock held elsewhere, a migrator that wanted it would time out.
        second = open_database(db_path, busy_timeout=0.05)
        assert current_version(second) == SCHEMA_VERSION
        second.dispose()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def columns_of(engine: Engine, table: str) -> list[str]:
    return [column["name"] for column in inspect(engine).get_columns(table)]


def test_failing_migration_leaves_no_trace(store: Engine) -> None:
    """On both backends: DDL is transactional on SQLite and PostgreSQL alike."""
    before = snapshot(store)
    sessions_columns = columns_of(store, "sessions")
    with pytest.raises(
        MigrationError, match=rf"migration {BROKEN.version}.*no_such_table"
    ) as caught:
        run_migrations(store, [*MIGRATIONS, BROKEN])
    assert isinstance(caught.value.__cause__, Exception)
    assert snapshot(store) == before
    assert "extra" not in inspect(store).get_table_names()
    assert columns_of(store, "sessions") == sessions_columns
    assert current_version(store) == SCHEMA_VERSION


def test_rerun_after_failure_applies_the_fixed_migration_once(store: Engine) -> None:
    with pytest.raises(MigrationError):
        run_migrations(store, [*MIGRATIONS, BROKEN])
    assert run_migrations(store, [*MIGRATIONS, FIXED]) == FIXED.version
    assert run_migrations(store, [*MIGRATIONS, FIXED]) == FIXED.version
    versions = [row.version for row in applied_migrations(store)]
    assert versions == [*range(1, SCHEMA_VERSION + 1), FIXED.version]
    assert "label" in columns_of(store, "sessions")


def test_failing_first_migration_on_a_fresh_file_creates_nothing(db_path: Path) -> None:
    engine = open_database(db_path, migrate=False)
    broken_first = Migration(1, "broken", ("CREATE TABLE a (x)", "CREATE TABLE a (x)"))
    with pytest.raises(MigrationError, match="migration 1"):
        run_migrations(engine, [broken_first])
    engine.dispose()
    assert table_names(db_path) == set()


def test_any_sqlite_engine_is_prepared_and_migrated_atomically(
    db_path: Path, key: SessionKey
) -> None:
    plain = create_engine(f"sqlite:///{db_path}")
    with plain.connect() as pooled:  # a pooled connection that predates the preparation
        pooled.exec_driver_sql("SELECT 1")
    broken_first = Migration(1, "broken", ("CREATE TABLE a (x)", "CREATE TABLE a (x)"))
    with pytest.raises(MigrationError, match="migration 1"):
        run_migrations(plain, [broken_first])
    assert table_names(db_path) == set()

    assert run_migrations(plain) == SCHEMA_VERSION
    repo = SessionRepository(plain)
    repo.get_or_create(key)
    repo.append_message(key, "user", "hi")
    assert repo.delete(key)
    with sqlite3.connect(db_path) as conn:
        # foreign_keys was on for the pooled connection: the cascade removed the message.
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    conn.close()
    plain.dispose()


def test_open_without_migrating_leaves_the_schema_alone(db_path: Path) -> None:
    engine = open_database(db_path, migrate=False)
    assert current_version(engine) == 0
    assert table_names(db_path) == set()
    assert run_migrations(engine) == SCHEMA_VERSION
    engine.dispose()


def migrated_then(path: Path, sql: str) -> str:
    """Migrate a fresh file, run `sql` on it with plain sqlite3, return the file's digest."""
    open_database(path).dispose()
    run_sql(path, sql)
    return file_digest(path)


def untouched(store: Engine, store_url: str) -> Callable[[], object]:
    """What must not change when a store is refused: its rows (either backend) and, for
    a SQLite file, every byte."""
    path = None if "://" in store_url else Path(store_url)
    return lambda: (snapshot(store), path and file_digest(path))


def test_newer_database_is_refused_and_left_untouched(store: Engine, store_url: str) -> None:
    run_sql(
        store,
        "INSERT INTO schema_version (version, name, checksum, applied_at) "
        "VALUES (99, 'from the future', 'x', '2031-01-01T00:00:00.000000+00:00')",
    )
    store.dispose()  # SQLite: the last connection checkpoints the WAL into the file
    state = untouched(store, store_url)
    before = state()
    with pytest.raises(SchemaVersionError) as caught:
        open_database(store_url)
    assert "99" in str(caught.value)
    assert str(SCHEMA_VERSION) in str(caught.value)
    store.dispose()
    assert state() == before


def test_edited_migration_is_refused_naming_it(store: Engine, store_url: str) -> None:
    run_sql(store, "UPDATE schema_version SET checksum = 'edited' WHERE version = 1")
    store.dispose()
    state = untouched(store, store_url)
    before = state()
    with pytest.raises(MigrationError, match=r"migration 1 \('create sessions and messages'\)"):
        open_database(store_url)
    store.dispose()
    assert state() == before


def test_misnumbered_migrations_are_refused(engine: Engine) -> None:
    with pytest.raises(MigrationError, match="numbered"):
        run_migrations(engine, [MIGRATIONS[0], Migration(3, "skips 2", ("SELECT 1",))])


def _open_when_released(path: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait()
    engine = open_database(path)
    SessionRepository(engine).get_or_create(SessionKey("a", "c", "acc", "dm", "p"))
    engine.dispose()


@pytest.mark.parametrize(("processes", "rounds"), [(2, 20 * stress()), (8, 6 * stress())])
def test_processes_opening_a_fresh_file_at_once_migrate_it_once(
    tmp_path: Path, processes: int, rounds: int
) -> None:
    # fork starts workers within a millisecond of each other, so they really collide on
    # the fresh file (switching it to WAL, creating schema_version, migrating).
    context = multiprocessing.get_context("fork")
    for round_ in range(rounds):
        path = tmp_path / f"fresh-{round_}.db"
        barrier = context.Barrier(processes)
        workers = [
            context.Process(target=_open_when_released, args=(str(path), barrier))
            for _ in range(processes)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert [worker.exitcode for worker in workers] == [0] * processes, f"round {round_}"
        with sqlite3.connect(path) as conn:
            versions = [row[0] for row in conn.execute("SELECT version FROM schema_version")]
            sessions = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        conn.close()
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        assert sessions == 1
        assert mode == "wal"


def test_a_bare_version_row_counts_and_a_newer_one_is_refused(db_path: Path) -> None:
    digest = migrated_then(db_path, "INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(SchemaVersionError, match=rf"version 99.*version {SCHEMA_VERSION}"):
        open_database(db_path)
    assert file_digest(db_path) == digest


def test_a_rust_crate_version_2_file_gets_only_the_later_migrations(db_path: Path) -> None:
    make_seed_file(db_path, version=2)
    run_sql(db_path, "CREATE TABLE schema_version (version INTEGER PRIMARY KEY)")
    run_sql(db_path, "INSERT INTO schema_version (version) VALUES (1), (2)")

    # Versions 1 and 2 count as applied (migration 2 re-run would fail on its existing
    # columns): migration 3 alone is applied, and recorded.
    with freeze_time("2026-11-26T03:59:48.123456+00:00"):
        engine = open_database(db_path)
    assert [
        (r.version, r.name, r.checksum, r.applied_at, r.recorded)
        for r in applied_migrations(engine)
    ] == [
        (1, None, None, None, True),
        (2, None, None, None, True),
        *(
            (
                migration.version,
                migration.name,
                migration.checksum,
                datetime(2026, 11, 26, 3, 59, 48, 123456, tzinfo=UTC),
                True,
            )
            for migration in MIGRATIONS[2:]
        ),
    ]
    assert SCHEMA_VERSION == 5
    engine.dispose()

    state = snapshot(db_path)
    engine = open_database(db_path)  # up to date now: read, not written
    assert snapshot(db_path) == state
    assert run_migrations(engine, [*MIGRATIONS, FIXED]) == FIXED.version
    rows = applied_migrations(engine)
    assert [(r.version, r.name, r.checksum) for r in rows] == [
        (1, None, None),
        (2, None, None),
        *((m.version, m.name, m.checksum) for m in MIGRATIONS[2:]),
        (FIXED.version, FIXED.name, FIXED.checksum),
    ]
    engine.dispose()


def test_a_rust_crate_version_1_file_is_upgraded_to_the_latest_version(
    db_path: Path, key: SessionKey
) -> None:
    make_seed_file(db_path)
    run_sql(db_path, "CREATE TABLE schema_version (version INTEGER PRIMARY KEY)")
    run_sql(db_path, "INSERT INTO schema_version (version) VALUES (1)")
    run_sql(
        db_path,
        "INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id, created_at, "
        "updated_at, message_count) VALUES ('agent-1', 'telegram', 'bot-A', 'dm', 'User-42', "
        "'2026-11-01T00:00:00.000000+00:00', '2026-11-01T00:00:00.000000+00:00', 0)",
    )
    engine = open_database(db_path)
    rows = applied_migrations(engine)
    assert [(r.version, r.name) for r in rows] == [
        (1, None),
        *((m.version, m.name) for m in MIGRATIONS[1:]),
    ]
    assert [r.checksum for r in rows[1:]] == [m.checksum for m in MIGRATIONS[1:]]
    session = SessionRepository(engine).get(key)
    assert session is not None
    assert (session.compaction_count, session.last_compacted_at) == (0, None)
    assert session.last_compaction_summary is None
    assert (session.input_tokens, session.output_tokens) == (0, 0)
    engine.dispose()


def test_migrations_list_is_read_when_called(
    engine: Engine, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aisopod_session import migrations

    monkeypatch.setattr(migrations, "MIGRATIONS", [*MIGRATIONS, FIXED])
    assert run_migrations(engine) == FIXED.version
    assert current_version(engine) == FIXED.version
    reopened = open_database(db_path)  # open_database uses the patched list too
    reopened.dispose()


def test_processes_migrating_a_fresh_store_at_once_apply_each_version_once(
    store_url: str,
) -> None:
    """Eight processes open the same new store at once, on either backend (PostgreSQL:
    they serialise on the migrator's advisory lock)."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(8)
    workers = [
        context.Process(target=_open_when_released, args=(store_url, barrier)) for _ in range(8)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0] * 8
    engine = open_database(store_url)
    rows = applied_migrations(engine)
    assert [row.version for row in rows] == list(range(1, SCHEMA_VERSION + 1))
    assert [row.checksum for row in rows] == [
        m.checksum_for(engine.dialect.name) for m in MIGRATIONS
    ]
    assert SessionRepository(engine).count_sessions() == 1
    engine.dispose()


def test_progress_counts_each_pending_migration_as_it_commits(db_path: Path) -> None:
    """`run_migrations(progress=)`: 0 of the pending before the first, then one more after
    each commits (each one's version row is there when it is counted); nothing to report
    on an up-to-date store."""
    make_seed_file(db_path)  # the seed's tables, no version recorded: every one pending
    engine = open_database(db_path, migrate=False)
    seen: list[tuple[int, int, int]] = []
    run_migrations(
        engine, progress=lambda done, total: seen.append((done, total, current_version(engine)))
    )
    assert seen == [(done, SCHEMA_VERSION, done) for done in range(SCHEMA_VERSION + 1)]
    seen.clear()
    run_migrations(engine, progress=lambda done, total: seen.append((done, total, 0)))
    assert seen == []
    engine.dispose()
