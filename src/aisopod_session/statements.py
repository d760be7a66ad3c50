"""Every statement the repository runs (rows become objects in `loading.py`).

Statements are written once with SQLAlchemy Core against the models' tables (so a column
renamed in `models.py` cannot drift from the SQL) and compiled once per database, at first
use (`Query.on(dialect)`: a process compiles only what it runs), to SQL text with
positional parameters (`?` for sqlite3, `%s` for psycopg), whose names and order `Sql`
keeps. The repository hands that text to the driver: building, caching and executing a
Core statement per call costs several times more than SQLite takes to run it, and
binding a tuple costs less than binding by name. Parameters carry values already
in their stored form (`StoredText.write`); rows are read back with `StoredText.read`.

Key parameters are named `key_<part>`, because UPDATE reserves column names for its SET
clause.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Select,
    Table,
    Text,
    and_,
    bindparam,
    case,
    cast,
    column,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    table,
    text,
    true,
    update,
    values,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter
from sqlmodel import col

from aisopod_session.clock import SERVER_NOW
from aisopod_session.enums import SessionStatus
from aisopod_session.loading import MESSAGE, SESSION
from aisopod_session.models import ID, Message, Session
from aisopod_session.results import SNIPPET_MARKS
from aisopod_session.validation import dump_json

SQLITE: Dialect = sqlite.dialect()
MESSAGES: Table = Message.__table__  # type: ignore[attr-defined]
SESSIONS: Table = Session.__table__  # type: ignore[attr-defined]  # pysqlite's own paramstyle: `?`, bound from a tuple


def driver_dialect(dialect: Dialect) -> Dialect:
    """The dialect statements are compiled with for an engine's dialect: the same
    database, with positional parameters (`?` for sqlite3, `%s` for psycopg), so that
    they are bound from a tuple."""
    if dialect.name == "sqlite":
        return SQLITE
    if dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

        return PGDialect_psycopg(paramstyle="format")  # type: ignore[no-untyped-call]
    raise ValueError(f"unsupported database {dialect.name!r}")


@dataclass(frozen=True)
class Sql:
    """A compiled statement: its SQL text with positional parameters, and their names in
    order."""

    text: str
    names: tuple[str, ...]

    def bind(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The parameter tuple from values by name (for statements built per shape; the
        hot ones are given their tuple directly, in the order their definition checks)."""
        return tuple(values[name] for name in self.names)


def compile_sql(
    statement: ClauseElement, order: Sequence[str] | None = None, dialect: Dialect = SQLITE
) -> Sql:
    """`statement` compiled for `dialect`. Every parameter must be a `bindparam` the
    caller fills (a literal would hide a parameter the caller does not know to pass);
    `order`, when given, is the parameter order the caller binds, checked here once, so
    a change of the statement cannot silently shift values into the wrong places."""
    compiled = statement.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    hidden = sorted(name for name, value in compiled.params.items() if value is not None)
    if hidden:
        raise TypeError(f"statement has bound literals {hidden}: use bindparam or SQL text")
    names = tuple(compiled.positiontup or ())
    if order is not None and names != tuple(order):
        raise TypeError(f"statement binds {names}, not {tuple(order)}")
    return Sql(str(compiled), names)


class Query:
    """A statement written once with Core and compiled once per database, on first use
    (tests/test_schema.py compiles every one for both databases, so a wrong parameter
    order fails there at once).

    `build` makes the statement for a dialect name; most ignore it, and the few that
    differ (an `INSERT … ON CONFLICT` is a dialect's own construct) choose by it."""

    def __init__(
        self, build: Callable[[str], ClauseElement], order: Sequence[str] | None = None
    ) -> None:
        self._build = build
        self._order = order
        self._compiled: dict[str, Sql] = {}

    @property
    def sqlite(self) -> Sql:
        """This statement compiled for SQLite (cached)."""
        return self.on(SQLITE)

    def on(self, dialect: Dialect) -> Sql:
        """This statement compiled for `dialect` (cached)."""
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            statement = self._build(dialect.name)
            compiled = compile_sql(statement, self._order, driver_dialect(dialect))
            self._compiled[dialect.name] = compiled
        return compiled


def query(statement: ClauseElement, order: Sequence[str] | None = None) -> Query:
    """A `Query` whose statement is the same on every database."""
    return Query(lambda _: statement, order)


def _insert_for(dialect: str) -> Any:
    if dialect == "postgresql":
        # Imported here: SQLAlchemy's PostgreSQL dialect (every driver's) is not needed
        # until a statement is compiled for PostgreSQL.
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert
    return sqlite_insert


KEY_COLUMNS = ("agent_id", "channel", "account_id", "peer_kind", "peer_id")
KEY = tuple(f"key_{name}" for name in KEY_COLUMNS)
"""The key's parameters in the order of `SessionKey.parts()`."""

_BY_KEY = and_(*(getattr(Session, name) == bindparam(f"key_{name}") for name in KEY_COLUMNS))

# --- sessions ---------------------------------------------------------------------------

SELECT_SESSION = query(select(*SESSION.columns).where(_BY_KEY), KEY)
SELECT_SESSION_BY_ID = query(
    select(*SESSION.columns).where(col(Session.id) == bindparam("id")), ("id",)
)
SELECT_SESSION_ID = query(select(col(Session.id)).where(_BY_KEY), KEY)


