"""Every statement the repository runs, and the one way rows become model objects.

Statements are written once with SQLAlchemy Core against the models' tables (so a column
renamed in `models.py` cannot drift from the SQL) and compiled once, at import or at the
first use of their shape, to SQL text with named parameters. The repository hands that
text to the driver: building, caching and executing a Core statement per call costs
several times more than SQLite takes to run it. Parameters carry values already in their
stored form (`StoredText.write`); rows are read back with `StoredText.read`.

Key parameters are named `key_<part>`, because UPDATE reserves column names for its SET
clause.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    ColumnElement,
    Integer,
    and_,
    bindparam,
    delete,
    func,
    insert,
    inspect,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm.state import InstanceState as _InstanceState
from sqlalchemy.sql import ClauseElement
from sqlmodel import SQLModel, col

from aisopod_session.enums import SessionStatus
from aisopod_session.models import Message, Session, StoredText

Model = TypeVar("Model", bound=SQLModel)

_DIALECT = sqlite.dialect(paramstyle="named")


def compile_sql(statement: ClauseElement) -> str:
    """`statement` as SQLite SQL text with `:name` parameters, every one of them a
    `bindparam` the caller fills (a literal value would hide a parameter in the text
    that the caller does not know to pass)."""
    compiled = statement.compile(dialect=_DIALECT)
    hidden = sorted(name for name, value in compiled.params.items() if value is not None)
    if hidden:
        raise TypeError(f"statement has bound literals {hidden}: use bindparam or SQL text")
    return str(compiled)


class Loader(Generic[Model]):
    """A model's columns in mapper order, and the one way their values become objects."""

    def __init__(self, model: type[Model]) -> None:
        mapper = inspect(model)
        self.model = model
        # Attribute names, not column names: `meta` maps the `metadata` column.
        self.names = tuple(prop.key for prop in mapper.column_attrs)
        self.columns = [prop.columns[0] for prop in mapper.column_attrs]
        if self.names[0] != "id":
            raise TypeError(f"{model.__name__}: the first column must be the id")
        self._readers = [
            (index, column.type.read)
            for index, column in enumerate(self.columns)
            if isinstance(column.type, StoredText)
        ]
        self._manager = mapper.class_manager

    def __call__(self, row: Sequence[Any]) -> Model:
        """An object from a row of stored values, in `columns` order."""
        values = list(row)
        for index, read in self._readers:
            value = values[index]
            if value is not None:
                values[index] = read(value)
        return self.build(values)

    def build(self, values: Sequence[Any]) -> Model:
        """An object from Python values in `columns` order, made as the ORM makes one
        when it loads a row (`ClassManager.new_instance`: a bare instance and its
        `InstanceState`; SQLModel's `__new__`: pydantic's three slots), with the values
        in place, then marked as the detached copy of row `values[0]`. SQLModel's
        `__init__` would re-run validation and defaults, and the ORM's general-purpose
        path costs as much again; for 50 messages that is most of a history read."""
        obj: Model = _new_object(self.model)
        state = _InstanceState(obj, self._manager)
        state.key = (self.model, (values[0],), None)
        attributes = dict(zip(self.names, values))  # noqa: B905 - lengths match by construction
        attributes["_sa_instance_state"] = state
        _set_slot(obj, "__dict__", attributes)
        _set_slot(obj, "__pydantic_fields_set__", set(self.names))
        _set_slot(obj, "__pydantic_extra__", None)
        _set_slot(obj, "__pydantic_private__", None)
        return obj


_new_object = object.__new__
_set_slot = object.__setattr__


SESSION = Loader(Session)
MESSAGE = Loader(Message)

KEY_COLUMNS = ("agent_id", "channel", "account_id", "peer_kind", "peer_id")
KEY_PARAMETERS = tuple(f"key_{name}" for name in KEY_COLUMNS)

_BY_KEY = and_(*(getattr(Session, name) == bindparam(f"key_{name}") for name in KEY_COLUMNS))

# --- sessions ---------------------------------------------------------------------------

