"""`SessionRepository`: every query the gateway's services need, each one atomic."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    ColumnElement,
    Engine,
    Integer,
    Row,
    and_,
    bindparam,
    delete,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import make_transient_to_detached
from sqlmodel import SQLModel, col

from aisopod_session.enums import Role, SessionStatus
from aisopod_session.errors import AccessDeniedError, SessionNotFoundError, translated_errors
from aisopod_session.keys import SessionKey, normalize_key_part, parse_enum
from aisopod_session.models import Message, NewMessage, Session, SessionFilter, check_json
from aisopod_session.transactions import prepare_engine, read_transaction, write_transaction

Model = TypeVar("Model", bound=SQLModel)


class _Loader(Generic[Model]):
    """A model's columns in mapper order, and the one way rows become its objects."""

    def __init__(self, model: type[Model]) -> None:
        mapper = inspect(model)
        # Attribute names, not column names: `meta` maps the `metadata` column.
        self.names = [prop.key for prop in mapper.column_attrs]
        self.columns = [prop.columns[0] for prop in mapper.column_attrs]
        self._manager = mapper.class_manager

    def __call__(self, row: Row[Any]) -> Model:
        """What the ORM does when it loads a row: a bare instance with its state, the
        values (already converted by the column types) put in place, then marked as a
        detached copy of that row. SQLModel's __init__ would re-run defaults and assign
        attribute by attribute, which costs several times more per object."""
        obj: Model = self._manager.new_instance()
        values = dict(zip(self.names, row, strict=True))
        obj.__dict__.update(values)
        object.__setattr__(obj, "__pydantic_fields_set__", set(values))
        make_transient_to_detached(obj)
        return obj


_SESSION = _Loader(Session)
_MESSAGE = _Loader(Message)
_SESSION_COLUMNS = _SESSION.columns
_MESSAGE_COLUMNS = _MESSAGE.columns
_KEY_COLUMNS = ("agent_id", "channel", "account_id", "peer_kind", "peer_id")

# --- the statements -------------------------------------------------------------------
# Every statement with a fixed shape is built once, here, with named parameters: building
# and cache-keying a statement per call costs more than running it on SQLite. Key
# parameters are prefixed `key_` because UPDATE reserves column names for its SET clause.

_BY_KEY = and_(*(getattr(Session, name) == bindparam(f"key_{name}") for name in _KEY_COLUMNS))
_SELECT_SESSION = select(*_SESSION_COLUMNS).where(_BY_KEY)
_SELECT_SESSION_BY_ID = select(*_SESSION_COLUMNS).where(col(Session.id) == bindparam("id"))
_SELECT_SESSION_ID = select(col(Session.id)).where(_BY_KEY)
_SELECT_META = select(col(Session.meta)).where(_BY_KEY)
_INSERT_SESSION = (
    sqlite_insert(Session)
    .on_conflict_do_nothing(index_elements=list(_KEY_COLUMNS))
    .returning(*_SESSION_COLUMNS)
)
_UPDATE_META = (
    update(Session)
    .where(_BY_KEY)
    .values(meta=bindparam("meta"), updated_at=bindparam("updated_at"))
    .returning(*_SESSION_COLUMNS)
)
_UPDATE_STATUS = (
    update(Session)
    .where(_BY_KEY)
    .values(status=bindparam("status"), updated_at=bindparam("updated_at"))
    .returning(*_SESSION_COLUMNS)
)
_DELETE_SESSION = delete(Session).where(_BY_KEY).returning(col(Session.id))
_COUNT_APPEND = (
    update(Session)
    .where(_BY_KEY)
    .values(
        message_count=col(Session.message_count) + bindparam("added", type_=Integer),
        token_usage=col(Session.token_usage) + bindparam("tokens", type_=Integer),
        updated_at=bindparam("updated_at"),
        status=SessionStatus.ACTIVE,
    )
    .returning(col(Session.id))
)
_INSERT_MESSAGE = insert(Message).returning(*_MESSAGE_COLUMNS)
_INSERT_MESSAGES = insert(Message).returning(*_MESSAGE_COLUMNS, sort_by_parameter_order=True)
_SELECT_MESSAGES = select(*_MESSAGE_COLUMNS).where(
    col(Message.session_id) == bindparam("session_id")
)