@functools.cache
def select_sessions(count: int) -> Query:
    """The sessions with any of `count` keys (in no order), in one statement; bound from
    the keys' parts one key after the other."""
    names = [[f"key{i}_{name}" for name in KEY_COLUMNS] for i in range(count)]
    matches = [
        and_(
            *(
                getattr(Session, column) == bindparam(name)
                for column, name in zip(KEY_COLUMNS, key, strict=True)
            )
        )
        for key in names
    ]
    return query(select(*SESSION.columns).where(or_(*matches)), [n for key in names for n in key])


# FOR UPDATE locks the session's row on PostgreSQL for the rest of the transaction (a
# read-modify-write must not lose a concurrent change); SQLite's write transaction holds
# the database lock already, and its compiler leaves the clause out.


def _locked_with_now(dialect: str, *columns: Any) -> Select[Any]:
    """`columns` of the session with the key, its row locked until the transaction ends,
    and the server's time read after the lock was taken (PostgreSQL: the lock is taken
    in a CTE, whose row the outer SELECT reads before computing its own columns; a
    clock in the locking SELECT itself would be read before the wait for the lock). On
    SQLite, whose write lock is the database's, the time is NULL (`clock.StoreClock`
    uses the host's)."""
    if dialect != "postgresql":
        return select(*columns, literal_column("NULL")).where(_BY_KEY)
    locked = select(*columns).where(_BY_KEY).with_for_update().cte("locked")
    return select(*locked.c, literal_column(SERVER_NOW)).select_from(locked)


SELECT_META = Query(
    lambda dialect: _locked_with_now(dialect, col(Session.id), col(Session.meta)), KEY
)
"""The session's id, metadata and (PostgreSQL) the server's time, its row locked."""
LOCK_SESSION = Query(lambda dialect: _locked_with_now(dialect, col(Session.id)), KEY)
"""The session's id and (PostgreSQL) the server's time, its row locked until the
transaction ends."""
SESSION_COUNTERS = query(
    select(
        col(Session.message_count),
        col(Session.token_usage),
        col(Session.input_tokens),
        col(Session.output_tokens),
    ).where(_BY_KEY),
    KEY,
)
INSERT_SESSION = Query(
    lambda dialect: (
        _insert_for(dialect)(Session)
        .values(
            **{name: bindparam(f"key_{name}") for name in KEY_COLUMNS},
            created_at=bindparam("now"),
            updated_at=bindparam("now"),
        )
        .on_conflict_do_nothing(index_elements=list(KEY_COLUMNS))
        .returning(*SESSION.columns)
    ),
    (*KEY, "now", "now"),
)
UPDATE_META = query(
    update(Session)
    .where(_BY_KEY)
    .values(meta=bindparam("meta"), updated_at=bindparam("now"))
    .returning(*SESSION.columns),
    ("now", "meta", *KEY),
)
UPDATE_STATUS = query(
    update(Session)
    .where(_BY_KEY)
    .values(status=bindparam("status"), updated_at=bindparam("now"))
    .returning(*SESSION.columns),
    ("now", "status", *KEY),
)
DELETE_SESSION = query(delete(Session).where(_BY_KEY).returning(col(Session.id)), KEY)


def filter_clauses(fields: Sequence[str], dialect: str = "sqlite") -> list[ColumnElement[bool]]:
    """The conditions on `sessions` of a filter with `fields` set, for a database of the
    `dialect` name: every field's value is the parameter of its name; `agent_scope` is a
    confined repository's agent; `meta_<i>` is a metadata condition whose key and value
    are given by `meta_params`."""
    clauses: list[ColumnElement[bool]] = []
    for name in fields:
        if name.endswith("_after"):
            clauses.append(getattr(Session, name.removesuffix("_after") + "_at") > bindparam(name))
        elif name.endswith("_before"):
            clauses.append(getattr(Session, name.removesuffix("_before") + "_at") < bindparam(name))
        elif name == "agent_scope":
            clauses.append(col(Session.agent_id) == bindparam(name))
        elif name.startswith("meta_"):
            clauses.append(_meta_clause(name, dialect))
        else:
            clauses.append(getattr(Session, name) == bindparam(name))
    return clauses


def _meta_clause(name: str, dialect: str) -> ColumnElement[bool]:
    """The session's metadata holds the key `:<name>_key` with a value equal to the
    parameters' (see `meta_params`). A cell that is not JSON (plain SQL's) matches no
    condition rather than failing the statement."""
    if dialect == "postgresql":
        # jsonb equality: objects compare by their members in any order, 1 equals 1.0.
        condition = text(
            f"(aisopod_jsonb(sessions.metadata) -> :{name}_key) = CAST(:{name}_json AS jsonb)"
        )
    else:
        # SQLite's JSON functions give containers as compact JSON text in stored key
        # order, numbers as their SQL values: `meta_params` passes the value so.
        condition = text(
            "(CASE WHEN json_valid(sessions.metadata) THEN EXISTS (SELECT 1 FROM "
            f"json_each(sessions.metadata) AS j WHERE j.key = :{name}_key AND j.type = "
            f":{name}_type AND (j.type IN ('null', 'true', 'false') OR "
            f"j.value = :{name}_value)) ELSE 0 END)"
        )
    return and_(condition)


