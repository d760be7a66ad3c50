"""Every schema change, in order, and the version-table runner that applies them.

To change the schema, append a `Migration` to `MIGRATIONS` (never edit one that has
shipped: its checksum is recorded in every database it was applied to) and update
`models.py` to match. See docs/migrations.md.

The version is the highest `version` in `schema_version`: every migration up to it counts
as applied. The bookkeeping columns (`name`, `checksum`, `applied_at`) may be NULL, and
are added when missing, so a table of the bare shape `(version INTEGER PRIMARY KEY)`, as
the Rust crate and hand-written SQL make it, is read and upgraded rather than refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, text

from aisopod_session.errors import MigrationError, SchemaVersionError, translated_errors
from aisopod_session.models import parse_utc_text, utc_text
from aisopod_session.transactions import prepare_engine, read_transaction, write_transaction


@dataclass(frozen=True)
class Migration:
    """One schema change: SQL statements applied in one transaction with its version row."""

    version: int
    name: str
    statements: tuple[str, ...]

    @property
    def checksum(self) -> str:
        """SHA-256 of the statements, recorded when applied and checked on every open."""
        return hashlib.sha256("\n;\n".join(self.statements).encode("utf-8")).hexdigest()


# Migration 1 is the seed spec's DDL as written. `IF NOT EXISTS` lets a file whose tables
# were created by plain SQL from that spec (and has no schema_version yet) be adopted.
MIGRATIONS: list[Migration] = [
    Migration(
        version=1,
        name="create sessions and messages",
        statements=(
            """CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    account_id TEXT NOT NULL,
    peer_kind TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0,
    token_usage INTEGER NOT NULL DEFAULT 0,
    metadata TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'active',
    UNIQUE (agent_id, channel, account_id, peer_kind, peer_id)
)""",
            """CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    tool_calls TEXT,
    created_at TEXT NOT NULL
)""",
            "CREATE INDEX IF NOT EXISTS idx_sessions_agent_id ON sessions(agent_id)",
            "CREATE INDEX IF NOT EXISTS idx_sessions_channel ON sessions(channel, account_id)",
            "CREATE INDEX IF NOT EXISTS idx_sessions_status ON sessions(status)",
            "CREATE INDEX IF NOT EXISTS idx_sessions_updated_at ON sessions(updated_at)",
            "CREATE INDEX IF NOT EXISTS idx_messages_session_id ON messages(session_id)",
            "CREATE INDEX IF NOT EXISTS idx_messages_created_at "
            "ON messages(session_id, created_at)",
        ),
    ),
    # Migration 2 is the Rust crate's schema version 2: compaction bookkeeping.
    Migration(
        version=2,
        name="add compaction fields to sessions",
        statements=(
            "ALTER TABLE sessions ADD COLUMN compaction_count INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE sessions ADD COLUMN last_compacted_at TEXT",
            "ALTER TABLE sessions ADD COLUMN last_compaction_summary TEXT",
        ),
    ),
]

SCHEMA_VERSION: int = MIGRATIONS[-1].version
"""The newest schema version this code knows."""

_CREATE_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    name TEXT,
    checksum TEXT,
    applied_at TEXT
)"""
_BOOKKEEPING_COLUMNS = ("name", "checksum", "applied_at")


@dataclass(frozen=True)
class AppliedMigration:
    """One row of `schema_version`; bookkeeping is None where it was not recorded."""

    version: int
    name: str | None
    checksum: str | None
    applied_at: datetime | None


def applied_migrations(engine: Engine) -> list[AppliedMigration]:
    """The rows of `schema_version` in version order; empty for a fresh database.

    Read-only: takes no write lock and creates nothing.
    """
    prepare_engine(engine)
    with translated_errors("read schema_version"), read_transaction(engine) as conn:
        return _read_applied(conn)


def current_version(engine: Engine) -> int:
    """The highest applied schema version, 0 for a fresh database. Read-only."""
    return _version(applied_migrations(engine))


def check_schema(
    engine: Engine, migrations: Sequence[Migration] | None = None
) -> list[AppliedMigration]:
    """Check, read-only, that this code can work on the database, and return what was
    applied: `SchemaVersionError` if the database is newer than `migrations` (default
    `MIGRATIONS`), `MigrationError` if an applied migration's recorded checksum differs
    from the code's."""
    migrations = MIGRATIONS if migrations is None else migrations
    _check_sequence(migrations)
    applied = applied_migrations(engine)
    _check_applied(applied, migrations)
    return applied