class SessionRepository:
    """The session store's API for services: inject one per engine and share it.

    Every method is atomic: all of its writes happen in one `BEGIN IMMEDIATE`
    transaction, or none do. Invalid arguments raise `ValueError` naming the argument
    before anything is written; a method that needs a session raises
    `SessionNotFoundError` when there is none; database failures raise
    `SessionStoreError` subclasses. Returned objects are detached snapshots with every
    column loaded. Keys may be given as `SessionKey` or in their canonical text form.
    The repository holds no state besides the engine (and, from `for_agent`, its agent)
    and is safe to share across threads.

    A repository made by `SessionRepository(engine)` is the admin view: it sees every
    agent's sessions. `for_agent(agent_id)` gives one confined to a single agent.
    """

    def __init__(self, engine: Engine) -> None:
        """Wrap an engine from `open_database`. Another SQLite engine is prepared the same
        way on first use (`prepare_engine`), but its schema must already be migrated."""
        prepare_engine(engine)
        self.engine = engine
        self._agent: str | None = None

    @property
    def agent_id(self) -> str | None:
        """The agent this repository is confined to, or None for the admin view."""
        return self._agent

    def for_agent(self, agent_id: str) -> SessionRepository:
        """A repository on the same engine confined to `agent_id`'s sessions.

        Every method given a key of another agent raises `AccessDeniedError` before it
        reads or writes anything; `list_sessions` and `count_sessions` see only this
        agent's sessions whatever the filter says (a filter naming another agent matches
        nothing); `get_by_id` returns None for another agent's session, as if it did not
        exist. `agent_id` is normalised like `SessionKey.agent_id` (`ValueError` naming
        `agent_id` if invalid). A confined repository cannot widen itself:
        `for_agent` with another agent raises `AccessDeniedError`.
        """
        try:
            agent = normalize_key_part(agent_id, lower=True)
        except ValueError as exc:
            raise ValueError(f"agent_id: {exc}") from None
        if self._agent is not None and agent != self._agent:
            raise AccessDeniedError(
                f"this repository is confined to agent {self._agent!r}; "
                f"it cannot act for agent {agent!r}"
            )
        scoped = copy.copy(self)
        scoped._agent = agent
        return scoped

    def _key(self, key: SessionKey | str) -> SessionKey:
        """`key` as a `SessionKey`, refused if it belongs to an agent out of scope."""
        key = _as_key(key)
        if self._agent is not None and key.agent_id != self._agent:
            raise AccessDeniedError(
                f"key {key} belongs to agent {key.agent_id!r}; this repository is confined "
                f"to agent {self._agent!r}"
            )
        return key

    def _scope(self, spec: SessionFilter) -> list[ColumnElement[bool]]:
        clauses = _filter_clauses(spec)
        if self._agent is not None:
            clauses.append(col(Session.agent_id) == self._agent)
        return clauses

    # --- sessions -------------------------------------------------------------------

    def get_or_create(self, key: SessionKey | str) -> Session:
        """Return the session for `key`, creating it (`active`, empty) if there is none.

        Race-free: concurrent callers with the same new key all get the one row (insert on
        conflict do nothing, then read, under the write lock). An existing session is read
        without taking the write lock.
        """
        key = self._key(key)
        with translated_errors("get_or_create"):
            with read_transaction(self.engine) as conn:
                row = conn.execute(_SELECT_SESSION, _key_params(key)).one_or_none()
            if row is not None:
                return _SESSION(row)
            values = dict(zip(_KEY_COLUMNS, key.parts(), strict=True))
            with write_transaction(self.engine) as conn:
                now = _now()  # under the lock, so time order follows commit order
                created = conn.execute(
                    _INSERT_SESSION, {**values, "created_at": now, "updated_at": now}
                ).one_or_none()
                row = created or conn.execute(_SELECT_SESSION, _key_params(key)).one()
        return _SESSION(row)

    def get(self, key: SessionKey | str) -> Session | None:
        """The session for `key`, or None. Read-only."""
        key = self._key(key)
        with translated_errors("get"), read_transaction(self.engine) as conn:
            row = conn.execute(_SELECT_SESSION, _key_params(key)).one_or_none()
        return None if row is None else _SESSION(row)

    def get_by_id(self, id: int) -> Session | None:
        """The session with this id, or None (also when it belongs to an agent this
        repository is not confined to). Read-only."""
        _check_int("id", id, minimum=None)
        with translated_errors("get_by_id"), read_transaction(self.engine) as conn:
            row = conn.execute(_SELECT_SESSION_BY_ID, {"id": id}).one_or_none()
        if row is None:
            return None
        session = _SESSION(row)
        return None if self._agent not in (None, session.agent_id) else session

    def list_sessions(
        self,
        filter: SessionFilter | Mapping[str, Any] | None = None,
        *,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Session]:
        """Sessions matching `filter` (and the repository's agent, if confined), most
        recently updated first (ties: higher id first), `limit` of them from `offset`.
        Read-only."""
        clauses = self._scope(_as_filter(filter))
        _check_int("limit", limit, minimum=0)
        _check_int("offset", offset, minimum=0)
        query = (
            select(*_SESSION_COLUMNS)
            .where(*clauses)
            .order_by(col(Session.updated_at).desc(), col(Session.id).desc())
            .limit(limit)
            .offset(offset)
        )
        with translated_errors("list_sessions"), read_transaction(self.engine) as conn:
            rows = conn.execute(query).all()
        return [_SESSION(row) for row in rows]

    def count_sessions(
        self,
        filter: SessionFilter | Mapping[str, Any] | None = None,
    ) -> int:
        """How many sessions match `filter` (and the repository's agent, if confined).
        Read-only."""
        clauses = self._scope(_as_filter(filter))
        query = select(func.count()).select_from(Session).where(*clauses)
        with translated_errors("count_sessions"), read_transaction(self.engine) as conn:
            return int(conn.execute(query).scalar_one())

    def update_metadata(
        self, key: SessionKey | str, changes: Mapping[str, Any], *, replace: bool = False
    ) -> Session:
        """Merge `changes` into the session's metadata (top-level keys; given keys win), or
        with `replace=True` make `changes` the whole metadata. Bumps `updated_at`.

        `changes` must be a mapping with string keys holding JSON values. One write
        transaction; `SessionNotFoundError` if there is no session.
        """
        key = self._key(key)
        if not isinstance(changes, Mapping):
            raise ValueError(f"changes: must be a mapping, not {type(changes).__name__}")
        changes = dict(check_json("changes", dict(changes)))
        with translated_errors("update_metadata"), write_transaction(self.engine) as conn:
            found = conn.execute(_SELECT_META, _key_params(key)).first()
            if found is None:
                raise _not_found(key)
            # Plain SQL may have stored JSON that is not an object; merging starts afresh.
            current = found[0] if isinstance(found[0], dict) else {}
            meta = changes if replace else {**current, **changes}
            row = conn.execute(
                _UPDATE_META, {**_key_params(key), "meta": meta, "updated_at": _now()}
            ).one()
        return _SESSION(row)

    def set_status(self, key: SessionKey | str, status: SessionStatus | str) -> Session:
        """Set the session's status and bump `updated_at`; one write transaction.
        `SessionNotFoundError` if there is no session."""
        key = self._key(key)
        try:
            new_status = parse_enum(SessionStatus, status)
        except ValueError as exc:
            raise ValueError(f"status: {exc}") from None
        with translated_errors("set_status"), write_transaction(self.engine) as conn:
            row = conn.execute(
                _UPDATE_STATUS, {**_key_params(key), "status": new_status, "updated_at": _now()}
            ).one_or_none()
            if row is None:
                raise _not_found(key)
        return _SESSION(row)

    def delete(self, key: SessionKey | str) -> bool:
        """Delete the session; its messages go with it through the foreign key's
        `ON DELETE CASCADE`. True if a session was deleted, False if there was none."""
        key = self._key(key)
        with translated_errors("delete"), write_transaction(self.engine) as conn:
            deleted = conn.execute(_DELETE_SESSION, _key_params(key)).first()
        return deleted is not None

    # --- messages ---------------------------------------------------------------------

    def append_messages(
        self,
        key: SessionKey | str,
        messages: Sequence[NewMessage | Mapping[str, Any]],
        *,
        tokens: int = 0,
    ) -> list[Message]:
        """Append `messages` in order and return them with their ids and timestamps.

        In one write transaction: the rows are inserted, `message_count` grows by their
        number, `token_usage` by `tokens`, `updated_at` becomes now and the status
        `active`. `messages` must hold at least one `NewMessage` (or a mapping with its
        fields); `tokens` is an int >= 0. `SessionNotFoundError` if there is no session.
        """
        key = self._key(key)
        new = _as_new_messages(messages)
        _check_int("tokens", tokens, minimum=0)
        with translated_errors("append_messages"), write_transaction(self.engine) as conn:
            now = _now()  # under the lock, so created_at follows id order
            session_id = conn.execute(
                _COUNT_APPEND,
                {**_key_params(key), "added": len(new), "tokens": tokens, "updated_at": now},
            ).scalar_one_or_none()
            if session_id is None:
                raise _not_found(key)
            params = [
                {
                    "session_id": session_id,
                    "role": message.role,
                    "content": message.content,
                    "tool_calls": message.tool_calls,
                    "created_at": now,
                }
                for message in new
            ]
            if len(params) == 1:
                rows = conn.execute(_INSERT_MESSAGE, params[0]).all()
            else:
                rows = conn.execute(_INSERT_MESSAGES, params).all()
        return [_MESSAGE(row) for row in rows]

    def append_message(
        self,
        key: SessionKey | str,
        role: Role | str,
        content: str,
        *,
        tool_calls: list[Any] | None = None,
        tokens: int = 0,
    ) -> Message:
        """Append one message; the same guarantees as `append_messages`."""
        key = self._key(key)
        message = NewMessage(role=role, content=content, tool_calls=tool_calls)
        return self.append_messages(key, [message], tokens=tokens)[0]

    def get_history(
        self,
        key: SessionKey | str,
        *,
        limit: int | None = None,
        before_id: int | None = None,
        after_id: int | None = None,
    ) -> list[Message]:
        """The session's messages in chronological (id) order.

        Without `limit`: every message between the exclusive bounds `after_id` and
        `before_id`. With `limit`: the newest `limit` messages before `before_id` (page
        backwards by passing the first id you got as the next `before_id`); with
        `after_id` too, the oldest `limit` messages after it (page forwards by passing the
        last id you got). One read snapshot; `SessionNotFoundError` if there is no session.
        """
        key = self._key(key)
        if limit is not None:
            _check_int("limit", limit, minimum=0)
        if before_id is not None:
            _check_int("before_id", before_id, minimum=None)
        if after_id is not None:
            _check_int("after_id", after_id, minimum=None)
        with translated_errors("get_history"), read_transaction(self.engine) as conn:
            session_id = conn.execute(_SELECT_SESSION_ID, _key_params(key)).scalar_one_or_none()
            if session_id is None:
                raise _not_found(key)
            query = _SELECT_MESSAGES
            if after_id is not None:
                query = query.where(col(Message.id) > after_id)
            if before_id is not None:
                query = query.where(col(Message.id) < before_id)
            newest_first = limit is not None and after_id is None
            query = query.order_by(col(Message.id).desc() if newest_first else col(Message.id))
            if limit is not None:
                query = query.limit(limit)
            rows = conn.execute(query, {"session_id": session_id}).all()
        messages = [_MESSAGE(row) for row in rows]
        if newest_first:
            messages.reverse()
        return messages