def meta_params(index: int, key: str, value: Any) -> dict[str, Any]:
    """The parameters of the `index`th metadata condition: key `key` holds `value` (a
    checked JSON value)."""
    name = f"meta_{index}"
    stored: Any = None
    if value is None:
        kind = "null"
    elif isinstance(value, bool):
        kind = "true" if value else "false"
    elif isinstance(value, int):
        kind, stored = "integer", int(value)
    elif isinstance(value, float):
        kind, stored = "real", float(value)
    elif isinstance(value, str):
        kind, stored = "text", str(value)
    else:
        kind, stored = ("object" if isinstance(value, dict) else "array"), dump_json(value)
    return {
        f"{name}_key": key,
        f"{name}_type": kind,
        f"{name}_value": stored,
        f"{name}_json": dump_json(value),
    }


@functools.cache
def list_sessions(fields: tuple[str, ...], *, count: bool, by_key: bool = False) -> Query:
    """`SELECT` of the sessions matching a filter with `fields` set (see
    `filter_clauses`), newest first (with `by_key`, in key order, which the key's unique
    index gives without a sort), one page (`:limit`, `:offset`); or with `count` their
    number."""

    def build(dialect: str) -> ClauseElement:
        clauses = filter_clauses(fields, dialect)
        if count:
            return select(func.count()).select_from(Session).where(*clauses)
        if by_key:
            order = [getattr(Session, name) for name in KEY_COLUMNS]
        else:
            order = [col(Session.updated_at).desc(), col(Session.id).desc()]
        return (
            select(*SESSION.columns)
            .where(*clauses)
            .order_by(*order)
            .limit(bindparam("limit"))
            .offset(bindparam("offset"))
        )

    return Query(build)


@functools.cache
def page_sessions(fields: tuple[str, ...], *, after: bool) -> Query:
    """One keyset page of the sessions matching a filter with `fields` set, in
    `list_sessions`' order: at most `:limit` rows, and with `after` only those after the
    cursor's row (`:cursor_updated_at`, `:cursor_id`) in that order. The index on
    `(agent_id, updated_at, id)` (or `(updated_at, id)`) is read from the cursor's place
    on, so the thousandth page costs what the first does."""

    def build(dialect: str) -> ClauseElement:
        clauses = filter_clauses(fields, dialect)
        if after:
            # The first term bounds the index range; the second breaks ties by id.
            at: BindParameter[str] = bindparam("cursor_updated_at")
            clauses.append(col(Session.updated_at) <= at)
            clauses.append(
                or_(
                    col(Session.updated_at) < at,
                    col(Session.id) < bindparam("cursor_id"),
                )
            )
        return (
            select(*SESSION.columns)
            .where(*clauses)
            .order_by(col(Session.updated_at).desc(), col(Session.id).desc())
            .limit(bindparam("limit"))
            .offset(literal_column("0"))
        )

    return Query(build)


@functools.cache
def summary(*, scoped: bool) -> Query:
    """Per agent, status and whether every counter is stored as an integer: how many
    sessions, and the sums of their message and token counters (every session, or with
    `scoped` those of `:agent_scope`)."""

    def build(dialect: str) -> ClauseElement:
        # SQLite keeps whatever plain SQL stored; PostgreSQL's columns are integers.
        integral: ColumnElement[Any] = literal_column(
            "(typeof(message_count) = 'integer' AND typeof(token_usage) = 'integer' "
            "AND typeof(input_tokens) = 'integer' AND typeof(output_tokens) = 'integer')"
            if dialect == "sqlite"
            else "TRUE"
        )
        groups: list[Any] = [col(Session.agent_id), col(Session.status)]
        if dialect == "sqlite":
            groups.append(integral)
        statement = select(
            col(Session.agent_id),
            col(Session.status),
            integral,
            func.count(),
            func.sum(col(Session.message_count)),
            func.sum(col(Session.token_usage)),
            func.sum(col(Session.input_tokens)),
            func.sum(col(Session.output_tokens)),
        ).group_by(*groups)
        if scoped:
            statement = statement.where(col(Session.agent_id) == bindparam("agent_scope"))
        return statement.order_by(col(Session.agent_id), col(Session.status))

    return Query(build)


@functools.cache
def export_sessions(fields: tuple[str, ...]) -> Query:
    """Every session matching a filter with `fields` set, in id order (for an export)."""
    return Query(
        lambda dialect: (
            select(*SESSION.columns)
            .where(*filter_clauses(fields, dialect))
            .order_by(col(Session.id))
        )
    )


@functools.cache
def export_messages(fields: tuple[str, ...]) -> Query:
    """Every message of the sessions matching a filter with `fields` set, in id order,
    each followed by its session's key parts (for an export)."""
    return Query(
        lambda dialect: (
            select(*MESSAGE.columns, *(getattr(Session, name) for name in KEY_COLUMNS))
            .select_from(Message)
            .join(Session, col(Message.session_id) == col(Session.id))
            .where(*filter_clauses(fields, dialect))
            .order_by(col(Message.id))
        )
    )


# --- messages ---------------------------------------------------------------------------

