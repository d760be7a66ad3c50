"""`SessionRepository`: every query the gateway's services need, each one atomic (its
asyncio twin is `asyncrepository.py`)."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Engine

from aisopod_session.clock import StoreClock
from aisopod_session.connections import (
    DriverPath,
    OffTheLoop,
    lenient_text_retry,
    lenient_text_retry_as,
)
from aisopod_session.cursors import decode_cursor, encode_cursor, fingerprint
from aisopod_session.enums import Role, SessionStatus
from aisopod_session.errors import (
    AccessDeniedError,
    DamagedRowError,
    HistoryChangedError,
    SessionExistsError,
    SessionNotFoundError,
    SessionStoreError,
)
from aisopod_session.keys import SessionKey, parse_enum
from aisopod_session.loading import HISTORY_MESSAGE, MESSAGE, SESSION
from aisopod_session.models import (
    JSONText,
    Message,
    NewMessage,
    Session,
    SessionFilter,
    as_filter,
    as_new_messages,
    as_read_messages,
    parse_utc_text,
    utc_text,
)
from aisopod_session.results import (
    AppliedChanges,
    CompactionResult,
    SearchHit,
    SessionPage,
    StoreSummary,
    Totals,
)
from aisopod_session.statements import (
    COPY_MESSAGES,
    COUNT_APPEND,
    DELETE_MESSAGES_FROM,
    DELETE_MESSAGES_UP_TO,
    DELETE_NEWEST_MESSAGE,
    DELETE_SESSION,
    DELETE_SESSION_MESSAGES,
    HISTORY_TEXT,
    INSERT_FORK,
    INSERT_MESSAGE_WITH_ID,
    INSERT_SESSION,
    KEY,
    LAST_MESSAGE_ID,
    LOCK_SESSION,
    MESSAGE_IN_SESSION,
    NEWEST_MESSAGES,
    NEWEST_REMOVED,
    OLDEST_BETWEEN,
    RECORD_COMPACTION,
    RECORD_POP,
    RECOUNT_MESSAGES,
    RESET_SESSION,
    SEARCH_QUERY,
    SELECT_META,
    SELECT_SESSION,
    SELECT_SESSION_BY_ID,
    SELECT_SESSION_ID,
    SESSION_COUNTERS,
    SET_MESSAGE_COUNT,
    UPDATE_META,
    UPDATE_STATUS,
    Query,
    Sql,
    append_in_one,
    create_in_one,
    fts_query,
    history,
    insert_messages,
    list_sessions,
    mark_idle,
    meta_params,
    page_sessions,
    prune_candidates,
    prune_count,
    prune_delete,
    search,
    select_sessions,
    summary,
)
from aisopod_session.transactions import prepare_engine
from aisopod_session.validation import (
    JSONValue,
    ago,
    as_key,
    callback_answer,
    check_agent_id,
    check_aware,
    check_callback,
    check_changes,
    check_idle_for,
    check_int,
    check_page_limit,
    check_roles,
    check_status,
    check_summary,
    check_text_size,
    check_token_counts,
    dump_json,
    refuse_nul,
    search_terms,
    stored_json,
)

_T = TypeVar("_T")

logger = logging.getLogger("aisopod_session")

_MAX_BIGINT = 2**63 - 1
# PostgreSQL's message_count is an INTEGER (32 bits), SQLite's any 64-bit integer.
_MAX_MESSAGE_COUNT = {"postgresql": 2**31 - 1}

_GET_OR_CREATE_TRIES = 100
_MAX_GET_MANY = 100

PRUNE_BATCH_SESSIONS = 500
"""At most this many sessions are deleted per `prune` transaction..."""
PRUNE_BATCH_MESSAGES = 5000
"""...holding at most about this many messages between them (a bigger one goes alone)."""
_EXPIRED_PAGE = 500
"""Messages `replace_messages` reads at a time while it asks `expired` about them."""


@dataclass(frozen=True)
class _PrunePlan:
    """A prune's condition: which statement shape, and its parameters."""

    status: bool
    fields: tuple[str, ...]
    values: dict[str, Any]


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
        self._path = DriverPath(engine)
        self._dialect = engine.dialect
        self._clock = StoreClock(engine)
        self._max_count = _MAX_MESSAGE_COUNT.get(engine.dialect.name, _MAX_BIGINT)
        # SQLite's BEGIN IMMEDIATE holds the database's write lock before the first
        # statement; PostgreSQL locks rows as statements reach them, so a write that
        # stamps a time locks its session's row first (one more round trip there).
        self._lock_rows = engine.dialect.name != "sqlite"
        # PostgreSQL's text type cannot hold NUL, which SQLite keeps: refused as input.
        self._no_nul = engine.dialect.name == "postgresql"
        # PostgreSQL on its own clock: an append and the creation of a session are each
        # one statement in their write transaction (docs/postgresql.md, "Round trips").
        # A clock of the caller's is read after the row lock, so those keep their steps.
        self._in_one = self._clock.from_server
        self._agent: str | None = None

    @property
    def agent_id(self) -> str | None:
        """The agent this repository is confined to, or None for the admin view."""
        return self._agent

    def _sql(self, query: Query) -> Sql:
        """`query` compiled for this repository's database."""
        return query.on(self._dialect)

    def _text(self, query: Query) -> str:
        """The SQL text of `query` for this repository's database."""
        return self._sql(query).text

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
        agent = check_agent_id(agent_id)
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
        key = as_key(key)
        if self._agent is not None and key.agent_id != self._agent:
            raise AccessDeniedError(
                f"key {key} belongs to agent {key.agent_id!r}; this repository is confined "
                f"to agent {self._agent!r}"
            )
        return key

    # --- sessions -------------------------------------------------------------------

    @lenient_text_retry
    def get_or_create(self, key: SessionKey | str) -> Session:
        """Return the session for `key`, creating it (`active`, empty) if there is none.

        Race-free: concurrent callers with the same new key all get the one row (insert on
        conflict do nothing, then read, under the write lock). An existing session is read
        with one statement, without taking the write lock.
        """
        key = self._key(key)
        parts = key.parts()
        with self._path.transaction("get_or_create", None) as conn:
            row = conn.execute(self._text(SELECT_SESSION), parts).fetchone()
        if row is not None:
            return SESSION.read(row)
        for _ in range(_GET_OR_CREATE_TRIES):
            if self._in_one:
                row = self._create_in_one(parts)
                if row is None:  # created by another writer since the read
                    with self._path.transaction("get_or_create", None) as conn:
                        row = conn.execute(self._text(SELECT_SESSION), parts).fetchone()
            else:
                with self._path.transaction("get_or_create", "IMMEDIATE") as conn:
                    _, now = self._clock.stamp(conn)
                    row = conn.execute(self._text(INSERT_SESSION), (*parts, now, now)).fetchone()
                    if row is None:  # created by another writer since the read
                        row = conn.execute(self._text(SELECT_SESSION), parts).fetchone()
            # On PostgreSQL the conflicting row may have been deleted between the insert
            # and the read (SQLite's write lock rules that out): insert again.
            if row is not None:
                return SESSION.read(row)
        raise SessionStoreError(
            f"get_or_create: the session for key {key} was deleted by another writer each "
            f"of {_GET_OR_CREATE_TRIES} times it was created"
        )

    def _create_in_one(self, parts: tuple[str, ...], action: str = "get_or_create") -> Any:
        """PostgreSQL on its own clock: the new session's row, or None if the key has
        one; one statement in a write transaction."""
        with self._path.transaction(action, "IMMEDIATE") as conn:
            return conn.execute(self._text(create_in_one()), parts).fetchone()

    def create(self, key: SessionKey | str, *, meta: Mapping[str, Any] | None = None) -> Session:
        """Create the session for `key` (`active`, empty, with `meta` as its metadata if
        given) and return it; `SessionExistsError` if there is one already, with nothing
        written. One write transaction: of concurrent callers with the same new key,
        exactly one creates it and every other gets `SessionExistsError`. `meta` must be
        a mapping with string keys holding JSON values (`ValueError` naming `meta`)."""
        key = self._key(key)
        stored = None
        if meta is not None:
            stored = dump_json(check_changes(meta, "meta"))
            check_text_size("meta", stored)
        parts = key.parts()
        if self._in_one and stored is None:
            row = self._create_in_one(parts, "create")
            if row is None:
                raise SessionExistsError(f"a session with key {key} exists already")
            return SESSION.read(row)
        with self._path.transaction("create", "IMMEDIATE") as conn:
            _, now = self._clock.stamp(conn)
            row = conn.execute(self._text(INSERT_SESSION), (*parts, now, now)).fetchone()
            if row is None:
                raise SessionExistsError(f"a session with key {key} exists already")
            if stored is not None:
                row = conn.execute(self._text(UPDATE_META), (now, stored, *parts)).fetchone()
        return SESSION.read(row)

    @lenient_text_retry
    def get(self, key: SessionKey | str) -> Session | None:
        """The session for `key`, or None. Read-only, one statement."""
        parts = self._key(key).parts()
        with self._path.transaction("get", None) as conn:
            row = conn.execute(self._text(SELECT_SESSION), parts).fetchone()
        return None if row is None else SESSION.read(row)

    @lenient_text_retry
    def get_many(self, keys: Sequence[SessionKey | str]) -> list[Session | None]:
        """The sessions for `keys`, in their order, None where there is none. Read-only,
        one statement, so one snapshot of them all. At most 100 keys (`ValueError`
        naming `keys`)."""
        if isinstance(keys, str | SessionKey) or not isinstance(keys, Sequence):
            raise ValueError(f"keys: must be a list of keys, not {type(keys).__name__}")
        if len(keys) > _MAX_GET_MANY:
            raise ValueError(f"keys: at most {_MAX_GET_MANY} keys, got {len(keys)}")
        wanted = [self._key(key) for key in keys]
        if not wanted:
            return []
        params = [part for key in wanted for part in key.parts()]
        with self._path.transaction("get_many", None) as conn:
            rows = conn.execute(self._text(select_sessions(len(wanted))), params).fetchall()
        found = {
            (s.agent_id, s.channel, s.account_id, str(s.peer_kind), s.peer_id): s
            for s in map(SESSION.read, rows)
        }
        return [found.get(key.parts()) for key in wanted]

    @lenient_text_retry
    def get_by_id(self, id: int) -> Session | None:
        """The session with this id, or None (also when it belongs to an agent this
        repository is not confined to). Read-only, one statement."""
        check_int("id", id, minimum=None)
        with self._path.transaction("get_by_id", None) as conn:
            row = conn.execute(self._text(SELECT_SESSION_BY_ID), (id,)).fetchone()
        if row is None:
            return None
        session = SESSION.read(row)
        return None if self._agent not in (None, session.agent_id) else session

    @lenient_text_retry
    def list_sessions(
        self,
        filter: SessionFilter | Mapping[str, Any] | None = None,
        *,
        limit: int = 100,
        offset: int = 0,
        order: str = "updated",
    ) -> list[Session]:
        """Sessions matching `filter` (and the repository's agent, if confined), most
        recently updated first (ties: higher id first), `limit` of them from `offset`;
        with `order="key"`, in key order instead (agent, channel, account, peer kind,
        peer), which the key's unique index gives without sorting: the fast way to read
        every session of one chat account (a filter fixing agent, channel and account)
        whatever the store's size. Read-only, one statement. A row that cannot be read (a
        value written by plain SQL or another program that this code does not understand)
        is left out of the list and logged as a warning (logger `aisopod_session`) naming
        its table, id and column; `get` and `get_by_id` raise `DamagedRowError` for it.
        `ValueError` naming `order` for another order."""
        fields, params = self._filter_params(filter)
        check_int("limit", limit, minimum=0)
        check_int("offset", offset, minimum=0)
        if order not in ("updated", "key"):
            raise ValueError(f"order: must be 'updated' or 'key', got {order!r}")
        params["limit"] = limit
        params["offset"] = offset
        sql = self._sql(list_sessions(fields, count=False, by_key=order == "key"))
        with self._path.transaction("list_sessions", None) as conn:
            rows = conn.execute(sql.text, sql.bind(params)).fetchall()
        return list(readable(SESSION.read, rows))

    def count_sessions(
        self,
        filter: SessionFilter | Mapping[str, Any] | None = None,
    ) -> int:
        """How many sessions match `filter` (and the repository's agent, if confined).
        Read-only, one statement."""
        fields, params = self._filter_params(filter)
        sql = self._sql(list_sessions(fields, count=True))
        with self._path.transaction("count_sessions", None) as conn:
            (count,) = conn.execute(sql.text, sql.bind(params)).fetchone()
        return int(count)

    @lenient_text_retry
    def page_sessions(
        self,
        filter: SessionFilter | Mapping[str, Any] | None = None,
        *,
        limit: int = 50,
        cursor: str | None = None,
    ) -> SessionPage:
        """One page of the sessions matching `filter` (and the repository's agent, if
        confined), in `list_sessions`' order: `limit` (>= 1) of them after the page whose
        `next_cursor` is `cursor` (None: the first page). `next_cursor` is None on the
        last page. Keyset pagination on an index, so every page costs the same however
        deep; a session updated while you page moves to the front and is not seen again
        (nor seen twice). Read-only, one statement. `ValueError` naming `cursor` for a
        cursor that is damaged or altered, or came with another filter."""
        fields, params = self._filter_params(filter)
        check_page_limit(limit)
        digest = fingerprint(params)
        start = None if cursor is None else decode_cursor(cursor, digest)
        # One row more than the page says whether another follows.
        values = {**params, "limit": min(limit, _MAX_BIGINT - 1) + 1}
        if start is not None:
            values["cursor_updated_at"], values["cursor_id"] = start
        sql = self._sql(page_sessions(fields, after=start is not None))
        with self._path.transaction("page_sessions", None) as conn:
            rows = conn.execute(sql.text, sql.bind(values)).fetchall()
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            next_cursor = encode_cursor(digest, last[_UPDATED_AT], last[0])
        return SessionPage(list(readable(SESSION.read, rows)), next_cursor)

    def update_metadata(
        self, key: SessionKey | str, changes: Mapping[str, Any], *, replace: bool = False
    ) -> Session:
        """Merge `changes` into the session's metadata (top-level keys; given keys win), or
        with `replace=True` make `changes` the whole metadata. Bumps `updated_at`.

        `changes` must be a mapping with string keys holding JSON values. One write
        transaction; `SessionNotFoundError` if there is no session.
        """
        key = self._key(key)
        changes = check_changes(changes)
        if replace:
            check_text_size("changes", dump_json(changes))
        parts = key.parts()
        with self._path.transaction("update_metadata", "IMMEDIATE") as conn:
            found = conn.execute(self._text(SELECT_META), parts).fetchone()
            if found is None:
                raise _not_found(key)
            session_id, stored, server_now = found
            if replace:
                meta = dump_json(changes)
            else:
                meta = dump_json({**_read_json_object(stored, session_id), **changes})
                check_text_size("changes", meta)
            _, now = self._clock.stamp(conn, server_now)
            row = conn.execute(self._text(UPDATE_META), (now, meta, *parts)).fetchone()
        return SESSION.read(row)

    def set_status(self, key: SessionKey | str, status: SessionStatus | str) -> Session:
        """Set the session's status and bump `updated_at`; one write transaction.
        `SessionNotFoundError` if there is no session."""
        key = self._key(key)
        new_status = check_status(status)
        params = (new_status.value, *key.parts())
        with self._path.transaction("set_status", "IMMEDIATE") as conn:
            server_now = self._lock_session(conn, key)[1] if self._lock_rows else None
            _, now = self._clock.stamp(conn, server_now)
            row = conn.execute(self._text(UPDATE_STATUS), (now, *params)).fetchone()
            if row is None:
                raise _not_found(key)
        return SESSION.read(row)

    def delete(self, key: SessionKey | str) -> bool:
        """Delete the session; its messages go with it through the foreign key's
        `ON DELETE CASCADE`, in one write transaction. True if a session was deleted,
        False if there was none."""
        key = self._key(key)
        with self._path.transaction("delete", "IMMEDIATE") as conn:
            deleted = conn.execute(self._text(DELETE_SESSION), key.parts()).fetchall()
        return bool(deleted)

    def fork(
        self, key: SessionKey | str, new_key: SessionKey | str, *, up_to_id: int | None = None
    ) -> Session:
        """Branch a conversation: a new session under `new_key` with a copy of the
        messages of `key` up to and including the message `up_to_id` (every message if
        None), in order, with their roles, content, tool calls, metadata and times (new
        ids, in the same order). One write transaction; the source is not changed.

        The new session records its lineage: `parent_id` is the source's id and
        `forked_from_message_id` the last message copied (None for a source without
        messages). It starts `active` with the source's metadata, `message_count` the
        number of messages copied, its token counters 0 (it has cost nothing itself),
        `created_at` and `updated_at` now. `SessionNotFoundError` if there is no
        session for `key`; `SessionExistsError` if there is one for `new_key`;
        `ValueError` naming `up_to_id` if that message is not in the source. Both keys
        must be in a confined repository's scope (`AccessDeniedError`)."""
        source = self._key(key)
        target = self._key(new_key)
        if up_to_id is not None:
            check_int("up_to_id", up_to_id, minimum=None)
        with self._path.transaction("fork", "IMMEDIATE") as conn:
            found = conn.execute(self._text(SELECT_META), source.parts()).fetchone()
            if found is None:
                raise _not_found(source)
            source_id, stored_meta, server_now = found
            meta = dump_json(_read_json_object(stored_meta, source_id))
            if up_to_id is None:
                last = conn.execute(self._text(LAST_MESSAGE_ID), (source_id,)).fetchone()[0]
            elif conn.execute(self._text(MESSAGE_IN_SESSION), (up_to_id, source_id)).fetchone():
                last = up_to_id
            else:
                raise ValueError(
                    f"up_to_id: message {up_to_id} is not in session {source}; nothing was written"
                )
            _, now = self._clock.stamp(conn, server_now)
            values = (*target.parts(), now, now, meta, source_id, last)
            created = conn.execute(self._text(INSERT_FORK), values).fetchone()
            if created is None:
                raise SessionExistsError(
                    f"a session for key {target} exists already; nothing was written"
                )
            new_id = created[0]
            copied = 0
            if last is not None:
                cursor = conn.execute(self._text(COPY_MESSAGES), (new_id, source_id, last))
                copied = cursor.rowcount
            row = conn.execute(self._text(SET_MESSAGE_COUNT), (copied, new_id)).fetchone()
        return SESSION.read(row)

    @lenient_text_retry
    def summary(self) -> StoreSummary:
        """How many sessions there are (of this repository's agent, if confined), per
        status and per agent, with the sums of their `message_count`, `token_usage`,
        `input_tokens` and `output_tokens`. Read-only, one statement."""
        sql = self._sql(summary(scoped=self._agent is not None))
        with self._path.transaction("summary", None) as conn:
            rows = conn.execute(sql.text, sql.bind({"agent_scope": self._agent})).fetchall()
        total = damaged = Totals()
        by_status: dict[SessionStatus, Totals] = {}
        by_agent: dict[str, Totals] = {}
        for agent, status, integral, sessions, messages, tokens, given_in, given_out in rows:
            totals = Totals(
                int(sessions),
                _lenient_int(messages),
                _lenient_int(tokens),
                _lenient_int(given_in),
                _lenient_int(given_out),
            )
            total = total + totals
            by_agent[agent] = by_agent.get(agent, Totals()) + totals
            state = _known_status(status)
            if state is None or not integral:
                damaged = damaged + totals
            else:
                by_status[state] = by_status.get(state, Totals()) + totals
        return StoreSummary(
            total=total,
            by_status=dict(sorted(by_status.items())),
            by_agent=by_agent,
            damaged=damaged,
        )

    # --- messages ---------------------------------------------------------------------

    def append_messages(
        self,
        key: SessionKey | str,
        messages: Sequence[NewMessage | Mapping[str, Any]],
        *,
        tokens: int = 0,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> list[Message]:
        """Append `messages` in order and return them with their ids and timestamps.

        In one write transaction: the rows are inserted, `message_count` grows by their
        number, `input_tokens` and `output_tokens` by those arguments, `token_usage` (the
        total) by `tokens + input_tokens + output_tokens` (so it stays the total whether
        or not the caller knows the split), `updated_at` becomes now and the status
        `active`. `messages` must hold at least one `NewMessage` (or a mapping with its
        fields); each token count is an int >= 0 (`ValueError` naming it, and naming
        `tokens` when a counter has no room left). `SessionNotFoundError` if there is no
        session.
        """
        key = self._key(key)
        new = as_new_messages(messages)
        counts = check_token_counts(tokens, input_tokens, output_tokens)
        return self._append(key, self._rows(new), counts)

    def _rows(self, messages: Sequence[NewMessage]) -> list[_Row]:
        many = len(messages) > 1
        return [
            self._row(message, f"messages[{index}]." if many else "")
            for index, message in enumerate(messages)
        ]

    def append_message(
        self,
        key: SessionKey | str,
        role: Role | str,
        content: JSONValue,
        *,
        tool_calls: JSONValue = None,
        meta: Mapping[str, Any] | None = None,
        tokens: int = 0,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> Message:
        """Append one message; the same guarantees as `append_messages`."""
        key = self._key(key)
        message = NewMessage(role, content, tool_calls, meta)
        counts = check_token_counts(tokens, input_tokens, output_tokens)
        return self._append(key, [self._row(message, "")], counts)[0]

    def _row(self, message: NewMessage, prefix: str) -> _Row:
        """A message with its stored JSON texts; `ValueError` naming the field (after
        `prefix`) for a value too large, or one PostgreSQL cannot hold."""
        content, calls, meta = message.content, message.tool_calls, message.meta
        if self._no_nul:
            for field, value in (("content", content), ("tool_calls", calls), ("meta", meta)):
                refuse_nul(prefix + field, value)
        return (
            message.role,
            content,
            calls,
            meta or {},
            stored_json(prefix + "content", content),
            None if calls is None else stored_json(prefix + "tool_calls", calls),
            "{}" if not meta else stored_json(prefix + "meta", meta),
        )

    def _append(self, key: SessionKey, rows: list[_Row], counts: _Tokens) -> list[Message]:
        if self._in_one and _one_chunk(rows):
            appended = self._append_in_one(key, rows, counts)
            if appended is not None:
                return appended
            # No session, or no room: the steps below tell which, under the row lock.
        with self._path.transaction("append_messages", "IMMEDIATE") as conn:
            server_now = self._lock_session(conn, key)[1] if self._lock_rows else None
            # Under the lock, so created_at follows id order (see clock.py).
            now, now_text = self._clock.stamp(conn, server_now)
            session_id, ids = self._insert(conn, key, rows, counts, now_text)
        return _built(ids, session_id, rows, now)

    def _append_in_one(
        self, key: SessionKey, rows: list[_Row], counts: _Tokens
    ) -> list[Message] | None:
        """PostgreSQL on its own clock: `_append` as one statement (`append_in_one`) in a
        write transaction; None when it wrote nothing (no session, or no room)."""
        added = len(rows)
        values: list[Any] = [*key.parts(), *self._counters(added, counts)]
        for role, _, _, _, content, calls, meta in rows:
            values += (role.value, content, calls, meta)
        with self._path.transaction("append_messages", "IMMEDIATE") as conn:
            found = conn.execute(self._text(append_in_one(added)), values).fetchone()
        if found is None:
            return None
        session_id, now_text, ids = found
        now = parse_utc_text(now_text)
        return _built(ids, session_id, rows, now)

    def _counters(self, added: int, counts: _Tokens) -> tuple[int, ...]:
        """What an append adds to the session's four counters, then the room each must
        have left for it (`statements._COUNTERS`)."""
        total, given_in, given_out = counts
        return (
            added,
            total,
            given_in,
            given_out,
            self._max_count - added,
            _MAX_BIGINT - total,
            _MAX_BIGINT - given_in,
            _MAX_BIGINT - given_out,
        )

    def _insert(
        self, conn: Any, key: SessionKey, rows: list[_Row], counts: _Tokens, now: str
    ) -> tuple[int, list[int]]:
        """Insert `rows` into the session and add to its counters, stamped `now`; the
        session's id and the new ids in row order. Refused (no room, no session) before
        any row is inserted."""
        added = len(rows)
        counters = self._counters(added, counts)
        params = (now, *counters[:4], *key.parts(), *counters[4:])
        found = conn.execute(self._text(COUNT_APPEND), params).fetchone()
        if found is None:
            raise self._refused_append(conn, key, added, counts)
        session_id = found[0]
        ids: list[int] = []
        for chunk in _chunks(rows):
            values: list[Any] = []
            for role, _, _, _, content, calls, meta in chunk:
                values += (session_id, role.value, content, calls, now, meta)
            inserted = conn.execute(self._text(insert_messages(len(chunk))), values).fetchall()
            ids.extend(sorted(row[0] for row in inserted))
        return session_id, ids

    def apply_changes(
        self,
        key: SessionKey | str,
        *,
        messages: Sequence[NewMessage | Mapping[str, Any]] = (),
        meta: Mapping[str, Any] | None = None,
        create: bool = False,
        related_meta: Mapping[SessionKey | str, Mapping[str, Any]] | None = None,
        check: Callable[[Mapping[str, Any]], object] | None = None,
    ) -> AppliedChanges:
        """Several changes to a session, and to the metadata of sessions related to it,
        in one write transaction: all are made or none.

        In order: the session is created (`create=True`; `SessionExistsError` if it
        exists) or locked (`SessionNotFoundError` if there is none); `check`, if given,
        is called with its current metadata and may raise to refuse the whole call (use
        it for optimistic concurrency: compare a version kept in the metadata; it runs
        under the write lock, so keep it short and free of I/O); each session in
        `related_meta` (say, state shared by several conversations) is created if
        missing and gets its changes merged into its metadata, in key order (empty
        changes only create it if missing, and read it); `meta` is merged into the
        session's metadata (top-level keys; given keys win); `messages` are appended as
        `append_messages` appends them. `updated_at` becomes now on every session written.
        Every argument is checked first (`ValueError` naming it, with `messages[i]` for a
        message), before anything is written; `related_meta` must not name `key` itself.
        Returns the session and the related ones as they are after the call, and the
        messages with their ids.
        """
        key = self._key(key)
        rows = self._rows(as_new_messages(messages)) if messages else []
        own = None if meta is None else check_changes(meta, "meta")
        related: list[tuple[SessionKey, dict[str, Any]]] = []
        if related_meta is not None:
            if not isinstance(related_meta, Mapping):
                raise ValueError(
                    f"related_meta: must be a mapping of keys to changes, not "
                    f"{type(related_meta).__name__}"
                )
            for other, changes in related_meta.items():
                other_key = self._key(other)
                if other_key == key:
                    raise ValueError(f"related_meta: must not name the session's own key {key}")
                related.append((other_key, check_changes(changes, f"related_meta[{other_key}]")))
            related.sort(key=lambda pair: pair[0].parts())
        if check is not None:
            check_callback("check", check)
        with self._path.transaction("apply_changes", "IMMEDIATE") as conn:
            if create:
                now_at, now = self._clock.stamp(conn)
                found = conn.execute(self._text(INSERT_SESSION), (*key.parts(), now, now))
                row = found.fetchone()
                if row is None:
                    raise SessionExistsError(f"a session with key {key} exists already")
                session_id, current = row[0], {}
            else:
                found = conn.execute(self._text(SELECT_META), key.parts()).fetchone()
                if found is None:
                    raise _not_found(key)
                session_id, stored, server_now = found
                current = _read_json_object(stored, session_id)
                # After the lock (PostgreSQL), so created_at follows id order (clock.py).
                now_at, now = self._clock.stamp(conn, server_now)
            if check is not None:
                callback_answer("check", check(copy.deepcopy(current)))
            after: dict[SessionKey, Session] = {}
            for other_key, changes in related:
                after[other_key] = self._merge_meta(conn, other_key, changes, now)
            if own is not None:
                merged = dump_json({**current, **own})
                check_text_size("meta", merged)
                conn.execute(self._text(UPDATE_META), (now, merged, *key.parts()))
            ids: list[int] = []
            if rows:
                session_id, ids = self._insert(conn, key, rows, (0, 0, 0), now)
            session = SESSION.read(conn.execute(self._text(SELECT_SESSION), key.parts()).fetchone())
        return AppliedChanges(session, _built(ids, session_id, rows, now_at), after)

    def _merge_meta(self, conn: Any, key: SessionKey, changes: dict[str, Any], now: str) -> Session:
        """Merge `changes` into the metadata of the session for `key`, creating it first if
        there is none; the session after. Empty changes only create it if missing: an
        existing session is read, neither written nor (PostgreSQL) locked."""
        parts = key.parts()
        for _ in range(_GET_OR_CREATE_TRIES):
            created = conn.execute(self._text(INSERT_SESSION), (*parts, now, now)).fetchone()
            if created is not None:
                if not changes:
                    return SESSION.read(created)
                current: dict[str, Any] = {}
                break
            if not changes:
                row = conn.execute(self._text(SELECT_SESSION), parts).fetchone()
                if row is not None:
                    return SESSION.read(row)
                continue  # PostgreSQL: deleted by another writer since the insert
            found = conn.execute(self._text(SELECT_META), parts).fetchone()
            if found is not None:
                current = _read_json_object(found[1], found[0])
                break
        else:
            raise SessionStoreError(f"apply_changes: the session for key {key} kept vanishing")
        merged = dump_json({**current, **changes})
        check_text_size(f"related_meta[{key}]", merged)
        return SESSION.read(conn.execute(self._text(UPDATE_META), (now, merged, *parts)).fetchone())

    def pop_message(self, key: SessionKey | str) -> Message | None:
        """Remove the session's newest message (the highest id) and return it, or return
        None if the session has no message.

        In one write transaction: the row is deleted, `message_count` goes down by one
        and `updated_at` becomes now; the token counters (what the conversation has
        cost), the status and the metadata are kept. Concurrent pops of one session each
        remove and return a different message (the session's row, or SQLite's database,
        is locked first). Cells written by other programs are read as leniently as
        `get_history` reads them. `SessionNotFoundError` if there is no session.
        """
        return self._pop_message(key, text_limit=None)

    @lenient_text_retry_as("pop_message")
    def _pop_message(self, key: SessionKey | str, *, text_limit: int | None) -> Message | None:
        """`pop_message`. With `text_limit` (the async repository's inline call), a message
        of more than `text_limit` characters of text is not decoded here: `OffTheLoop`,
        and nothing is written. Its cells are decoded inside the transaction, so that a
        row this code cannot read is refused, not deleted."""
        key = self._key(key)
        with self._path.transaction("pop_message", "IMMEDIATE") as conn:
            session_id, server_now = self._lock_session(conn, key)
            row = conn.execute(self._text(DELETE_NEWEST_MESSAGE), (session_id,)).fetchone()
            if row is None:
                return None
            read = HistoryRows([(session_id, *row)], newest_first=False)
            if text_limit is not None and read.text_size() > text_limit:
                raise OffTheLoop
            message = HISTORY_MESSAGE.read(read.rows[0])
            _, now = self._clock.stamp(conn, server_now)
            conn.execute(self._text(RECORD_POP), (now, session_id))
        return message

    @lenient_text_retry
    def replace_messages(
        self,
        key: SessionKey | str,
        messages: Sequence[NewMessage | Mapping[str, Any]],
        *,
        replacing: Sequence[Message] | None = None,
        expired: Callable[[Message], object] | None = None,
        tokens: int = 0,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> list[Message]:
        """Replace the session's messages with `messages`, in order (an empty sequence
        removes them), and return the new ones with their ids and timestamps.

        Without `replacing`, every message is replaced. With `replacing`, the session's
        newest messages as the caller read them (`get_history`, oldest first), only
        those are, and only if they are still exactly its newest messages, equal field
        for field: if one was appended, popped, deleted or rewritten since (`compact`'s
        summary takes the id of a message it removes), `HistoryChangedError` and nothing
        is written, so a rewrite computed from a history that has moved on never
        overwrites what was written since. With `expired` too, the session's oldest
        messages, from its first on, are deleted while `expired(message)` is true (up to
        the replaced ones): say, items a framework can no longer read. It runs under the
        write lock, so keep it short and do not call the store from it; an exception from it
        refuses the whole call.

        In one write transaction, so a reader sees the old history or the new one, never
        a mix, and a failure leaves the old one: the replaced rows are deleted, the new
        ones inserted after the rows kept, `message_count` becomes the rows' number, the
        token counters grow by the arguments as `append_messages` adds them (what the
        conversation has cost is kept), `updated_at` becomes now and the status
        `active`; the metadata and the compaction record are kept. The new rows get new
        ids, above every id in the store. Every argument is checked first (`ValueError`
        naming it, `messages[i]` for a message; `replacing` must hold at least one stored
        `Message`, in increasing id order), before anything is written.
        `SessionNotFoundError` if there is no session. For an agent framework's own
        compaction, which rewrites a history or its newest part (the OpenAI Agents SDK
        adapter's).
        """
        key = self._key(key)
        empty = isinstance(messages, Sequence) and not isinstance(messages, str | bytes)
        empty = empty and not messages
        rows = [] if empty else self._rows(as_new_messages(messages))
        read = None if replacing is None else as_read_messages("replacing", replacing)
        if expired is not None:
            if read is None:
                raise ValueError("expired: must be a callable, and goes with `replacing`")
            check_callback("expired", expired)
        counts = check_token_counts(tokens, input_tokens, output_tokens)
        with self._path.transaction("replace_messages", "IMMEDIATE") as conn:
            session_id, server_now = self._lock_session(conn, key)
            if read is None:
                conn.execute(self._text(DELETE_SESSION_MESSAGES), (session_id,))
            else:
                newest = conn.execute(self._text(NEWEST_MESSAGES), (session_id, len(read)))
                current = [HISTORY_MESSAGE.read((session_id, *row)) for row in newest]
                if current[::-1] != read:
                    raise HistoryChangedError(
                        f"the newest messages of {key} are no longer those of `replacing`"
                    )
                conn.execute(self._text(DELETE_MESSAGES_FROM), (session_id, read[0].id))
                if expired is not None:
                    self._delete_expired(conn, session_id, read[0].id, expired)
            conn.execute(self._text(RECOUNT_MESSAGES), (session_id,))
            now, now_text = self._clock.stamp(conn, server_now)
            session_id, new_ids = self._insert(conn, key, rows, counts, now_text)
        return _built(new_ids, session_id, rows, now)

    def _delete_expired(
        self, conn: Any, session_id: int, before: Any, expired: Callable[[Message], object]
    ) -> None:
        """Delete the session's oldest messages below id `before`, from its first on,
        while `expired(message)` is true (`replace_messages`)."""
        after, last = 0, None
        while True:
            page = conn.execute(
                self._text(OLDEST_BETWEEN), (session_id, after, before, _EXPIRED_PAGE)
            ).fetchall()
            for row in page:
                message = HISTORY_MESSAGE.read((session_id, *row))
                if not callback_answer("expired", expired(message)):
                    break
                last = message.id
            else:
                if len(page) == _EXPIRED_PAGE:  # all expired: the next page may be too
                    after = page[-1][0]
                    continue
            break
        if last is not None:
            conn.execute(self._text(DELETE_MESSAGES_UP_TO), (session_id, last))

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
        last id you got). One statement, so one snapshot; `SessionNotFoundError` if
        there is no session.
        """
        return messages_of_history(
            self._get_history_rows(key, limit=limit, before_id=before_id, after_id=after_id)
        )

    @lenient_text_retry_as("get_history")
    def _get_history_rows(
        self,
        key: SessionKey | str,
        *,
        limit: int | None = None,
        before_id: int | None = None,
        after_id: int | None = None,
    ) -> HistoryRows:
        """`get_history`'s read: its rows, not decoded yet (`messages_of_history`), so
        that the async API may decode a page of big messages off the event loop."""
        key = self._key(key)
        if limit is not None:
            check_int("limit", limit, minimum=0)
        if before_id is not None:
            check_int("before_id", before_id, minimum=None)
        if after_id is not None:
            check_int("after_id", after_id, minimum=None)
        if limit == 0:
            # The joined query returns no row at all for LIMIT 0; only existence matters.
            with self._path.transaction("get_history", None) as conn:
                if conn.execute(self._text(SELECT_SESSION_ID), key.parts()).fetchone() is None:
                    raise _not_found(key)
            return HistoryRows([], False)
        newest_first = limit is not None and after_id is None
        sql = self._sql(
            history(
                newest_first=newest_first,
                limit=limit is not None,
                after=after_id is not None,
                before=before_id is not None,
            )
        )
        params = {
            **dict(zip(KEY, key.parts(), strict=True)),
            "limit": limit,
            "offset": 0,
            "after_id": after_id,
            "before_id": before_id,
        }
        with self._path.transaction("get_history", None) as conn:
            rows = conn.execute(sql.text, sql.bind(params)).fetchall()
        if not rows:
            raise _not_found(key)
        if rows[0][1] is None:  # the session, without a message in the window
            return HistoryRows([], False)
        return HistoryRows(rows, newest_first)

    @lenient_text_retry
    def get_history_text(
        self, key: SessionKey | str, *, limit: int | None = None
    ) -> list[tuple[Any, Any, Any]]:
        """The newest `limit` messages (all without it) as the `(role, content, metadata)`
        cells stored in their rows, in chronological (id) order: text, JSON text for
        content and metadata, not decoded or checked (another program may have stored
        anything there; SQLite may even give a number or bytes). The cheapest read of a
        history, for a reader that decodes only what it needs or forwards the JSON as it
        is (the OpenAI Agents SDK adapter). One snapshot: one statement, or, when it
        finds no message, that statement again and the session's lookup in one read
        transaction; `SessionNotFoundError` if there is no session.
        """
        key = self._key(key)
        if limit is not None:
            check_int("limit", limit, minimum=0)
        parts = key.parts()
        sql = self._sql(HISTORY_TEXT)
        params = sql.bind(
            {
                **dict(zip(KEY, parts, strict=True)),
                "limit": _MAX_BIGINT if limit is None else limit,
                "offset": 0,
            }
        )
        rows: list[tuple[Any, Any, Any]] = []
        if limit != 0:
            with self._path.transaction("get_history_text", None) as conn:
                rows = conn.execute(sql.text, params).fetchall()
        if not rows:
            # No message, or no session: which, in one snapshot (a session may have been
            # created with its first messages since).
            with self._path.transaction("get_history_text", "DEFERRED") as conn:
                if limit != 0:
                    rows = conn.execute(sql.text, params).fetchall()
                if (
                    not rows
                    and conn.execute(self._text(SELECT_SESSION_ID), parts).fetchone() is None
                ):
                    raise _not_found(key)
        rows.reverse()
        return rows

    @lenient_text_retry
    def search_messages(
        self,
        query: str,
        *,
        filter: SessionFilter | Mapping[str, Any] | None = None,
        roles: Role | str | Iterable[Role | str] | None = None,
        limit: int = 20,
    ) -> list[SearchHit]:
        """The messages whose search text matches `query`, best first, at most `limit`,
        of the sessions matching `filter` (and the repository's agent, if confined), with
        one of `roles` if given.

        Every plain word of `query` must appear (in any order, any case, accents
        ignored on SQLite); `"quoted words"` must appear together in that order; every
        other character is taken literally, so no text raises a syntax error. A
        message's search text is its content if that is a string, else the strings of
        its text blocks (docs/api.md, "Search"); tool calls and metadata are not
        searched. A query without a word (empty, only spaces or punctuation) finds
        nothing. Read-only, one statement through the search index (on PostgreSQL after one
        that makes the query). `ValueError`
        naming `query` for a non-string, one over `MAX_QUERY_CHARS` (100 000)
        characters, or one whose distinct terms hold over `MAX_QUERY_WORDS` (4 096) words;
        naming `roles` or `limit` (an int >= 0) for those. On PostgreSQL, a token of
        over 2 047 bytes (a word, a URL, an address) is in no index, so a query holding
        one finds nothing. Rows that
        cannot be read are left out and logged, as in `list_sessions`."""
        terms = search_terms(query)
        fields, params = self._filter_params(filter)
        wanted = check_roles(roles) or ()
        check_int("limit", limit, minimum=0)
        if not terms or limit == 0:
            return []
        values: dict[str, Any] = {
            **params,
            "limit": limit,
            "query": fts_query(terms),
            "terms": terms,
        }
        for index, role in enumerate(wanted):
            values[f"role_{index}"] = role.value
        sql = self._sql(search(fields, len(wanted)))
        with self._path.transaction("search_messages", None) as conn:
            if self._dialect.name == "postgresql":
                made = self._sql(SEARCH_QUERY)
                values["long"] = any(len(term.encode()) >= 2048 for term in terms)
                query, too_long = conn.execute(made.text, made.bind(values)).fetchone()
                if query is None or too_long:
                    # No term holds a word; or one holds a token PostgreSQL indexes in no
                    # message, which the query would leave out, asking less.
                    return []
                values["tsquery"] = query
            rows = conn.execute(sql.text, sql.bind(values)).fetchall()
        return list(readable(_hit, rows))

    # --- lifecycle --------------------------------------------------------------------

    def compact(
        self, key: SessionKey | str, *, keep_last: int, summary: str | None = None
    ) -> CompactionResult:
        """Keep the newest `keep_last` messages and delete the rest, in one write
        transaction; `SessionNotFoundError` if there is no session.

        With `summary`, a `system` message holding it takes the place of the removed
        ones: it gets the id and `created_at` of the newest removed message, so it sits
        right before the kept messages in history (id) order, and nothing kept changes id.
        Then `message_count` is recounted from the rows, `compaction_count` grows by one,
        `last_compacted_at` and `updated_at` become now, `last_compaction_summary` is the
        summary (or NULL) and the status `compacted`. `token_usage` (what the
        conversation has cost), `input_tokens` and `output_tokens` are kept.

        When there is nothing to remove (`keep_last` >= the number of messages) nothing
        changes, the summary included, and the result says `removed == 0`.
        `keep_last` is an int >= 0; a summary must be text that is not empty or only
        whitespace (`ValueError` naming the argument, before anything is written).
        """
        key = self._key(key)
        check_int("keep_last", keep_last, minimum=0)
        if summary is not None:
            check_summary(summary)
            if self._no_nul:
                refuse_nul("summary", summary)
        with self._path.transaction("compact", "IMMEDIATE") as conn:
            session_id, server_now = self._lock_session(conn, key)
            newest_removed = conn.execute(
                self._text(NEWEST_REMOVED), (session_id, keep_last)
            ).fetchone()
            if newest_removed is None:
                row = conn.execute(self._text(SELECT_SESSION), key.parts()).fetchone()
                return CompactionResult(removed=0, summary=None, session=SESSION.read(row))
            last, last_created = newest_removed
            removed = conn.execute(self._text(DELETE_MESSAGES_UP_TO), (session_id, last)).rowcount
            summary_message = None
            if summary is not None:
                stored = stored_json("summary", summary)
                values = (last, session_id, Role.SYSTEM.value, stored, None, last_created, "{}")
                conn.execute(self._text(INSERT_MESSAGE_WITH_ID), values)
                summary_message = HISTORY_MESSAGE.read((session_id, *values))
            _, now = self._clock.stamp(conn, server_now)
            row = conn.execute(
                self._text(RECORD_COMPACTION), (now, now, summary, session_id)
            ).fetchone()
        return CompactionResult(
            removed=int(removed), summary=summary_message, session=SESSION.read(row)
        )

    def reset(self, key: SessionKey | str) -> Session:
        """Start the conversation afresh under the same key, in one write transaction:
        every message is deleted and the session returns to its newly created state
        (`message_count`, the three token counters and `compaction_count` 0, no last
        compaction,
        status `active`, `updated_at` now), keeping only its `id`, `created_at` and
        metadata. `SessionNotFoundError` if there is no session."""
        key = self._key(key)
        with self._path.transaction("reset", "IMMEDIATE") as conn:
            session_id, server_now = self._lock_session(conn, key)
            conn.execute(self._text(DELETE_SESSION_MESSAGES), (session_id,))
            _, now = self._clock.stamp(conn, server_now)
            row = conn.execute(self._text(RESET_SESSION), (now, session_id)).fetchone()
        return SESSION.read(row)

    def mark_idle(self, *, idle_for: timedelta) -> int:
        """Mark `idle` every `active` session (of this repository's agent, if confined)
        not updated for `idle_for` or longer, in one write transaction, and return how
        many. `updated_at` is kept, so the time since the last activity stays true; the
        next append makes a session `active` again. `idle_for` must be a positive
        `timedelta`."""
        check_idle_for(idle_for)
        sql = self._sql(mark_idle(scoped=self._agent is not None))
        with self._path.transaction("mark_idle", "IMMEDIATE") as conn:
            now, _ = self._clock.stamp(conn)
            values = {
                "before": utc_text(ago("idle_for", now, idle_for)),
                "status": SessionStatus.ACTIVE.value,
                "agent_scope": self._agent,
            }
            return int(conn.execute(sql.text, sql.bind(values)).rowcount)

    def now(self) -> datetime:
        """The store's time now, the clock every timestamp it writes comes from (see
        `open_database(clock=...)`): on PostgreSQL the server's, on SQLite this host's
        but never earlier than the newest timestamp stored. Compute cutoffs such as
        `prune(updated_before=repo.now() - age)` from it, so a host with a skewed clock
        prunes what the store's clock says is old. Read-only, one statement."""
        with self._path.transaction("now", None) as conn:
            return self._clock.stamp(conn)[0]

    def prune(
        self,
        *,
        updated_before: datetime,
        status: SessionStatus | str | None = None,
        filter: SessionFilter | Mapping[str, Any] | None = None,
        dry_run: bool = False,
        on_batch: Callable[[int], object] | None = None,
    ) -> int:
        """Delete every session (of this repository's agent, if confined) last updated
        before `updated_before`, and with `status` if given, with its messages; return
        how many; with `filter`, only those it matches too (its own `updated_*` bounds
        apply besides `updated_before`). With `dry_run`, count them and delete nothing.

        The deletion runs in batches, each its own write transaction of whole sessions
        holding at most about `PRUNE_BATCH_MESSAGES` messages (a larger session goes
        alone), so the write lock is never held for long and other writers go on between
        batches. Each batch checks the condition again, so a session written to while the
        prune runs is kept. `on_batch`, if given, is called after each committed batch
        with the number deleted so far (for progress reports). `updated_before` must be
        timezone-aware.
        """
        if dry_run:
            return self._prune_count(self._prune_plan(updated_before, status, filter))
        deleted = 0
        batches = self.prune_batches(updated_before=updated_before, status=status, filter=filter)
        for deleted in batches:
            if on_batch is not None:
                on_batch(deleted)
            if not self._lock_rows:
                # SQLite's write lock is the whole database's: let a writer waiting on it
                # take it before the next batch does. (PostgreSQL's writers of other
                # sessions never wait for a batch, which locks only its own rows.)
                time.sleep(0.001)
        return deleted

    def prune_batches(
        self,
        *,
        updated_before: datetime,
        status: SessionStatus | str | None = None,
        filter: SessionFilter | Mapping[str, Any] | None = None,
    ) -> Iterator[int]:
        """`prune`, one batch per step of the iterator returned: each step runs one write
        transaction (on the thread that takes the step) and gives the number of sessions
        deleted so far; the iteration ends when none is left. For progress reports and
        for stopping between batches: a prune stopped early keeps every session its
        later batches would have deleted, and each batch is whole. The arguments are
        checked when this is called (`ValueError` naming the argument), before any batch.
        """
        plan = self._prune_plan(updated_before, status, filter)
        return self._prune_batches(plan)

    def _prune_batches(self, plan: _PrunePlan) -> Iterator[int]:
        deleted = 0
        while batch := self._prune_batch(plan):
            deleted += batch
            yield deleted

    def _prune_plan(
        self,
        updated_before: datetime,
        status: SessionStatus | str | None,
        filter: SessionFilter | Mapping[str, Any] | None,
    ) -> _PrunePlan:
        """`prune`'s arguments checked (`ValueError` naming the argument) and in stored
        form."""
        check_aware("updated_before", updated_before)
        wanted = None if status is None else check_status(status)
        fields, params = self._filter_params(filter)
        return _PrunePlan(
            status=wanted is not None,
            fields=fields,
            values={
                **params,
                "before": utc_text(updated_before),
                "prune_status": None if wanted is None else wanted.value,
                "limit": PRUNE_BATCH_SESSIONS,
            },
        )

    def _prune_count(self, plan: _PrunePlan) -> int:
        sql = self._sql(prune_count(status=plan.status, fields=plan.fields))
        with self._path.transaction("prune", None) as conn:
            return int(conn.execute(sql.text, sql.bind(plan.values)).fetchone()[0])

    def _prune_batch(self, plan: _PrunePlan) -> int:
        """Delete one batch of `prune` in one write transaction; how many sessions (0 when
        none is left)."""
        candidates = self._sql(prune_candidates(status=plan.status, fields=plan.fields))
        delete_batch = self._sql(prune_delete(status=plan.status, fields=plan.fields))
        with self._path.transaction("prune", "IMMEDIATE") as conn:
            batch: list[int] = []
            messages = 0
            for session_id, stored in conn.execute(candidates.text, candidates.bind(plan.values)):
                # A counter another program left unreadable (text, bytes, a float) says
                # nothing of the session's messages: that session takes a batch alone.
                count = stored if type(stored) is int else PRUNE_BATCH_MESSAGES
                if batch and messages + count > PRUNE_BATCH_MESSAGES:
                    break
                batch.append(session_id)
                messages += count
            if batch:
                values = {**plan.values, "last": batch[-1]}
                conn.execute(delete_batch.text, delete_batch.bind(values))
        return len(batch)

    # --- helpers ----------------------------------------------------------------------

    def _lock_session(self, conn: Any, key: SessionKey) -> tuple[int, str | None]:
        """Lock the session's row until the transaction ends (PostgreSQL; SQLite's write
        lock is the database's); its id and, on PostgreSQL, the server's time after the
        lock. `SessionNotFoundError` if there is no session."""
        found = conn.execute(self._text(LOCK_SESSION), key.parts()).fetchone()
        if found is None:
            raise _not_found(key)
        return int(found[0]), found[1]

    def _refused_append(
        self, conn: Any, key: SessionKey, added: int, counts: _Tokens
    ) -> SessionStoreError | ValueError:
        """Why `COUNT_APPEND` matched no row: no session, or counters without room."""
        found = conn.execute(self._text(SESSION_COUNTERS), key.parts()).fetchone()
        if found is None:
            return _not_found(key)
        messages, *used = found
        for column, stored, adding in zip(
            ("token_usage", "input_tokens", "output_tokens"), used, counts, strict=True
        ):
            if stored > _MAX_BIGINT - adding:
                return ValueError(
                    f"tokens: adding {adding} to the session's {column} ({stored}) would "
                    f"pass {_MAX_BIGINT}, the largest count the store keeps; nothing was "
                    "written"
                )
        return ValueError(
            f"messages: adding {added} to the session's message_count ({messages}) would "
            f"pass {self._max_count}, the largest count this database keeps; nothing was "
            "written"
        )

    def _filter_params(
        self, filter: SessionFilter | Mapping[str, Any] | None
    ) -> tuple[tuple[str, ...], dict[str, Any]]:
        return filter_params(filter, self._agent)


# --- helpers --------------------------------------------------------------------------


def filter_params(
    filter: SessionFilter | Mapping[str, Any] | None, agent: str | None = None
) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The fields a filter sets (plus `agent_scope` when `agent` confines it) and their
    values in stored form, for `statements.filter_clauses`; `ValueError` for a bad
    filter."""
    spec = as_filter(filter)
    fields: list[str] = []
    params: dict[str, Any] = {}
    for name, value in spec:
        if value is None:
            continue
        if name == "meta":
            # In key order: the same conditions give the same statement and cursors.
            for index, (meta_key, meta_value) in enumerate(sorted(value.items())):
                fields.append(f"meta_{index}")
                params.update(meta_params(index, meta_key, meta_value))
            continue
        fields.append(name)
        if isinstance(value, datetime):
            params[name] = utc_text(value)
        elif isinstance(value, StrEnum):
            params[name] = value.value
        else:
            params[name] = value
    if agent is not None:
        fields.append("agent_scope")
        params["agent_scope"] = agent
    return tuple(fields), params


def readable(read: Callable[[Any], _T], rows: Iterable[Any]) -> Iterator[_T]:
    """`read(row)` for each row, leaving out (and logging) rows that cannot be read."""
    for row in rows:
        try:
            yield read(row)
        except DamagedRowError as exc:
            logger.warning("skipped a damaged row: %s", exc)


_UPDATED_AT = SESSION.names.index("updated_at")
_MESSAGE_COLUMNS = len(MESSAGE.columns)


def _hit(row: Sequence[Any]) -> SearchHit:
    """A `search` row as a `SearchHit`; `DamagedRowError` for a message that cannot be
    read or a session key that is not one."""
    message = MESSAGE.read(row)
    parts = row[_MESSAGE_COLUMNS : _MESSAGE_COLUMNS + 5]
    try:
        key = SessionKey(*parts)
    except (TypeError, ValueError) as exc:
        raise DamagedRowError("sessions", message.session_id, "key", str(exc)) from None
    snippet, rank = row[_MESSAGE_COLUMNS + 5], row[_MESSAGE_COLUMNS + 6]
    return SearchHit(message=message, key=key, snippet=snippet or "", rank=float(rank or 0))


def _lenient_int(value: Any) -> int:
    """A summed counter as an int (sums over damaged rows may be floats or text)."""
    if type(value) is int:
        return value
    try:
        return int(float(value or 0))
    except (TypeError, ValueError, OverflowError):
        return 0


def _known_status(stored: Any) -> SessionStatus | None:
    try:
        return parse_enum(SessionStatus, stored)
    except ValueError:
        return None


_Row = tuple[Role, Any, Any, dict[str, Any], str, str | None, str]
"""A message to insert: role, content, tool calls, metadata, then the stored texts of
the last three."""
_Tokens = tuple[int, int, int]
"""What an append adds to `token_usage`, `input_tokens` and `output_tokens`."""


# Rows per INSERT when appending a batch: SQLite allows 32 766 parameters per statement,
# and a statement's values are kept under _CHUNK_BYTES (PostgreSQL refuses messages of
# 1 GiB or more).
_INSERT_CHUNK = 500
_CHUNK_BYTES = 64 * 1024 * 1024


def _one_chunk(rows: list[_Row]) -> bool:
    """Whether `rows` fit one INSERT (`_chunks` would not split them)."""
    if len(rows) > _INSERT_CHUNK:
        return False
    return sum(len(row[4]) + len(row[5] or "") + len(row[6]) for row in rows) <= _CHUNK_BYTES // 4


def _built(ids: list[int], session_id: int, rows: list[_Row], now: datetime) -> list[Message]:
    """The `Message`s of rows just inserted with `ids`, stamped `now`."""
    build = MESSAGE.build
    return [
        build((message_id, session_id, role, content, calls, now, meta))
        for message_id, (role, content, calls, meta, *_) in zip(ids, rows, strict=True)
    ]


def _chunks(rows: list[_Row]) -> Iterator[list[_Row]]:
    chunk: list[_Row] = []
    size = 0
    for row in rows:
        # Characters, not bytes: a bound that costs nothing to keep.
        weight = len(row[4]) + len(row[5] or "") + len(row[6])
        if chunk and (len(chunk) == _INSERT_CHUNK or size + weight > _CHUNK_BYTES // 4):
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += weight
    if chunk:
        yield chunk


def _not_found(key: SessionKey) -> SessionNotFoundError:
    return SessionNotFoundError(f"no session for key {key}")


def _read_json_object(stored: Any, session_id: int) -> dict[str, Any]:
    """Stored metadata to merge into: JSON that is not an object (plain SQL may have
    stored one) starts afresh; text that is not JSON, and a cell that is not text
    (SQLite may hold bytes or a number there), is refused, naming the row."""
    fix = "replace it with update_metadata(..., replace=True)"
    if not isinstance(stored, str):
        raise DamagedRowError(
            "sessions", session_id, "metadata", f"not text but {type(stored).__name__}; {fix}"
        )
    try:
        value = JSONText().read(stored)
    except ValueError as exc:
        raise DamagedRowError(
            "sessions", session_id, "metadata", f"not JSON ({exc}); {fix}"
        ) from exc
    return value if isinstance(value, dict) else {}


class HistoryRows(NamedTuple):
    """`get_history`'s rows as read (`SessionRepository._get_history_rows`)."""

    rows: list[Any]
    newest_first: bool

    def text_size(self) -> int:
        """How many characters of text (and bytes of blobs) the rows' content, tool
        calls and metadata hold."""
        content, calls, meta = _HISTORY_TEXT_CELLS
        try:
            return sum(
                [
                    len(r[content]) + len(r[meta]) + (len(r[calls]) if r[calls] else 0)
                    for r in self.rows
                ]
            )
        except TypeError:  # a cell another program stored as a number, or NULL
            cells = [r[i] for r in self.rows for i in _HISTORY_TEXT_CELLS]
            return sum(len(cell) for cell in cells if isinstance(cell, str | bytes))


_HISTORY_TEXT_CELLS = tuple(
    HISTORY_MESSAGE.skip + HISTORY_MESSAGE.names.index(name)
    for name in ("content", "tool_calls", "meta")
)
"""Where a history row holds its text: the cells of `content`, `tool_calls`, `meta`."""


def messages_of_history(read: HistoryRows) -> list[Message]:
    """The `Message`s of `get_history`'s rows, oldest first."""
    messages = [HISTORY_MESSAGE.read(row) for row in read.rows]
    if read.newest_first:
        messages.reverse()
    return messages