# --- helpers --------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _as_key(key: Any) -> SessionKey:
    if isinstance(key, SessionKey):
        return key
    if isinstance(key, str):
        return SessionKey.parse(key)
    raise ValueError(f"key: must be a SessionKey or its text form, not {type(key).__name__}")


def _key_params(key: SessionKey) -> dict[str, str]:
    """The parameters of `_BY_KEY`."""
    return {f"key_{name}": part for name, part in zip(_KEY_COLUMNS, key.parts(), strict=True)}


def _not_found(key: SessionKey) -> SessionNotFoundError:
    return SessionNotFoundError(f"no session for key {key}")


def _as_filter(value: Any) -> SessionFilter:
    if value is None:
        return SessionFilter()
    if isinstance(value, SessionFilter):
        return value
    if isinstance(value, Mapping):
        return SessionFilter.model_validate(dict(value))
    raise ValueError(f"filter: must be a SessionFilter or a mapping, not {type(value).__name__}")


def _filter_clauses(spec: SessionFilter) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    for name in _KEY_COLUMNS:
        value = getattr(spec, name)
        if value is not None:
            clauses.append(getattr(Session, name) == value)
    if spec.status is not None:
        clauses.append(col(Session.status) == spec.status)
    if spec.created_after is not None:
        clauses.append(col(Session.created_at) > spec.created_after)
    if spec.created_before is not None:
        clauses.append(col(Session.created_at) < spec.created_before)
    if spec.updated_after is not None:
        clauses.append(col(Session.updated_at) > spec.updated_after)
    if spec.updated_before is not None:
        clauses.append(col(Session.updated_at) < spec.updated_before)
    return clauses


def _as_new_messages(messages: Any) -> list[NewMessage]:
    if isinstance(messages, NewMessage | str | bytes | Mapping) or not isinstance(
        messages, Sequence
    ):
        raise ValueError(
            f"messages: must be a sequence of NewMessage, not {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages: must hold at least one message")
    result: list[NewMessage] = []
    for index, message in enumerate(messages):
        if isinstance(message, NewMessage):
            result.append(message)
        elif isinstance(message, Mapping):
            result.append(NewMessage.model_validate(dict(message)))
        else:
            raise ValueError(
                f"messages[{index}]: must be a NewMessage or a mapping, "
                f"not {type(message).__name__}"
            )
    return result


_MAX_INTEGER = 2**63 - 1  # SQLite's INTEGER is a signed 64-bit value


def _check_int(field: str, value: Any, *, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: must be an integer, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{field}: must be >= {minimum}, got {value}")
    if not -_MAX_INTEGER - 1 <= value <= _MAX_INTEGER:
        raise ValueError(f"{field}: must fit in a 64-bit signed integer, got {value}")