# The counters' room is checked before adding: a sum past the column's range would
# become a float on SQLite and fail on PostgreSQL.
_ROOM = (
    col(Session.message_count) <= bindparam("count_room", type_=BigInteger),
    col(Session.token_usage) <= bindparam("token_room", type_=BigInteger),
    col(Session.input_tokens) <= bindparam("input_room", type_=BigInteger),
    col(Session.output_tokens) <= bindparam("output_room", type_=BigInteger),
)
_ADD = {
    "message_count": col(Session.message_count) + bindparam("added", type_=BigInteger),
    "token_usage": col(Session.token_usage) + bindparam("tokens", type_=BigInteger),
    "input_tokens": col(Session.input_tokens) + bindparam("input", type_=BigInteger),
    "output_tokens": col(Session.output_tokens) + bindparam("output", type_=BigInteger),
    "status": literal_column(f"'{SessionStatus.ACTIVE.value}'"),
}
_ADDED = ("added", "tokens", "input", "output")
_ROOMS = ("count_room", "token_room", "input_room", "output_room")
_COUNTERS = (*_ADDED, *_ROOMS)
"""The parameters of `_ADD` then `_ROOM`, in the order they bind."""
COUNT_APPEND = query(
    update(Session)
    .where(_BY_KEY, *_ROOM)
    .values(**_ADD, updated_at=bindparam("now"))
    .returning(col(Session.id)),
    ("now", *_ADDED, *KEY, *_ROOMS),
)
"""Add to a session's counters, if they have room, and make it active; its id, or no
row when there is no such session or no room."""


@functools.cache
def append_in_one(count: int) -> Query:
    """PostgreSQL, on the server's clock: a whole append of `count` messages in one
    statement, in a write transaction (whose `SET LOCAL lock_timeout` bounds every lock
    it waits for). The session's row is locked first, then stamped with the server's
    time read after the lock (clock.py), its counters added to if they have room
    (`COUNT_APPEND`'s rule) and the messages inserted in order with that stamp. One row
    (the session's id, the stamp, the new ids ascending), or none when there is no such
    session or no room, with nothing written.
    Bound from `KEY`, `_COUNTERS`, then each message's role, content, tool calls and
    metadata texts."""
    rows = values(
        column("n", BigInteger),
        *(column(name, Text) for name in ("role", "content", "tool_calls", "metadata")),
        name="new",
    ).data(
        [
            (
                literal_column(str(n)),
                *(bindparam(f"{name}_{n}") for name in ("role", "content", "tool_calls", "meta")),
            )
            for n in range(count)
        ]
    )
    locked = select(col(Session.id)).where(_BY_KEY).with_for_update()
    # The stamp is read over the locked row, so after the wait for its lock (clock.py).
    now = literal_column(SERVER_NOW, Text).label("now")
    stamped = select(locked.cte("locked").c.id, now).cte("stamped")
    counted = (
        update(Session)
        .where(col(Session.id) == stamped.c.id, *_ROOM)
        .values(**_ADD, updated_at=stamped.c.now)
        .returning(col(Session.id), stamped.c.now)
        .cte("counted")
    )
    new = rows.c
    inserted = (
        insert(Message)
        .from_select(
            list(MESSAGE_VALUES),
            select(counted.c.id, new.role, new.content, new.tool_calls, counted.c.now, new.metadata)
            .select_from(counted.join(rows, true()))
            .order_by(new.n),
        )
        .returning(col(Message.id))
        .cte("inserted")
    )
    ids = select(inserted.c.id).order_by(inserted.c.id).scalar_subquery()
    order = [
        *KEY,
        *_COUNTERS,
        *(
            f"{name}_{n}"
            for n in range(count)
            for name in ("role", "content", "tool_calls", "meta")
        ),
    ]
    return query(select(counted.c.id, counted.c.now, func.array(ids)), order)


@functools.cache
def create_in_one() -> Query:
    """PostgreSQL, on the server's clock: the session of a key created, stamped with the
    server's time, unless one exists, in one statement; the new session's row, or none
    when the key had one."""
    stamp = literal_column(SERVER_NOW, Text).label("now")
    now = select(stamp).subquery("stamp")
    key = [bindparam(name, type_=Text) for name in KEY]
    statement = (
        _insert_for("postgresql")(Session)
        .from_select([*KEY_COLUMNS, "created_at", "updated_at"], select(*key, now.c.now, now.c.now))
        .on_conflict_do_nothing(index_elements=list(KEY_COLUMNS))
        .returning(*SESSION.columns)
    )
    return query(statement, KEY)


MESSAGE_VALUES = ("session_id", "role", "content", "tool_calls", "created_at", "metadata")
"""The columns an append writes, in the order of the parameters of `insert_messages`."""
_ATTRIBUTES = {"metadata": "meta"}


@functools.cache
def insert_messages(count: int) -> Query:
    """`INSERT` of `count` messages in one statement, returning their ids; bound from the
    rows' `MESSAGE_VALUES` one row after the other. Ids come back in no promised order,
    but rows get increasing ids in VALUES order, so sorted ids match rows in order."""
    # Keyed by attribute (`meta` maps the `metadata` column: on SQLAlchemy 2.0 the key
    # `metadata` would name the model's `MetaData`).
    rows: list[dict[str, Any]] = [
        {_ATTRIBUTES.get(name, name): bindparam(f"{name}_{i}") for name in MESSAGE_VALUES}
        for i in range(count)
    ]
    order = [f"{name}_{i}" for i in range(count) for name in MESSAGE_VALUES]
    return query(insert(Message).values(rows).returning(col(Message.id)), order)


