"""aisopod-session: the session and message store of the aisopod AI-agent gateway.

Open a store with `open_database`, inject a `SessionRepository` into your services, and
address conversations by `SessionKey`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aisopod-session")
    """The installed distribution's version (from its metadata)."""
except PackageNotFoundError:  # pragma: no cover - run from a source tree not installed
    __version__ = "0+unknown"

from aisopod_session.copying import CopyResult, copy_database
from aisopod_session.database import database_url, open_async_database, open_database
from aisopod_session.enums import PeerKind, Role, SessionStatus
from aisopod_session.errors import (
    AccessDeniedError,
    DamagedRowError,
    DatabaseBusyError,
    MigrationError,
    SchemaVersionError,
    SessionNotFoundError,
    SessionStoreError,
)
from aisopod_session.keys import SessionKey
from aisopod_session.migrations import (
    MIGRATIONS,
    SCHEMA_VERSION,
    AppliedMigration,
    Migration,
    applied_migrations,
    check_schema,
    current_version,
    run_migrations,
)
from aisopod_session.models import JSONValue, Message, NewMessage, Session, SessionFilter
from aisopod_session.repository import (
    AsyncSessionRepository,
    CompactionResult,
    SessionRepository,
    StoreSummary,
    Totals,
)
from aisopod_session.settings import DEFAULT_BUSY_TIMEOUT
from aisopod_session.transactions import prepare_engine, write_engine
from aisopod_session.transfer import (
    ExportResult,
    ImportResult,
    LineError,
    export_jsonl,
    import_jsonl,
)

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "AccessDeniedError",
    "AppliedMigration",
    "AsyncSessionRepository",
    "CompactionResult",
    "CopyResult",
    "DamagedRowError",
    "DatabaseBusyError",
    "ExportResult",
    "ImportResult",
    "JSONValue",
    "LineError",
    "Message",
    "Migration",
    "MigrationError",
    "NewMessage",
    "PeerKind",
    "Role",
    "SchemaVersionError",
    "Session",
    "SessionFilter",
    "SessionKey",
    "SessionNotFoundError",
    "SessionRepository",
    "SessionStatus",
    "SessionStoreError",
    "StoreSummary",
    "Totals",
    "__version__",
    "applied_migrations",
    "check_schema",
    "copy_database",
    "current_version",
    "database_url",
    "export_jsonl",
    "import_jsonl",
    "open_async_database",
    "open_database",
    "prepare_engine",
    "run_migrations",
    "write_engine",
]
