"""The migrated schema, column by column, against the seed spec; timestamps and JSON as
stored; files made and read by plain SQL."""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from freezegun import freeze_time
from sqlalchemy import Engine, create_engine
from sqlalchemy import inspect as sa_inspect
from sqlmodel import SQLModel

from aisopod_session import (
    SCHEMA_VERSION,
    NewMessage,
    Role,
    SessionKey,
    SessionRepository,
    SessionStatus,
    applied_migrations,
    open_database,
)
from tests.dbtools import make_seed_file, raw_connect

# (name, declared type, NOT NULL, default, primary key) as the seed lists them.
SESSIONS_COLUMNS = [
    ("id", "INTEGER", 0, None, 1),
    ("agent_id", "TEXT", 1, None, 0),
    ("channel", "TEXT", 1, None, 0),
    ("account_id", "TEXT", 1, None, 0),
    ("peer_kind", "TEXT", 1, None, 0),
    ("peer_id", "TEXT", 1, None, 0),
    ("created_at", "TEXT", 1, None, 0),
    ("updated_at", "TEXT", 1, None, 0),
    ("message_count", "INTEGER", 1, "0", 0),
    ("token_usage", "INTEGER", 1, "0", 0),
    ("metadata", "TEXT", 1, "'{}'", 0),
    ("status", "TEXT", 1, "'active'", 0),
    # added by migration 2, as the Rust crate's schema version 2 adds them
    ("compaction_count", "INTEGER", 1, "0", 0),
    ("last_compacted_at", "TEXT", 0, None, 0),
    ("last_compaction_summary", "TEXT", 0, None, 0),
    # added by migration 3 (BIGINT on PostgreSQL)
    ("input_tokens", "INTEGER", 1, "0", 0),
    ("output_tokens", "INTEGER", 1, "0", 0),
    # added by migration 4 (BIGINT on PostgreSQL): a fork's lineage
    ("parent_id", "INTEGER", 0, None, 0),
    ("forked_from_message_id", "INTEGER", 0, None, 0),
]
MESSAGES_COLUMNS = [
    ("id", "INTEGER", 0, None, 1),
    ("session_id", "INTEGER", 1, None, 0),
    ("role", "TEXT", 1, None, 0),
    ("content", "TEXT", 1, None, 0),
    ("tool_calls", "TEXT", 0, None, 0),
    ("created_at", "TEXT", 1, None, 0),
    # added by migration 3
    ("metadata", "TEXT", 1, "'{}'", 0),
]
MIGRATION_3_COLUMNS = """
ALTER TABLE messages ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';
ALTER TABLE sessions ADD COLUMN input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN output_tokens INTEGER NOT NULL DEFAULT 0;
"""
"""The columns migration 3 adds to the seed's tables (with the Rust crate's version 2),
typed independently of `migrations.py`."""
MIGRATION_4 = """
ALTER TABLE sessions ADD COLUMN parent_id INTEGER;
ALTER TABLE sessions ADD COLUMN forked_from_message_id INTEGER;
CREATE INDEX idx_sessions_agent_updated ON sessions(agent_id, updated_at, id);
CREATE INDEX idx_sessions_parent ON sessions(parent_id) WHERE parent_id IS NOT NULL;
"""
"""Migration 4's columns and indexes (its search table and triggers are compared in
tests/test_search.py)."""
SEED_INDEXES = {
    "idx_sessions_agent_id": ("sessions", ["agent_id"]),
    "idx_sessions_channel": ("sessions", ["channel", "account_id"]),
    "idx_sessions_status": ("sessions", ["status"]),
    "idx_sessions_updated_at": ("sessions", ["updated_at"]),
    "idx_messages_session_id": ("messages", ["session_id"]),
    "idx_messages_created_at": ("messages", ["session_id", "created_at"]),
}
CANONICAL_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")


def columns(conn: sqlite3.Connection, table: str) -> list[tuple[Any, ...]]:
    return [tuple(row[1:]) for row in conn.execute(f"PRAGMA table_info({table})")]


def indexes(conn: sqlite3.Connection, table: str) -> dict[str, tuple[int, str, list[str]]]:
    result = {}
    for _, name, unique, origin, _partial in conn.execute(f"PRAGMA index_list({table})"):
        cols = [row[2] for row in conn.execute(f"PRAGMA index_info('{name}')")]
        result[name] = (unique, origin, cols)
    return result