@functools.cache
def history(*, newest_first: bool, limit: bool, after: bool, before: bool) -> Query:
    """The session's id and its messages in one statement (one snapshot, one round
    trip): the session row is outer-joined to the messages between the exclusive bounds
    `:after_id` and `:before_id`, so a session without such messages still gives one row
    (its message columns NULL), and no row means no session. Ordered by message id,
    newest first if asked, at most `:limit` rows if asked.

    On PostgreSQL the messages are a LATERAL subquery of the session with its own order
    and limit, read off `idx_messages_session_id` (session_id, id) from its end: a join
    ordered outside could not use that index's order (a nested loop keeps only its outer
    side's), and would sort every message of the session to return the newest 50."""
    on = [col(Message.session_id) == col(Session.id)]
    if after:
        on.append(col(Message.id) > bindparam("after_id"))
    if before:
        on.append(col(Message.id) < bindparam("before_id"))

    def build(dialect: str) -> ClauseElement:
        if dialect == "postgresql":
            inner = (
                select(*MESSAGE.columns)
                .where(*on)
                .order_by(col(Message.id).desc() if newest_first else col(Message.id))
            )
            if limit:
                inner = inner.limit(bindparam("limit")).offset(bindparam("offset"))
            picked = inner.lateral("picked")
            return (
                select(col(Session.id), *picked.c)
                .select_from(Session)
                .outerjoin(picked, true())
                .where(_BY_KEY)
                .order_by(picked.c.id.desc() if newest_first else picked.c.id)
            )
        statement = (
            select(col(Session.id), *MESSAGE.columns)
            .select_from(Session)
            .outerjoin(Message, and_(*on))
            .where(_BY_KEY)
            .order_by(col(Message.id).desc() if newest_first else col(Message.id))
        )
        if limit:
            statement = statement.limit(bindparam("limit")).offset(bindparam("offset"))
        return statement

    return Query(build)


def _history_text(dialect: str) -> ClauseElement:
    cells = (col(Message.role), col(Message.content), col(Message.meta))
    if dialect == "postgresql":
        # As in `history`: an InitPlan's session id is unknown to the planner, which
        # then reads every message of the session and sorts them.
        picked = (
            select(*cells, col(Message.id))
            .where(col(Message.session_id) == col(Session.id))
            .order_by(col(Message.id).desc())
            .limit(bindparam("limit"))
            .offset(bindparam("offset"))
            .lateral("picked")
        )
        return (
            select(picked.c.role, picked.c.content, picked.c.meta)
            .select_from(Session)
            .join(picked, true())
            .where(_BY_KEY)
            .order_by(picked.c.id.desc())
        )
    return (
        select(*cells)
        .where(col(Message.session_id) == select(col(Session.id)).where(_BY_KEY).scalar_subquery())
        .order_by(col(Message.id).desc())
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )


HISTORY_TEXT = Query(_history_text)
"""The role, content and metadata cells, as stored, of the newest `:limit` messages of
the session with the key, newest first (no row for no session and for no message:
`SELECT_SESSION_ID` tells which); parameters in a different order on each database
(bind by name). Read off `idx_messages_session_id` (session_id, id)
from its end, on PostgreSQL through a LATERAL subquery as in `history`."""


# --- lifecycle --------------------------------------------------------------------------

_BY_SESSION_ID = col(Session.id) == bindparam("session_id")

NEWEST_REMOVED = query(
    select(col(Message.id), col(Message.created_at))
    .where(col(Message.session_id) == bindparam("session_id"))
    .order_by(col(Message.id).desc())
    .limit(literal_column("1"))
    .offset(bindparam("keep_last")),
    ("session_id", "keep_last"),
)
"""The id and stored `created_at` of the newest message outside the newest `keep_last`
(none if there is no such message): compaction removes every message up to it."""

DELETE_MESSAGES_UP_TO = query(
    delete(Message).where(
        col(Message.session_id) == bindparam("session_id"), col(Message.id) <= bindparam("last")
    ),
    ("session_id", "last"),
)
INSERT_MESSAGE_WITH_ID = query(
    insert(Message).values(
        id=bindparam("id"),
        session_id=bindparam("session_id"),
        role=bindparam("role"),
        content=bindparam("content"),
        tool_calls=bindparam("tool_calls"),
        created_at=bindparam("created_at"),
        meta=bindparam("metadata"),
    ),
    ("id", "session_id", "role", "content", "tool_calls", "created_at", "metadata"),
)
_ROWS_OF_SESSION = (
    select(func.count())
    .select_from(Message)
    .where(col(Message.session_id) == col(Session.id))
    .scalar_subquery()
)
RECOUNT_MESSAGES = query(
    update(Session).where(_BY_SESSION_ID).values(message_count=_ROWS_OF_SESSION),
    ("session_id",),
)
"""A session's `message_count` set to its rows' number."""
NEWEST_MESSAGES = query(
    select(*MESSAGE.columns)
    .where(col(Message.session_id) == bindparam("session_id"))
    .order_by(col(Message.id).desc())
    .limit(bindparam("count"))
    .offset(literal_column("0")),  # else SQLite's LIMIT binds an OFFSET of its own
    ("session_id", "count"),
)
"""A session's newest `count` messages, newest first."""
OLDEST_BETWEEN = query(
    select(*MESSAGE.columns)
    .where(
        col(Message.session_id) == bindparam("session_id"),
        col(Message.id) > bindparam("after"),
        col(Message.id) < bindparam("before"),
    )
    .order_by(col(Message.id))
    .limit(bindparam("count"))
    .offset(literal_column("0")),
    ("session_id", "after", "before", "count"),
)
"""A session's oldest `count` messages between two ids (both excluded), oldest first."""
DELETE_MESSAGES_FROM = query(
    delete(Message).where(
        col(Message.session_id) == bindparam("session_id"), col(Message.id) >= bindparam("first")
    ),
    ("session_id", "first"),
)
RECORD_COMPACTION = query(
    update(Session)
    .where(_BY_SESSION_ID)
    .values(
        message_count=_ROWS_OF_SESSION,
        compaction_count=col(Session.compaction_count) + literal_column("1"),
        last_compacted_at=bindparam("now"),
        last_compaction_summary=bindparam("summary"),
        status=literal_column(f"'{SessionStatus.COMPACTED.value}'"),
        updated_at=bindparam("now"),
    )
    .returning(*SESSION.columns),
    ("now", "now", "summary", "session_id"),
)
DELETE_SESSION_MESSAGES = query(
    delete(Message).where(col(Message.session_id) == bindparam("session_id")), ("session_id",)
)
RESET_SESSION = query(
    update(Session)
    .where(_BY_SESSION_ID)
    .values(
        message_count=literal_column("0"),
        token_usage=literal_column("0"),
        input_tokens=literal_column("0"),
        output_tokens=literal_column("0"),
        compaction_count=literal_column("0"),
        last_compacted_at=literal_column("NULL"),
        last_compaction_summary=literal_column("NULL"),
        status=literal_column(f"'{SessionStatus.ACTIVE.value}'"),
        updated_at=bindparam("now"),
    )
    .returning(*SESSION.columns),
    ("now", "session_id"),
)

