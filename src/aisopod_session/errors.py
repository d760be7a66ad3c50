"""The error taxonomy: catch `SessionStoreError` for everything the store raises itself.

Invalid input is not in this tree on purpose: it raises `ValueError` (pydantic's
`ValidationError` is one) naming the field, before anything is written, so callers can
tell "you passed something wrong" from "the store could not do it".
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import exc as sa_exc


class SessionStoreError(Exception):
    """Base class of every error the session store raises about the database itself."""


class SessionNotFoundError(SessionStoreError, LookupError):
    """No session exists for the key or id a method needs."""


class SessionExistsError(SessionStoreError):
    """A call that creates a session under a given key (`create`, `fork`) found one there
    already; nothing was written."""


class HistoryChangedError(SessionStoreError):
    """`replace_messages(..., replacing=messages)` found other newest messages than
    `messages` (one appended, popped, deleted or rewritten since they were read); nothing
    was written."""


class AccessDeniedError(SessionStoreError):
    """A repository confined to one agent (`for_agent`) was given another agent's key."""


class SchemaVersionError(SessionStoreError):
    """The database's schema is newer than this code knows; nothing was modified."""


class MigrationError(SessionStoreError):
    """A migration failed (and was rolled back) or no longer matches what was applied."""


class DatabaseBusyError(SessionStoreError):
    """The write lock (on PostgreSQL, a row lock) could not be taken within the busy
    timeout; or no connection of a PostgreSQL engine's pool came free within its
    timeout (SQLAlchemy's `pool_timeout`, 30 s), every one held by other calls."""


class DamagedRowError(SessionStoreError):
    """A stored row holds a value this code cannot read: written by plain SQL or another
    program, or damaged. Names the table, the row's id and the column; nothing was
    changed. Listing, export and `summary` go on past such rows and report them."""

    def __init__(self, table: str, row_id: object, column: str, reason: str) -> None:
        self.table = table
        self.row_id = row_id
        self.column = column
        self.reason = reason
        super().__init__(f"{table} row {row_id}, column {column}: {reason}")


_SQLITE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error,)


def driver_errors() -> tuple[type[Exception], ...]:
    """The base errors of the drivers the store runs on: sqlite3's, and psycopg's once
    psycopg is imported. A psycopg error can only exist once it is, and the store imports
    it only for a PostgreSQL URL: looking it up here, instead of importing it, keeps a
    SQLite store's process (and the `aisopod-session` command) from paying for it."""
    error = getattr(sys.modules.get("psycopg"), "Error", None)
    if isinstance(error, type) and issubclass(error, Exception):
        return (sqlite3.Error, error)
    return _SQLITE_ERRORS


def _translated() -> tuple[type[Exception], ...]:
    """The errors `translate` turns into `SessionStoreError`s."""
    return (sa_exc.StatementError, sa_exc.TimeoutError, *driver_errors())


def is_busy(error: BaseException) -> bool:
    """Whether a driver error means another connection holds a lock we need."""
    reason = str(error)
    if isinstance(error, sqlite3.OperationalError):
        return "locked" in reason or "busy" in reason
    # PostgreSQL: lock_not_available (a lock_timeout ran out) or a deadlock broken.
    return getattr(error, "sqlstate", None) in ("55P03", "40P01")


@contextmanager
def translated_errors(action: str) -> Iterator[None]:
    """Re-raise driver and SQLAlchemy errors as `SessionStoreError`s (see `translate`),
    chaining the original."""
    try:
        yield
    except SessionStoreError:
        raise
    except _translated() as exc:
        raise translate(exc, action) from exc


def translate(error: BaseException, action: str) -> BaseException:
    """The `SessionStoreError` for a driver or SQLAlchemy error (other exceptions are
    returned as they are). `action` says what was being done ("append_messages"), so the
    message names the operation as well as the reason."""
    if isinstance(error, SessionStoreError) or not isinstance(error, _translated()):
        return error
    if isinstance(error, sa_exc.TimeoutError):
        # SQLAlchemy's own: every connection of the engine's pool stayed checked out.
        reason = str(error).split(" (Background on this error", 1)[0]
        return DatabaseBusyError(
            f"{action}: no connection of the engine's pool came free in time, all in use by "
            f"other calls (open_database's pool_size and max_overflow size it; {reason})"
        )
    # SQLAlchemy wraps driver errors (and errors binding parameters); the driver's own
    # are not wrapped.
    cause = error.orig if isinstance(error, sa_exc.StatementError) and error.orig else error
    if is_busy(cause):
        return DatabaseBusyError(
            f"{action}: the database stayed locked by another writer past the busy "
            f"timeout ({cause})"
        )
    return SessionStoreError(f"{action}: {describe(cause)}")


# What SQLite's primary result codes mean to someone who opened a session store.
_MEANINGS = {
    "SQLITE_NOTADB": "the file is not a SQLite database (or is encrypted)",
    "SQLITE_CORRUPT": "the database file is damaged: truncated or overwritten",
    "SQLITE_CANTOPEN": "the database file cannot be opened: missing folder or no access",
    "SQLITE_READONLY": "the database is read-only for this process",
    "SQLITE_PERM": "this process may not access the database file",
    "SQLITE_FULL": "the disk is full",
    "SQLITE_IOERR": "the disk reported an I/O error",
}


def describe(error: BaseException) -> str:
    """A driver error's reason, led by what it means when SQLite's result code says more
    than its message (`database disk image is malformed` means a damaged file)."""
    reason = str(error)
    code = getattr(error, "sqlite_errorname", None)
    if isinstance(code, str):
        # Extended codes (SQLITE_READONLY_DBMOVED) share their primary code's meaning.
        meaning = _MEANINGS.get("_".join(code.split("_")[:2]))
        if meaning is not None:
            return f"{meaning} ({reason})"
    return reason