SELECT_SESSION = compile_sql(select(*SESSION.columns).where(_BY_KEY))
SELECT_SESSION_BY_ID = compile_sql(
    select(*SESSION.columns).where(col(Session.id) == bindparam("id"))
)
SELECT_SESSION_ID = compile_sql(select(col(Session.id)).where(_BY_KEY))
SELECT_META = compile_sql(select(col(Session.meta)).where(_BY_KEY))
INSERT_SESSION = compile_sql(
    sqlite_insert(Session)
    .values(
        **{name: bindparam(f"key_{name}") for name in KEY_COLUMNS},
        created_at=bindparam("now"),
        updated_at=bindparam("now"),
    )
    .on_conflict_do_nothing(index_elements=list(KEY_COLUMNS))
    .returning(*SESSION.columns)
)
UPDATE_META = compile_sql(
    update(Session)
    .where(_BY_KEY)
    .values(meta=bindparam("meta"), updated_at=bindparam("now"))
    .returning(*SESSION.columns)
)
UPDATE_STATUS = compile_sql(
    update(Session)
    .where(_BY_KEY)
    .values(status=bindparam("status"), updated_at=bindparam("now"))
    .returning(*SESSION.columns)
)
DELETE_SESSION = compile_sql(delete(Session).where(_BY_KEY).returning(col(Session.id)))


@functools.cache
def list_sessions(fields: tuple[str, ...], *, count: bool) -> str:
    """`SELECT` of the sessions matching a filter with `fields` set, newest first, one
    page (`:limit`, `:offset`); or with `count` their number. Every field's value is the
    parameter of its name; `agent_scope` is the confined repository's agent."""
    clauses: list[ColumnElement[bool]] = []
    for name in fields:
        if name.endswith("_after"):
            clauses.append(getattr(Session, name.removesuffix("_after") + "_at") > bindparam(name))
        elif name.endswith("_before"):
            clauses.append(getattr(Session, name.removesuffix("_before") + "_at") < bindparam(name))
        elif name == "agent_scope":
            clauses.append(col(Session.agent_id) == bindparam(name))
        else:
            clauses.append(getattr(Session, name) == bindparam(name))
    if count:
        return compile_sql(select(func.count()).select_from(Session).where(*clauses))
    return compile_sql(
        select(*SESSION.columns)
        .where(*clauses)
        .order_by(col(Session.updated_at).desc(), col(Session.id).desc())
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )


# --- messages ---------------------------------------------------------------------------

COUNT_APPEND = compile_sql(
    update(Session)
    .where(_BY_KEY)
    .values(
        message_count=col(Session.message_count) + bindparam("added", type_=Integer),
        token_usage=col(Session.token_usage) + bindparam("tokens", type_=Integer),
        updated_at=bindparam("now"),
        status=literal_column(f"'{SessionStatus.ACTIVE.value}'"),
    )
    .returning(col(Session.id))
)

MESSAGE_VALUES = ("session_id", "role", "content", "tool_calls", "created_at")
"""The columns an append writes, in the order of the parameters of `insert_messages`."""


@functools.cache
def insert_messages(count: int) -> str:
    """`INSERT` of `count` messages in one statement, returning their ids. Row `i`'s
    values are the parameters `<column>_<i>`. Ids come back in no promised order, but
    rows get increasing ids in VALUES order, so sorted ids match rows in order."""
    rows: list[dict[str, Any]] = [
        {name: bindparam(f"{name}_{i}") for name in MESSAGE_VALUES} for i in range(count)
    ]
    return compile_sql(insert(Message).values(rows).returning(col(Message.id)))


@functools.cache
def history(*, newest_first: bool, limit: bool, after: bool, before: bool) -> str:
    """The session's id and its messages in one statement (one snapshot, one round
    trip): the session row is outer-joined to the messages between the exclusive bounds
    `:after_id` and `:before_id`, so a session without such messages still gives one row
    (its message columns NULL), and no row means no session. Ordered by message id,
    newest first if asked, at most `:limit` rows if asked."""
    on = [col(Message.session_id) == col(Session.id)]
    if after:
        on.append(col(Message.id) > bindparam("after_id"))
    if before:
        on.append(col(Message.id) < bindparam("before_id"))
    query = (
        select(col(Session.id), *MESSAGE.columns)
        .select_from(Session)
        .outerjoin(Message, and_(*on))
        .where(_BY_KEY)
        .order_by(col(Message.id).desc() if newest_first else col(Message.id))
    )
    if limit:
        query = query.limit(bindparam("limit")).offset(bindparam("offset"))
    return compile_sql(query)