_LAST_ID = select(func.max(col(Message.id))).where(
    col(Message.session_id) == bindparam("session_id")
)
"""The id of the session's newest message (NULL if it has none)."""
DELETE_NEWEST_MESSAGE = query(
    delete(Message)
    .where(col(Message.id) == _LAST_ID.scalar_subquery())
    .returning(*MESSAGE.columns),
    ("session_id",),
)
"""The session's newest message (highest id), deleted and returned (no row if none)."""
RECORD_POP = query(
    update(Session)
    .where(_BY_SESSION_ID)
    .values(
        # Never below 0, whatever another program left in the counter.
        message_count=case(
            (
                col(Session.message_count) > literal_column("0"),
                col(Session.message_count) - literal_column("1"),
            ),
            else_=literal_column("0"),
        ),
        updated_at=bindparam("now"),
    ),
    ("now", "session_id"),
)


def _lifecycle_scope(*, status: bool, scoped: bool) -> list[ColumnElement[bool]]:
    clauses = [col(Session.updated_at) < bindparam("before")]
    if status:
        clauses.append(col(Session.status) == bindparam("status"))
    if scoped:
        clauses.append(col(Session.agent_id) == bindparam("agent_scope"))
    return clauses


@functools.cache
def mark_idle(*, scoped: bool) -> Query:
    """Active sessions not updated since `:before` become idle; `updated_at` is kept."""
    return query(
        update(Session)
        .where(*_lifecycle_scope(status=True, scoped=scoped))
        .values(status=literal_column(f"'{SessionStatus.IDLE.value}'"))
    )


def _prune_scope(
    dialect: str, *, status: bool, fields: tuple[str, ...]
) -> list[ColumnElement[bool]]:
    # `prune_status`: a filter's own `status` field binds `status`.
    clauses = [col(Session.updated_at) < bindparam("before")]
    if status:
        clauses.append(col(Session.status) == bindparam("prune_status"))
    return clauses + filter_clauses(fields, dialect)


@functools.cache
def prune_candidates(*, status: bool, fields: tuple[str, ...]) -> Query:
    """Ids and message counts of the next `:limit` sessions to prune, by id: updated
    before `:before`, with `:prune_status` if `status`, matching a filter with `fields` set
    (`agent_scope` among them for a confined repository)."""
    return Query(
        lambda dialect: (
            select(col(Session.id), col(Session.message_count))
            .where(*_prune_scope(dialect, status=status, fields=fields))
            .order_by(col(Session.id))
            .limit(bindparam("limit"))
            .offset(literal_column("0"))
        )
    )


@functools.cache
def prune_count(*, status: bool, fields: tuple[str, ...]) -> Query:
    """How many sessions a prune would delete."""
    return Query(
        lambda dialect: (
            select(func.count())
            .select_from(Session)
            .where(*_prune_scope(dialect, status=status, fields=fields))
        )
    )


@functools.cache
def prune_delete(*, status: bool, fields: tuple[str, ...]) -> Query:
    """Delete the sessions matching the prune's condition with ids up to `:last` (the
    last of a batch picked by `prune_candidates` in the same transaction; the condition
    is checked again, so a session written to since is kept). Messages go with them
    through `ON DELETE CASCADE`."""
    return Query(
        lambda dialect: delete(Session).where(
            *_prune_scope(dialect, status=status, fields=fields),
            col(Session.id) <= bindparam("last"),
        )
    )


# --- fork -------------------------------------------------------------------------------

