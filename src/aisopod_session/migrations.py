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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, text

from aisopod_session.errors import MigrationError, SchemaVersionError, translated_errors
from aisopod_session.models import parse_utc_text, utc_text
from aisopod_session.transactions import (
    enable_wal,
    prepare_engine,
    read_transaction,
    write_transaction,
)


@dataclass(frozen=True)
class Migration:
    """One schema change: SQL statements applied in one transaction with its version row.

    `statements` are SQLite's; `postgresql`, where PostgreSQL needs other SQL for the same
    change (empty: the same statements serve both)."""

    version: int
    name: str
    statements: tuple[str, ...]
    postgresql: tuple[str, ...] = ()

    def statements_for(self, dialect: str) -> tuple[str, ...]:
        """The statements to run on a database of this dialect name."""
        if dialect == "postgresql" and self.postgresql:
            return self.postgresql
        return self.statements

    def checksum_for(self, dialect: str) -> str:
        """SHA-256 of the statements run on `dialect`, recorded when applied and checked
        on every open."""
        joined = "\n;\n".join(self.statements_for(dialect))
        return hashlib.sha256(joined.encode("utf-8")).hexdigest()

    @property
    def checksum(self) -> str:
        """The checksum on SQLite (`checksum_for("sqlite")`)."""
        return self.checksum_for("sqlite")


# The seed's six indexes, in the same SQL on SQLite and PostgreSQL.
_SEED_INDEXES = (
    "CREATE INDEX IF NOT EXISTS idx_sessions_agent_id ON sessions(agent_id)",
    "CREATE INDEX IF NOT EXISTS idx_sessions_channel ON sessions(channel, account_id)",
    "CREATE INDEX IF NOT EXISTS idx_sessions_status ON sessions(status)",
    "CREATE INDEX IF NOT EXISTS idx_sessions_updated_at ON sessions(updated_at)",
    "CREATE INDEX IF NOT EXISTS idx_messages_session_id ON messages(session_id)",
    "CREATE INDEX IF NOT EXISTS idx_messages_created_at ON messages(session_id, created_at)",
)

# Whether this library had migrated the store before this run (it records a checksum with
# every migration it applies; the crate's and hand-written version rows have none; a seed
# file adopted in this very run is not yet ours). `before` is the version the store was
# at when the run began (see `_apply`). By migration 3's statements the bookkeeping
# columns exist (`_apply` adds them first).
_OURS = "EXISTS (SELECT 1 FROM schema_version WHERE checksum IS NOT NULL AND version <= {})"


# Migration 4's search text of a message, the same rule on both databases (docs/schema.md,
# "Search"): a JSON string is its text; a list gives the strings among its elements and
# the string `text` members of its objects (content blocks), one per line; an object
# with a string `text` member gives it; other JSON gives nothing; a cell that is not
# JSON (plain SQL's) is searched as its raw text. Only SQLite's built-in JSON functions,
# so a program with its own SQLite (the Rust crate's bundled one) keeps writing.
def _sqlite_search_text(column: str) -> str:
    return (
        f"CASE WHEN NOT json_valid({column}) THEN CAST({column} AS TEXT) "
        f"WHEN json_type({column}) = 'text' THEN json_extract({column}, '$') "
        f"WHEN json_type({column}) = 'array' THEN (SELECT group_concat(CASE WHEN "
        "j.type = 'text' THEN j.atom ELSE json_extract(j.value, '$.text') END, char(10)) "
        f"FROM json_each({column}) AS j WHERE j.type = 'text' OR (j.type = 'object' AND "
        "json_type(j.value, '$.text') = 'text')) "
        f"WHEN json_type({column}, '$.text') = 'text' AND json_type({column}) = 'object' "
        f"THEN json_extract({column}, '$.text') END"
    )