def foreign_keys(conn: sqlite3.Connection, table: str) -> list[tuple[Any, ...]]:
    return [tuple(row[2:]) for row in conn.execute(f"PRAGMA foreign_key_list({table})")]


def schema_facts(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    facts = {
        table: (columns(conn, table), indexes(conn, table), foreign_keys(conn, table))
        for table in ("sessions", "messages")
    }
    conn.close()
    return facts


def test_sessions_columns_match_the_seed(engine: Engine, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    assert columns(conn, "sessions") == SESSIONS_COLUMNS


def test_messages_columns_match_the_seed(engine: Engine, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    assert columns(conn, "messages") == MESSAGES_COLUMNS


def test_the_six_seed_indexes_exist_with_their_columns(engine: Engine, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    found = {**indexes(conn, "sessions"), **indexes(conn, "messages")}
    for name, (table, cols) in SEED_INDEXES.items():
        assert name in indexes(conn, table), name
        assert found[name] == (0, "c", cols)


def test_sessions_has_the_composite_unique_key(engine: Engine, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    unique = [v for v in indexes(conn, "sessions").values() if v[1] == "u"]
    assert unique == [(1, "u", ["agent_id", "channel", "account_id", "peer_kind", "peer_id"])]


def test_messages_reference_sessions_with_cascade(engine: Engine, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    # (table, from, to, on_update, on_delete, match)
    assert foreign_keys(conn, "messages") == [
        ("sessions", "session_id", "id", "NO ACTION", "CASCADE", "NONE")
    ]


def test_ids_are_autoincrement_and_never_reused(
    repo: SessionRepository, db_path: Path, key: SessionKey, other_key: SessionKey
) -> None:
    conn = sqlite3.connect(db_path)
    for table in ("sessions", "messages"):
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()
        assert "AUTOINCREMENT" in sql
    first = repo.get_or_create(key)
    first_message = repo.append_message(key, Role.USER, "hello")
    assert repo.delete(key)
    second = repo.get_or_create(other_key)
    second_message = repo.append_message(other_key, Role.USER, "hello")
    assert first.id is not None
    assert second.id is not None
    assert second.id > first.id
    assert first_message.id is not None
    assert second_message.id is not None
    assert second_message.id > first_message.id


def test_migrated_schema_equals_the_seed_ddl_the_rust_version_2_and_migration_3(
    engine: Engine, db_path: Path, tmp_path: Path
) -> None:
    seed = tmp_path / "seed.db"
    make_seed_file(seed, version=2)
    conn = sqlite3.connect(seed)
    conn.executescript(MIGRATION_3_COLUMNS + MIGRATION_4)
    conn.close()
    assert schema_facts(db_path) == schema_facts(seed)


def test_sqlmodel_tables_describe_the_migrated_schema(
    engine: Engine, db_path: Path, tmp_path: Path
) -> None:
    from_models = tmp_path / "models.db"
    engine_for_models = create_engine(f"sqlite:///{from_models}")
    SQLModel.metadata.create_all(engine_for_models)
    engine_for_models.dispose()
    migrated = schema_facts(db_path)
    modelled = schema_facts(from_models)
    for table in ("sessions", "messages"):
        # SQLAlchemy spells the primary key "INTEGER NOT NULL PRIMARY KEY"; same column.
        model_cols = [
            (name, kind, 0 if pk else notnull, default, pk)
            for name, kind, notnull, default, pk in modelled[table][0]
        ]
        assert model_cols == migrated[table][0]
        assert modelled[table][1] == migrated[table][1]
        assert modelled[table][2] == migrated[table][2]


def test_timestamps_are_fixed_width_utc_text(
    repo: SessionRepository, db_path: Path, key: SessionKey
) -> None:
    with freeze_time(
        datetime(2026, 11, 26, 5, 59, 48, 123456, tzinfo=timezone(timedelta(hours=2)))
    ):
        session = repo.get_or_create(key)
        repo.append_message(key, Role.USER, "hi")
    assert session.created_at == datetime(2026, 11, 26, 3, 59, 48, 123456, tzinfo=UTC)
    assert session.created_at.tzinfo is not None
    conn = sqlite3.connect(db_path)
    for table in ("sessions", "messages"):
        created, kind, julian = conn.execute(
            f"SELECT created_at, typeof(created_at), julianday(created_at) FROM {table}"
        ).fetchone()
        assert kind == "text"
        assert created == "2026-11-26T03:59:48.123456+00:00"
        assert CANONICAL_TIME.match(created)
        # SQLite's own date functions read the stored form.
        assert (
            julian == conn.execute("SELECT julianday('2026-11-26 03:59:48.123456')").fetchone()[0]
        )


def test_text_order_is_time_order(repo: SessionRepository, db_path: Path) -> None:
    moments = [
        datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 9, 0, 0, tzinfo=timezone(timedelta(hours=10))),  # earlier in UTC
    ]
    for index, moment in enumerate(moments):
        with freeze_time(moment):
            repo.get_or_create(SessionKey("a", "c", "acc", "dm", f"p{index}"))
    conn = sqlite3.connect(db_path)
    stored = [row[0] for row in conn.execute("SELECT created_at FROM sessions ORDER BY created_at")]
    assert [datetime.fromisoformat(text) for text in stored] == sorted(moments)


def test_metadata_and_tool_calls_are_json_text(
    repo: SessionRepository, db_path: Path, key: SessionKey
) -> None:
    repo.get_or_create(key)
    repo.update_metadata(key, {"lang": "nb", "n": 1})
    repo.append_messages(key, [NewMessage(Role.ASSISTANT, "", [{"id": "c1", "args": {"q": "æ"}}])])
    repo.append_message(key, Role.USER, "no tools")
    conn = sqlite3.connect(db_path)
    (meta,) = conn.execute("SELECT metadata FROM sessions").fetchone()
    assert json.loads(meta) == {"lang": "nb", "n": 1}
    assert conn.execute("SELECT json_valid(metadata) FROM sessions").fetchone() == (1,)
    rows = conn.execute("SELECT tool_calls FROM messages ORDER BY id").fetchall()
    assert json.loads(rows[0][0]) == [{"id": "c1", "args": {"q": "æ"}}]
    assert rows[1] == (None,)


def test_a_file_written_by_plain_sql_from_the_seed_opens_and_reads(db_path: Path) -> None:
    make_seed_file(db_path)
    conn = raw_connect(db_path)
    # Defaults fill metadata, status and counters; timestamps in two common SQL spellings.
    conn.execute(
        "INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id, created_at, "
        "updated_at) VALUES ('agent-1', 'telegram', 'bot-A', 'dm', 'User-42', "
        "'2026-01-02 03:04:05', strftime('%Y-%m-%dT%H:%M:%fZ', '2026-01-02 03:04:06'))"
    )
    conn.execute(
        "INSERT INTO messages (session_id, role, content, tool_calls, created_at) VALUES "
        "(1, 'user', 'hello from SQL', NULL, '2026-01-02T03:04:05.000000+00:00'), "
        "(1, 'assistant', 'hi', '[{\"id\": \"t1\"}]', '2026-01-02T03:04:06.000000+00:00')"
    )
    conn.execute("UPDATE sessions SET message_count = 2")
    conn.close()

    engine = open_database(db_path)
    try:
        assert [row.version for row in applied_migrations(engine)] == list(
            range(1, SCHEMA_VERSION + 1)
        )
        repo = SessionRepository(engine)
        key = SessionKey("agent-1", "telegram", "bot-A", "dm", "User-42")
        session = repo.get(key)
        assert session is not None
        assert session.meta == {}
        assert session.status is SessionStatus.ACTIVE
        assert session.message_count == 2
        assert session.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        assert session.updated_at == datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC)
        history = repo.get_history(key)
        assert [(m.role, m.content, m.tool_calls) for m in history] == [
            (Role.USER, "hello from SQL", None),
            (Role.ASSISTANT, "hi", [{"id": "t1"}]),
        ]
        repo.append_message(key, Role.USER, "and from Python")
        assert repo.get_or_create(key).message_count == 3
    finally:
        engine.dispose()


def test_plain_sql_reads_and_writes_a_file_made_by_the_library(
    repo: SessionRepository, db_path: Path, key: SessionKey
) -> None:
    session = repo.get_or_create(key)
    conn = raw_connect(db_path)
    conn.execute(
        "INSERT INTO messages (session_id, role, content, created_at) "
        "VALUES (?, 'user', 'typed in sqlite3', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))",
        (session.id,),
    )
    conn.execute(
        "UPDATE sessions SET message_count = message_count + 1 WHERE id = ?", (session.id,)
    )
    row = conn.execute(
        "SELECT agent_id, channel, account_id, peer_kind, peer_id, status, metadata "
        "FROM sessions WHERE id = ?",
        (session.id,),
    ).fetchone()
    conn.close()
    assert row == ("agent-1", "telegram", "bot-A", "dm", "User-42", "active", "{}")
    assert [m.content for m in repo.get_history(key)] == ["typed in sqlite3"]
    assert repo.get_or_create(key).message_count == 1


def test_the_schema_is_the_same_on_every_backend(store: Engine) -> None:
    """Read through SQLAlchemy's inspector, so the same facts are compared on SQLite and
    on PostgreSQL: column names, order, nullability and defaults, the unique key, the
    cascading foreign key and the six index names with their columns."""
    inspector = sa_inspect(store)
    for table, expected in (("sessions", SESSIONS_COLUMNS), ("messages", MESSAGES_COLUMNS)):
        found = inspector.get_columns(table)
        assert [c["name"] for c in found] == [name for name, *_ in expected]
        # Primary keys aside (SQLite reports its INTEGER PRIMARY KEY as nullable).
        assert [bool(c["nullable"]) for c in found][1:] == [
            not notnull for _, _, notnull, _, _ in expected
        ][1:]
        defaults = {c["name"]: str(c["default"]).split("::")[0] for c in found if c["default"]}
        expected_defaults = {name: default for name, _, _, default, _ in expected if default}
        assert {k: v for k, v in defaults.items() if k != "id"} == expected_defaults
    assert [u["column_names"] for u in inspector.get_unique_constraints("sessions")] == [
        ["agent_id", "channel", "account_id", "peer_kind", "peer_id"]
    ]
    (foreign_key,) = inspector.get_foreign_keys("messages")
    assert (foreign_key["referred_table"], foreign_key["constrained_columns"]) == (
        "sessions",
        ["session_id"],
    )
    if store.dialect.name == "sqlite":  # SQLAlchemy does not reflect SQLite's ON DELETE
        with store.connect() as conn:
            (row,) = conn.exec_driver_sql("PRAGMA foreign_key_list(messages)").all()
        assert row[6] == "CASCADE"
    else:
        assert foreign_key["options"].get("ondelete") == "CASCADE"
    indexes = {
        index["name"]: (table, index["column_names"])
        for table in ("sessions", "messages")
        for index in inspector.get_indexes(table)
        if not index.get("unique")
    }
    expected_indexes = dict(SEED_INDEXES)
    if store.dialect.name == "postgresql":
        # Migration 5: in id order within a session, as SQLite's is by its rowid.
        expected_indexes["idx_messages_session_id"] = ("messages", ["session_id", "id"])
    assert {
        name: value for name, value in indexes.items() if name in SEED_INDEXES
    } == expected_indexes


def test_every_statement_compiles_for_both_databases_with_its_parameter_order() -> None:
    """Statements compile on first use (`statements.Query`); compiled here, every one for
    SQLite and for PostgreSQL, each checks its declared parameter order (`compile_sql`),
    so a wrong one fails here rather than in a call that happens to need it."""
    from sqlalchemy.dialects import postgresql, sqlite

    from aisopod_session import statements

    queries = {name: q for name, q in vars(statements).items() if isinstance(q, statements.Query)}
    assert {"SELECT_SESSION", "INSERT_SESSION", "COUNT_APPEND", "DELETE_SESSION"} <= set(queries)
    built = {
        "list_sessions": statements.list_sessions(("agent_id", "status"), count=False),
        "insert_messages": statements.insert_messages(3),
        "history": statements.history(newest_first=True, limit=True, after=True, before=True),
        "summary": statements.summary(scoped=True),
    }
    dialects = ((sqlite.dialect(), "?"), (postgresql.dialect(), "%s"))  # type: ignore[no-untyped-call]
    for name, query in {**queries, **built}.items():
        for dialect, marker in dialects:
            compiled = query.on(dialect)  # TypeError on a parameter order not declared
            assert compiled.text.count(marker) == len(compiled.names), (name, dialect.name)