MESSAGE_IN_SESSION = query(
    select(col(Message.id)).where(
        col(Message.id) == bindparam("id"),
        col(Message.session_id) == bindparam("session_id"),
    ),
    ("id", "session_id"),
)
LAST_MESSAGE_ID = query(_LAST_ID, ("session_id",))
INSERT_FORK = Query(
    lambda dialect: (
        _insert_for(dialect)(Session)
        .values(
            **{name: bindparam(f"key_{name}") for name in KEY_COLUMNS},
            created_at=bindparam("now"),
            updated_at=bindparam("now"),
            meta=bindparam("meta"),
            parent_id=bindparam("parent_id"),
            forked_from_message_id=bindparam("forked_from"),
        )
        .on_conflict_do_nothing(index_elements=list(KEY_COLUMNS))
        .returning(col(Session.id))
    ),
    (*KEY, "now", "now", "meta", "parent_id", "forked_from"),
)
"""A fork's new session; no row when its key is taken."""
_COPIED = (
    col(Message.role),
    col(Message.content),
    col(Message.tool_calls),
    col(Message.created_at),
    col(Message.meta),
)
COPY_MESSAGES = query(
    insert(Message).from_select(
        [col(Message.session_id), *_COPIED],
        # A bare parameter takes no type from a column: the ids' own (`models.ID`).
        select(bindparam("new_id", type_=ID), *_COPIED)
        .where(
            col(Message.session_id) == bindparam("session_id"),
            col(Message.id) <= bindparam("last"),
        )
        .order_by(col(Message.id)),
    ),
    ("new_id", "session_id", "last"),
)
"""Copy a session's messages up to `:last` to `:new_id`, in id order (so in the same
order under new ids), every column but the two ids as it is."""
SET_MESSAGE_COUNT = query(
    update(Session)
    .where(col(Session.id) == bindparam("session_id"))
    .values(message_count=bindparam("count", type_=BigInteger))
    .returning(*SESSION.columns),
    ("count", "session_id"),
)


# --- search -----------------------------------------------------------------------------

SNIPPET_WORDS = 16
"""About how many words of a message's search text a snippet shows."""


@functools.cache
def search(fields: tuple[str, ...], roles: int) -> Query:
    """The messages whose search text holds every term of the query, best first, at most
    `:limit`, of the sessions matching a filter with `fields` set
    and with one of `roles` roles (`:role_<i>`; 0: any role). Each row: the message's
    columns, its session's key parts, the snippet and the rank (higher is better).

    SQLite: `:query` is an FTS5 query of quoted phrases (`fts_query`), matched against
    the FTS5 table `messages_fts`; its bm25 is negated. PostgreSQL: `:terms` is the
    text of the terms' `tsquery` (`SEARCH_QUERY`, `:tsquery`), matched against the GIN index
    over `migrations.PG_SEARCH_VECTOR`; ranked by `ts_rank`, and the snippets cut by
    `ts_headline` for the page's rows alone."""

    def build(dialect: str) -> ClauseElement:
        clauses = filter_clauses(fields, dialect)
        if roles:
            clauses.append(col(Message.role).in_([bindparam(f"role_{i}") for i in range(roles)]))
        keys = [getattr(Session, name) for name in KEY_COLUMNS]
        if dialect == "postgresql":
            return _search_postgresql(clauses, keys)
        fts = table("messages_fts", column("rowid"), column("rank"))
        joined = fts.join(MESSAGES, col(Message.id) == fts.c.rowid).join(
            SESSIONS, col(Message.session_id) == col(Session.id)
        )
        marks = "', '".join(SNIPPET_MARKS)
        # Ordered by FTS5's `rank` alone, FTS5 sorts the matches itself and the rows come
        # out in that order: SQLite then reads the rows and cuts snippets for the page
        # only (with any other ORDER BY term it would sort, cutting a snippet for every
        # match first, and a common word matches thousands of messages).
        return (
            select(
                *MESSAGE.columns,
                *keys,
                literal_column(f"snippet(messages_fts, 0, '{marks}', '…', {SNIPPET_WORDS})"),
                literal_column("-bm25(messages_fts)"),
            )
            .select_from(joined)
            .where(text("messages_fts MATCH :query"), *clauses)
            .order_by(fts.c.rank)
            .limit(bindparam("limit"))
            .offset(literal_column("0"))
        )

    return Query(build)


# A search's terms as one `tsquery`'s text (NULL: no term holds a word), made by a
# statement of its own before the search (`SEARCH_QUERY`): each term a phrase of its
# words, all of them required. PostgreSQL's parser reads a token by what surrounds it
# (`..` alone is a file name, after a space nothing; `../x` alone one name, after a
# space `/x`), and a message's words are read after a space but its first word after
# nothing: each term matches in either reading, read between spaces and read alone; a
# term with no word between spaces asks nothing. (Migration 4's `aisopod_tsquery` read
# each term alone.)
_PG_TSQUERY = """(SELECT string_agg('(' || q::text || ')', ' & ')::tsquery
 FROM (SELECT CASE WHEN numnode(alone) > 0 AND alone <> spaced
                   THEN spaced || alone ELSE spaced END AS q
       FROM (SELECT phraseto_tsquery('simple'::regconfig, ' ' || term || ' ') AS spaced,
                    phraseto_tsquery('simple'::regconfig, term) AS alone
             FROM unnest(:terms) AS term) AS readings
       WHERE numnode(spaced) > 0) AS terms)"""


# Whether a term, in either reading, holds a token PostgreSQL leaves out of a query and
# out of every message's index alike: one of 2 048 bytes or more ("word is too long to
# be indexed"), whichever kind of token its parser makes of it (a word, a URL, an e-mail
# address, a path), spaces aside. Without that token the term would ask less, and find
# messages without it.
_PG_TOO_LONG = """EXISTS (SELECT 1 FROM unnest(:terms) AS term,
       LATERAL (VALUES (term), (' ' || term || ' ')) AS reading(text),
       LATERAL ts_parse('default', reading.text) AS token
 WHERE octet_length(token.token) >= 2048
   AND token.tokid <> (SELECT tokid FROM ts_token_type('default') WHERE alias = 'blank'))"""