# The same rule on PostgreSQL, as an IMMUTABLE function the search index is built on
# (a cell that is not JSON cannot fail the cast of a query or a write: it is read as text).
# Not PARALLEL SAFE: its EXCEPTION block starts a subtransaction, which a parallel query
# cannot (nor can aisopod_jsonb's).
_PG_SEARCH_TEXT = r"""CREATE OR REPLACE FUNCTION aisopod_message_text(content text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    doc jsonb;
BEGIN
    BEGIN
        doc := content::jsonb;
    EXCEPTION WHEN others THEN
        RETURN content;
    END;
    CASE jsonb_typeof(doc)
    WHEN 'string' THEN
        RETURN doc #>> '{}';
    WHEN 'array' THEN
        RETURN (SELECT string_agg(CASE WHEN jsonb_typeof(e) = 'string' THEN e #>> '{}'
                                  ELSE e ->> 'text' END, E'\n' ORDER BY n)
                FROM jsonb_array_elements(doc) WITH ORDINALITY AS a(e, n)
                WHERE jsonb_typeof(e) = 'string' OR jsonb_typeof(e -> 'text') = 'string');
    WHEN 'object' THEN
        IF jsonb_typeof(doc -> 'text') = 'string' THEN
            RETURN doc ->> 'text';
        END IF;
        RETURN NULL;
    ELSE
        RETURN NULL;
    END CASE;
END
$$"""

# The words of that text as the search index holds them. PostgreSQL refuses a tsvector
# over 1 MiB ("string is too long for tsvector"), which a message of a few MB of distinct
# words reaches: such a message is indexed by its first 100 000 characters (at most
# ~600 KiB of tsvector) rather than failing its INSERT, or migration 4's CREATE INDEX.
_PG_MESSAGE_VECTOR = r"""CREATE OR REPLACE FUNCTION aisopod_message_vector(content text)
RETURNS tsvector LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    words text := aisopod_message_text(content);
BEGIN
    RETURN to_tsvector('simple'::regconfig, words);
EXCEPTION WHEN program_limit_exceeded THEN
    RETURN to_tsvector('simple'::regconfig, left(words, 100000));
END
$$"""

# A session's metadata as jsonb for its filters; NULL for a cell that is not JSON (plain
# SQL's), which then matches no filter instead of failing the query. jsonb cannot hold
# the escape \u0000 (a NUL, which session metadata may hold): such a cell is read with
# U+FFFD in its place, so its other keys still match.
_PG_JSONB = r"""CREATE OR REPLACE FUNCTION aisopod_jsonb(value text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    BEGIN
        RETURN value::jsonb;
    EXCEPTION WHEN untranslatable_character THEN
        RETURN replace(value, '\u0000', '\ufffd')::jsonb;
    END;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$"""

# A search's terms (`validation.search_terms`) as one query: each term a phrase of its
# words, all of them required; NULL (no match) when no term holds a word.
_PG_TSQUERY = r"""CREATE OR REPLACE FUNCTION aisopod_tsquery(terms text[]) RETURNS tsquery
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT string_agg('(' || phrase::text || ')', ' & ')::tsquery
FROM (SELECT phraseto_tsquery('simple'::regconfig, term) AS phrase FROM unnest(terms) AS term) AS t
WHERE numnode(phrase) > 0
$$"""