def run_migrations(engine: Engine, migrations: Sequence[Migration] | None = None) -> int:
    """Bring the database up to the newest of `migrations` (default `MIGRATIONS`, read
    when called) and return the version reached.

    Each pending migration runs in its own write transaction together with its
    `schema_version` row, so a failing one leaves no trace (`MigrationError`, chained
    to the cause) and the ones before it stay applied. The write lock is held from reading
    the version to recording it, so processes migrating at once apply each migration once.
    An up-to-date database is checked read-only and not written at all. A database newer
    than `migrations` raises `SchemaVersionError`, and one whose recorded checksum differs
    from the code raises `MigrationError`; neither modifies the file. Any SQLite engine
    works: one not made by `open_database` is prepared first (see `prepare_engine`).
    """
    migrations = MIGRATIONS if migrations is None else migrations
    applied = check_schema(engine, migrations)
    pending = _pending(applied, migrations)
    if not pending:
        return _version(applied)

    for migration in pending:
        with (
            translated_errors(f"apply migration {migration.version}"),
            write_transaction(engine) as conn,
        ):
            # Re-read under the write lock: another process may have migrated meanwhile.
            applied = _read_applied(conn)
            _check_applied(applied, migrations)
            if migration not in _pending(applied, migrations):
                continue
            _apply(conn, migration)
    return migrations[-1].version if migrations else 0


def _pending(
    applied: Sequence[AppliedMigration], migrations: Sequence[Migration]
) -> list[Migration]:
    current = _version(applied)
    return [migration for migration in migrations if migration.version > current]


def _version(applied: Sequence[AppliedMigration]) -> int:
    return max((row.version for row in applied), default=0)


def _apply(conn: Connection, migration: Migration) -> None:
    conn.exec_driver_sql(_CREATE_VERSION_TABLE)
    present = _version_columns(conn)
    for column in _BOOKKEEPING_COLUMNS:
        if column not in present:
            conn.exec_driver_sql(f"ALTER TABLE schema_version ADD COLUMN {column} TEXT")
    try:
        for statement in migration.statements:
            conn.exec_driver_sql(statement)
    except Exception as exc:
        raise MigrationError(
            f"migration {migration.version} ({migration.name!r}) failed and was rolled back: {exc}"
        ) from exc
    conn.execute(
        text(
            "INSERT INTO schema_version (version, name, checksum, applied_at) "
            "VALUES (:version, :name, :checksum, :applied_at)"
        ),
        {
            "version": migration.version,
            "name": migration.name,
            "checksum": migration.checksum,
            "applied_at": utc_text(datetime.now(UTC)),
        },
    )


def _version_columns(conn: Connection) -> set[str]:
    return {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(schema_version)")}


def _read_applied(conn: Connection) -> list[AppliedMigration]:
    present = _version_columns(conn)
    if not present:
        return []
    selected = ", ".join(
        column if column in present else "NULL" for column in ("version", *_BOOKKEEPING_COLUMNS)
    )
    rows = conn.exec_driver_sql(f"SELECT {selected} FROM schema_version ORDER BY version")
    return [
        AppliedMigration(
            version=int(version),
            name=name,
            checksum=checksum,
            applied_at=None if applied_at is None else parse_utc_text(applied_at),
        )
        for version, name, checksum, applied_at in rows
    ]


def _check_sequence(migrations: Sequence[Migration]) -> None:
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migrations must be numbered 1, 2, 3, … in order; got {versions}")


def _check_applied(applied: Sequence[AppliedMigration], migrations: Sequence[Migration]) -> None:
    newest = _version(applied)
    latest = migrations[-1].version if migrations else 0
    if newest > latest:
        raise SchemaVersionError(
            f"the database is at schema version {newest}, newer than this code's version "
            f"{latest}; upgrade aisopod-session to open it (the file was not modified)"
        )
    known = {migration.version: migration for migration in migrations}
    for row in applied:
        migration = known.get(row.version)
        if (
            migration is not None
            and row.checksum is not None
            and row.checksum != migration.checksum
        ):
            raise MigrationError(
                f"migration {row.version} ({migration.name!r}) was applied with checksum "
                f"{row.checksum[:12]}… but the code's is {migration.checksum[:12]}…; a shipped "
                "migration was edited (the file was not modified)"
            )