def _search_query(dialect: str) -> ClauseElement:
    from sqlalchemy.dialects.postgresql import ARRAY

    # The parse runs only when a term could hold such a token (`:long`, a term of 2 048
    # bytes or more): CASE evaluates its branches lazily.
    checked = f"CASE WHEN :long THEN {_PG_TOO_LONG} ELSE false END"
    return text(f"SELECT {_PG_TSQUERY}::text, {checked}").bindparams(
        bindparam("terms", type_=ARRAY(Text)), bindparam("long", type_=Boolean)
    )


SEARCH_QUERY = Query(_search_query, ("terms", "long", "terms"))
"""PostgreSQL: the `tsquery` text of a search's `:terms` (see `_PG_TSQUERY`), and
whether a term holds a token too long for PostgreSQL to index (`_PG_TOO_LONG`; looked
for when `:long`, some term being of 2 048 bytes of UTF-8 or more)."""


def _search_postgresql(clauses: list[ColumnElement[bool]], keys: list[Any]) -> ClauseElement:

    from sqlalchemy.dialects.postgresql import TSQUERY

    from aisopod_session.migrations import PG_SEARCH_VECTOR

    def tsquery() -> Any:
        # The query `search_query` made, as text: a constant when the statement is
        # planned, as a call of an immutable function on the terms would be, so the
        # planner weighs its size (a long query is not worth the GIN index).
        return cast(bindparam("tsquery", type_=Text), TSQUERY)

    vector: ColumnElement[Any] = literal_column(
        PG_SEARCH_VECTOR.replace("(content)", "(messages.content)")
    )
    joined = MESSAGES.join(SESSIONS, col(Message.session_id) == col(Session.id))
    hits = (
        select(col(Message.id).label("hit_id"), func.ts_rank(vector, tsquery()).label("hit_rank"))
        .select_from(joined)
        .where(vector.op("@@")(tsquery()), *clauses)
        .order_by(literal_column("hit_rank").desc(), col(Message.id).desc())
        .limit(bindparam("limit"))
        .offset(literal_column("0"))
        .subquery("hits")
    )
    marks = SNIPPET_MARKS
    options = (
        f"'StartSel={marks[0]}, StopSel={marks[1]}, MaxWords={SNIPPET_WORDS}, "
        f'MinWords={SNIPPET_WORDS // 2}, MaxFragments=2, FragmentDelimiter=" … "\''
    )
    headline = func.ts_headline(
        literal_column("'simple'::regconfig"),
        func.coalesce(func.aisopod_message_text(col(Message.content)), literal_column("''")),
        tsquery(),
        literal_column(options),
    )
    return (
        select(*MESSAGE.columns, *keys, headline, hits.c.hit_rank)
        .select_from(
            hits.join(MESSAGES, col(Message.id) == hits.c.hit_id).join(
                SESSIONS, col(Message.session_id) == col(Session.id)
            )
        )
        .order_by(hits.c.hit_rank.desc(), col(Message.id).desc())
    )


def fts_query(terms: Sequence[str]) -> str:
    """An FTS5 query requiring every term as a phrase: each term in double quotes (its
    own quotes doubled), so FTS5's operators and syntax in user text are plain
    characters (the tokenizer then keeps only the words)."""
    return " ".join('"' + term.replace('"', '""') + '"' for term in terms)


def warm(dialect: Dialect) -> None:
    """Compile now, for `dialect`, every statement the repository runs and the common
    shapes of those it builds per call (history windows, unfiltered lists, prunes,
    one- and two-message appends), instead of on first use. An asyncio repository on
    PostgreSQL compiles on the event loop, where each would hold it for a few ms once."""
    for value in list(globals().values()):
        if isinstance(value, Query):
            value.on(dialect)
    flags = (False, True)
    for newest_first, limit, after, before in itertools.product(flags, repeat=4):
        history(newest_first=newest_first, limit=limit, after=after, before=before).on(dialect)
    for scoped in flags:
        summary(scoped=scoped).on(dialect)
    for fields in ((), ("agent_scope",)):
        for counting in flags:
            list_sessions(fields, count=counting).on(dialect)
        list_sessions(fields, count=False, by_key=True).on(dialect)
    for status, scoped in itertools.product(flags, repeat=2):
        fields = ("agent_scope",) if scoped else ()
        for build in (prune_candidates, prune_count, prune_delete):
            build(status=status, fields=fields).on(dialect)
        mark_idle(scoped=scoped).on(dialect)
    for rows in (1, 2):
        insert_messages(rows).on(dialect)


def compile_all(dialect: Dialect) -> None:
    """Compile for `dialect` now every fixed statement of this module, every shape of
    `history` and `insert_messages` for batches of up to `WARM_BATCH` messages (larger
    ones compile on first use, about a millisecond each): what `open_async_database` does
    on a worker thread, so that the first inline calls do not compile on the loop."""
    for value in list(globals().values()):
        if isinstance(value, Query):
            value.on(dialect)
    for newest_first, limit, after, before in itertools.product((False, True), repeat=4):
        history(newest_first=newest_first, limit=limit, after=after, before=before).on(dialect)
    for count in range(1, WARM_BATCH + 1):
        insert_messages(count).on(dialect)


WARM_BATCH = 8
"""The largest batch whose INSERT `compile_all` compiles ahead of use."""
