"""aisopod-session: the session and message store of the aisopod AI-agent gateway.

Open a store with `open_database`, inject a `SessionRepository` into your services, and
address conversations by `SessionKey`.

Every public name is imported from its module on first use (PEP 562), so that importing
the package, or a light module of it such as `aisopod_session.enums` (which the
`aisopod-session` command's `--help` needs), does not import SQLAlchemy, SQLModel or
pydantic.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    __version__: str
    """The installed distribution's version (from its metadata)."""

    from aisopod_session.asyncrepository import AsyncSessionRepository
    from aisopod_session.copying import CopyResult, copy_database
    from aisopod_session.database import (
        database_url,
        open_async_database,
        open_async_database_sync,
        open_database,
    )
    from aisopod_session.enums import PeerKind, Role, SessionStatus
    from aisopod_session.errors import (
        AccessDeniedError,
        DamagedRowError,
        DatabaseBusyError,
        HistoryChangedError,
        MigrationError,
        SchemaVersionError,
        SessionExistsError,
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
    from aisopod_session.models import Message, NewMessage, Session, SessionFilter
    from aisopod_session.repository import SessionRepository
    from aisopod_session.results import (
        SNIPPET_MARKS,
        AppliedChanges,
        CompactionResult,
        SearchHit,
        SessionPage,
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
    from aisopod_session.validation import JSONValue

_MODULES: dict[str, tuple[str, ...]] = {
    "copying": ("CopyResult", "copy_database"),
    "database": (
        "database_url",
        "open_async_database",
        "open_async_database_sync",
        "open_database",
    ),
    "enums": ("PeerKind", "Role", "SessionStatus"),
    "errors": (
        "AccessDeniedError",
        "DamagedRowError",
        "DatabaseBusyError",
        "HistoryChangedError",
        "MigrationError",
        "SchemaVersionError",
        "SessionExistsError",
        "SessionNotFoundError",
        "SessionStoreError",
    ),
    "keys": ("SessionKey",),
    "migrations": (
        "MIGRATIONS",
        "SCHEMA_VERSION",
        "AppliedMigration",
        "Migration",
        "applied_migrations",
        "check_schema",
        "current_version",
        "run_migrations",
    ),
    "models": ("Message", "NewMessage", "Session", "SessionFilter"),
    "asyncrepository": ("AsyncSessionRepository",),
    "repository": ("SessionRepository",),
    "results": (
        "SNIPPET_MARKS",
        "AppliedChanges",
        "CompactionResult",
        "SearchHit",
        "SessionPage",
        "StoreSummary",
        "Totals",
    ),
    "settings": ("DEFAULT_BUSY_TIMEOUT",),
    "transactions": ("prepare_engine", "write_engine"),
    "transfer": ("ExportResult", "ImportResult", "LineError", "export_jsonl", "import_jsonl"),
    "validation": ("JSONValue",),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}
"""Each public name to the module (of this package) that defines it."""


# Hidden from type checkers, which see the imports above instead (a visible module
# `__getattr__` would make every misspelt name of this package pass as `Any`).
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        """A public name, imported from its module on first use and kept here after.
        `__version__` too: reading the distribution's metadata imports importlib.metadata,
        ~30 ms that every command but `--version` would pay."""
        if name == "__version__":
            globals()[name] = _installed_version()
            return globals()[name]
        module = _WHERE.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aisopod-session")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree not installed
        return "0+unknown"


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SNIPPET_MARKS",
    "AccessDeniedError",
    "AppliedChanges",
    "AppliedMigration",
    "AsyncSessionRepository",
    "CompactionResult",
    "CopyResult",
    "DamagedRowError",
    "DatabaseBusyError",
    "ExportResult",
    "HistoryChangedError",
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
    "SearchHit",
    "Session",
    "SessionExistsError",
    "SessionFilter",
    "SessionKey",
    "SessionNotFoundError",
    "SessionPage",
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
    "open_async_database_sync",
    "open_database",
    "prepare_engine",
    "run_migrations",
    "write_engine",
]