PG_SEARCH_VECTOR = "aisopod_message_vector(content)"
"""The expression PostgreSQL's search index is built on; a query repeats it to use it."""

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
            *_SEED_INDEXES,
        ),
        # The same tables on PostgreSQL: identity ids (BY DEFAULT, so ids can be given,
        # as copies and compaction summaries do), the same text columns and index names.
        postgresql=(
            """CREATE TABLE IF NOT EXISTS sessions (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    agent_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    account_id TEXT NOT NULL,
    peer_kind TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0,
    token_usage BIGINT NOT NULL DEFAULT 0,
    metadata TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'active',
    UNIQUE (agent_id, channel, account_id, peer_kind, peer_id)
)""",
            """CREATE TABLE IF NOT EXISTS messages (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    session_id BIGINT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    tool_calls TEXT,
    created_at TEXT NOT NULL
)""",
            *_SEED_INDEXES,
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
    # Migration 3: content as JSON (as the crate stores it), message metadata, and the
    # input/output split of token_usage. See docs/migrations.md ("Migration 3").
    # Which store wrote the content decides how it is converted: one whose schema_version
    # records a checksum was migrated by this library, which stored content as plain
    # text, so every cell becomes the JSON string of its text (each message reads back as
    # before, "123" and '{"a": 1}' included); any other (the crate's, plain SQL's) keeps
    # every cell that is valid JSON and quotes the rest. One set-based UPDATE each.
    Migration(
        version=3,
        name="JSON content, message metadata, input and output tokens",
        statements=(
            "UPDATE messages SET content = json_quote(CAST(content AS TEXT)) WHERE "
            f"{_OURS.format(':before')} OR NOT json_valid(content)",
            "ALTER TABLE messages ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}'",
            "ALTER TABLE sessions ADD COLUMN input_tokens INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE sessions ADD COLUMN output_tokens INTEGER NOT NULL DEFAULT 0",
        ),
        postgresql=(
            "UPDATE messages SET content = to_json(content)::text WHERE "
            f"{_OURS.format('%(before)s')}",
            # PostgreSQL 15 has no `IS JSON`: a cast that fails is the test. The function
            # lives in this session's temporary schema and is dropped before the commit.
            "CREATE FUNCTION pg_temp.aisopod_is_json(value text) RETURNS boolean "
            "LANGUAGE plpgsql AS $$ BEGIN PERFORM value::json; RETURN true; "
            "EXCEPTION WHEN others THEN RETURN false; END $$",
            "UPDATE messages SET content = to_json(content)::text WHERE NOT "
            f"{_OURS.format('%(before)s')} AND NOT pg_temp.aisopod_is_json(content)",
            "DROP FUNCTION pg_temp.aisopod_is_json(text)",
            "ALTER TABLE messages ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}'",
            "ALTER TABLE sessions ADD COLUMN input_tokens BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE sessions ADD COLUMN output_tokens BIGINT NOT NULL DEFAULT 0",
        ),
    ),
    # Migration 4: lineage, keyset-page indexes and the full-text search index. See
    # docs/migrations.md ("Migration 4").
    Migration(
        version=4,
        name="fork lineage, page indexes, full-text search",
        statements=(
            "ALTER TABLE sessions ADD COLUMN parent_id INTEGER",
            "ALTER TABLE sessions ADD COLUMN forked_from_message_id INTEGER",
            # SQLite's index entries end in the rowid (the id): (agent_id, updated_at) is
            # ordered by (agent_id, updated_at, id), and the seed's idx_sessions_updated_at
            # by (updated_at, id), which PostgreSQL needs an index of its own for.
            "CREATE INDEX IF NOT EXISTS idx_sessions_agent_updated "
            "ON sessions(agent_id, updated_at, id)",
            "CREATE INDEX IF NOT EXISTS idx_sessions_parent ON sessions(parent_id) "
            "WHERE parent_id IS NOT NULL",
            # A copy of each message's search text lives in the FTS5 table (snippets are
            # cut from it), kept in step with `messages` by triggers, so rows written by
            # plain SQL or the crate are indexed too and deletions (compaction, reset,
            # prune, a session's cascade) remove their hits in the same transaction.
            "CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5("
            "body, tokenize = 'unicode61 remove_diacritics 2')",
            "INSERT INTO messages_fts(rowid, body) SELECT id, "
            f"{_sqlite_search_text('content')} FROM messages",
            "CREATE TRIGGER IF NOT EXISTS messages_fts_insert AFTER INSERT ON messages BEGIN "
            "INSERT INTO messages_fts(rowid, body) VALUES "
            f"(new.id, {_sqlite_search_text('new.content')}); END",
            "CREATE TRIGGER IF NOT EXISTS messages_fts_delete AFTER DELETE ON messages BEGIN "
            "DELETE FROM messages_fts WHERE rowid = old.id; END",
            "CREATE TRIGGER IF NOT EXISTS messages_fts_update AFTER UPDATE OF id, content "
            "ON messages BEGIN DELETE FROM messages_fts WHERE rowid = old.id; "
            "INSERT INTO messages_fts(rowid, body) VALUES "
            f"(new.id, {_sqlite_search_text('new.content')}); END",
        ),
        postgresql=(
            "ALTER TABLE sessions ADD COLUMN parent_id BIGINT",
            "ALTER TABLE sessions ADD COLUMN forked_from_message_id BIGINT",
            "CREATE INDEX IF NOT EXISTS idx_sessions_agent_updated "
            "ON sessions(agent_id, updated_at, id)",
            "CREATE INDEX IF NOT EXISTS idx_sessions_updated_id ON sessions(updated_at, id)",
            "CREATE INDEX IF NOT EXISTS idx_sessions_parent ON sessions(parent_id) "
            "WHERE parent_id IS NOT NULL",
            _PG_SEARCH_TEXT,
            _PG_MESSAGE_VECTOR,
            _PG_TSQUERY,
            _PG_JSONB,
            f"CREATE INDEX IF NOT EXISTS idx_messages_search ON messages USING gin "
            f"(({PG_SEARCH_VECTOR}))",
        ),
    ),
    Migration(
        version=5,
        name="PostgreSQL: a session's messages indexed in id order",
        # SQLite's idx_messages_session_id already ends in the rowid (the id), so it is
        # ordered by (session_id, id): nothing to do there. PostgreSQL's held session_id
        # alone, so the newest 50 messages of a session meant sorting all of them.
        statements=(),
        postgresql=(
            "DROP INDEX IF EXISTS idx_messages_session_id",
            "CREATE INDEX idx_messages_session_id ON messages(session_id, id)",
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
    """One applied migration: a row of `schema_version`, or (`recorded` False) a version
    below the highest one that has no row of its own, as in the Rust crate's table,
    which keeps only its latest version. Bookkeeping is None where it was not recorded;
    an unrecorded version is named from the code when the code knows it."""

    version: int
    name: str | None
    checksum: str | None
    applied_at: datetime | None
    recorded: bool = True


def applied_migrations(engine: Engine) -> list[AppliedMigration]:
    """The rows of `schema_version` in version order; empty for a fresh database.

    Read-only: takes no write lock and creates nothing.
    """
    prepare_engine(engine)
    with translated_errors("read schema_version"), read_transaction(engine) as conn:
        return _read_applied(conn)


def current_version(engine: Engine) -> int:
    """The highest applied schema version, 0 for a fresh database. Read-only."""
    return version_of(applied_migrations(engine))


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
    _check_applied(applied, migrations, engine.dialect.name)
    return applied


def run_migrations(
    engine: Engine,
    migrations: Sequence[Migration] | None = None,
    *,
    progress: Callable[[int, int], object] | None = None,
) -> int:
    """Bring the database up to the newest of `migrations` (default `MIGRATIONS`, read
    when called) and return the version reached. `progress(done, total)`, if given, is
    called before the first pending migration (`done` 0) and after each one has committed
    (or was found applied by another process), `total` being how many were pending.

    Each pending migration runs in its own write transaction together with its
    `schema_version` row, so a failing one leaves no trace (`MigrationError`, chained
    to the cause) and the ones before it stay applied. The write lock is held from reading
    the version to recording it, so processes migrating at once apply each migration once.
    An up-to-date database is checked read-only and not written at all; a SQLite file
    that was migrated is then put in WAL mode (`enable_wal`). A database newer
    than `migrations` raises `SchemaVersionError`, and one whose recorded checksum differs
    from the code raises `MigrationError`; neither modifies the file. Any SQLite engine
    works: one not made by `open_database` is prepared first (see `prepare_engine`).
    """
    migrations = MIGRATIONS if migrations is None else migrations
    applied = check_schema(engine, migrations)
    version = migrate_from(engine, applied, migrations, progress)
    if version != version_of(applied):
        # A file `open_database(migrate=False)` left as it was, being behind the schema,
        # now is a store this code works on: WAL mode, as `open_database` gives one.
        enable_wal(engine)
    return version


def migrate_from(
    engine: Engine,
    applied: Sequence[AppliedMigration],
    migrations: Sequence[Migration],
    progress: Callable[[int, int], object] | None = None,
) -> int:
    """`run_migrations` for a caller that has just read `applied` with `check_schema`
    (`open_database`): the same transactions, re-reading the version under the lock."""
    pending = _pending(applied, migrations)
    if not pending:
        return version_of(applied)
    before = version_of(applied)

    for done, migration in enumerate(pending):
        if progress is not None:
            progress(done, len(pending))
        with (
            translated_errors(f"apply migration {migration.version}"),
            # Unbounded: on PostgreSQL this waits for another host's migration to end.
            write_transaction(engine, bounded=False) as conn,
        ):
            _lock(conn)
            # Re-read under the write lock: another process may have migrated meanwhile.
            applied = _read_applied(conn)
            _check_applied(applied, migrations, conn.dialect.name)
            if migration in _pending(applied, migrations):
                _apply(conn, migration, before)
    if progress is not None:
        progress(len(pending), len(pending))
    return migrations[-1].version if migrations else 0


def _pending(
    applied: Sequence[AppliedMigration], migrations: Sequence[Migration]
) -> list[Migration]:
    current = version_of(applied)
    return [migration for migration in migrations if migration.version > current]


def version_of(applied: Sequence[AppliedMigration]) -> int:
    """The highest version among `applied` (`applied_migrations`' rows), 0 for none."""
    return max((row.version for row in applied), default=0)


# The one parameter a migration's statements may use, `:before` (SQLite) or
# `%(before)s` (PostgreSQL): the version the store was at when this run of the migrator
# began, so a statement can tell a store this library had migrated before from one it
# adopts now.
_PARAMETERS = (":before", "%(before)s")


def _apply(conn: Connection, migration: Migration, before: int) -> None:
    conn.exec_driver_sql(_CREATE_VERSION_TABLE)
    present = _version_columns(conn)
    for column in _BOOKKEEPING_COLUMNS:
        if column not in present:
            conn.exec_driver_sql(f"ALTER TABLE schema_version ADD COLUMN {column} TEXT")
    dialect = conn.dialect.name
    try:
        for statement in migration.statements_for(dialect):
            if any(name in statement for name in _PARAMETERS):
                conn.exec_driver_sql(statement, {"before": before})
            else:
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
            "checksum": migration.checksum_for(dialect),
            "applied_at": utc_text(datetime.now(UTC)),
        },
    )


def _version_columns(conn: Connection) -> set[str]:
    if conn.dialect.name == "postgresql":
        # The catalogue itself: information_schema's view costs several milliseconds of
        # privilege checks on every open. The table is looked up in current_schema() only,
        # as the migrator creates it there (none at all, NULL, finds no columns).
        rows = conn.exec_driver_sql(
            "SELECT attname FROM pg_attribute WHERE attrelid = "
            "to_regclass(quote_ident(current_schema()) || '.schema_version') "
            "AND attnum > 0 AND NOT attisdropped"
        )
        return {row[0] for row in rows}
    return {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(schema_version)")}


# Any constant shared by every process that migrates; pg_advisory_xact_lock takes a bigint.
_MIGRATION_LOCK = 0x61_69_73_6F_70_6F_64  # "aisopod"


def _lock(conn: Connection) -> None:
    """Serialise migrators: on SQLite the write transaction's lock does it; PostgreSQL has
    no database-wide write lock, so the first statement takes an advisory lock held until
    the transaction ends (several hosts starting at once then migrate exactly once)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")


def _read_applied(conn: Connection) -> list[AppliedMigration]:
    present = _version_columns(conn)
    if not present:
        return []
    selected = ", ".join(
        column if column in present else "NULL" for column in ("version", *_BOOKKEEPING_COLUMNS)
    )
    rows = conn.exec_driver_sql(f"SELECT {selected} FROM schema_version ORDER BY version")
    recorded = {
        int(version): AppliedMigration(
            version=int(version),
            name=name,
            checksum=checksum,
            applied_at=None if applied_at is None else parse_utc_text(applied_at),
        )
        for version, name, checksum, applied_at in rows
    }
    # The version is the highest row: every version below it counts as applied, recorded
    # or not (the crate's table holds one row, its latest version).
    names = {migration.version: migration.name for migration in MIGRATIONS}
    return [
        recorded.get(version)
        or AppliedMigration(version, names.get(version), None, None, recorded=False)
        for version in range(1, max(recorded, default=0) + 1)
    ]


def _check_sequence(migrations: Sequence[Migration]) -> None:
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migrations must be numbered 1, 2, 3, … in order; got {versions}")


def _check_applied(
    applied: Sequence[AppliedMigration], migrations: Sequence[Migration], dialect: str
) -> None:
    newest = version_of(applied)
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
            and row.checksum != migration.checksum_for(dialect)
        ):
            raise MigrationError(
                f"migration {row.version} ({migration.name!r}) was applied with checksum "
                f"{row.checksum[:12]}… but the code's is {migration.checksum_for(dialect)[:12]}…; "
                "a shipped migration was edited (the database was not modified)"
            )
