"""`AisopodSessionService`: Google ADK's `BaseSessionService` on the session store, so
`Runner(session_service=AisopodSessionService(...))` keeps ADK's sessions, events and
state there.

An ADK session `(app_name, user_id, session_id)` is one store session (see
`session_key`), each of its events one message row: the event's content parts are the
row's `content` (so `sessions show` prints them and `search_messages` finds them), the
rest of the event is in the row's metadata, from which the event is rebuilt exactly. The
session's state is its metadata; app and user state are the metadata of sessions of
their own on the channel `adk-state`. docs/integrations.md has the whole mapping. Needs
the extra `aisopod-session[adk]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from typing import Any, cast

from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError as AdkNotFoundError
from google.adk.events.event import Event
from google.adk.sessions.base_session_service import (
    BaseSessionService,
    GetSessionConfig,
    ListSessionsResponse,
)
from google.adk.sessions.session import Session as AdkSession
from google.adk.sessions.state import State
from google.genai import types
from pydantic import ValidationError
from pydantic_core import to_jsonable_python
from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from aisopod_session.asyncrepository import AsyncSessionRepository
from aisopod_session.database import open_async_database_sync
from aisopod_session.enums import PeerKind, Role
from aisopod_session.errors import DamagedRowError, SessionExistsError, SessionNotFoundError
from aisopod_session.keys import SessionKey
from aisopod_session.models import Message, NewMessage, Session
from aisopod_session.repository import SessionRepository
from aisopod_session.validation import check_json, first_nul

DEFAULT_AGENT = "google-adk"
"""The keys' agent, unless the repository is confined to another or `agent_id` says."""
CHANNEL = "adk"
"""The channel of every ADK session's key."""
STATE_CHANNEL = "adk-state"
"""The channel of the sessions holding app and user state (no messages)."""
SOURCE = "google-adk"
"""The `source` in the metadata of every message this adapter writes."""

APP_NAME = "temp:adk:app_name"
USER_ID = "temp:adk:user_id"
UPDATE_TIME = "temp:adk:update_time"
"""Bookkeeping kept in a session's metadata beside its state: its app, its user, and
ADK's `last_update_time` (the last event's timestamp). ADK never stores a `temp:` state
key, so no state key can take these names."""

_PAGE = 64
"""Events read per step when `after_timestamp` bounds a read, and a user's sessions read
at first by `list_sessions`: as many as an `AsyncSessionRepository` reads inline."""


def _escape(text: str) -> str:
    """`text` with `%`, `:`, whitespace and control characters percent-encoded (UTF-8), so
    that joined with `:` it is one key part, unambiguous, kept exactly (a key part is
    stripped and may not hold control characters)."""
    out = []
    for char in text:
        if char in "%:" or char.isspace() or not char.isprintable():
            out.append("".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass")))
        else:
            out.append(char)
    return "".join(out)


def _unescape(text: str) -> str:
    """The inverse of `_escape`."""
    if "%" not in text:
        return text
    raw = bytearray()
    index = 0
    while index < len(text):
        if text[index] == "%":
            raw.append(int(text[index + 1 : index + 3], 16))
            index += 3
        else:
            raw.extend(text[index].encode("utf-8", "surrogatepass"))
            index += 1
    return raw.decode("utf-8", "surrogatepass")


def _text(field: str, value: Any) -> str:
    """`value` if it is a string that UTF-8 can hold, else `ValueError` naming `field`."""
    if not isinstance(value, str):
        raise ValueError(f"{field}: must be a string, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field}: holds a lone surrogate, which no store can keep") from None
    return value


@functools.lru_cache(maxsize=4096)
def session_key(
    app_name: str, user_id: str, session_id: str, agent_id: str = DEFAULT_AGENT
) -> SessionKey:
    """The store key of an ADK session: agent `agent_id`, channel `adk`, account
    `<app_name>:<user_id>`, a `thread` whose peer id is `session_id`; in each name `%`,
    `:`, whitespace and control characters are percent-encoded, so every name is kept
    exactly. `ValueError` naming the argument for a non-string, and for names too long
    for a key (the account and the peer id take at most 255 characters each, encoded)."""
    account = f"{_escape(_text('app_name', app_name))}:{_escape(_text('user_id', user_id))}"
    peer = _escape(_text("session_id", session_id))
    if len(account) > 255:
        raise ValueError(
            f"app_name, user_id: together at most 254 characters (encoded), got {len(account) - 1}"
        )
    if len(peer) > 255:
        raise ValueError(f"session_id: at most 255 characters (encoded), got {len(peer)}")
    return SessionKey(agent_id, CHANNEL, account, PeerKind.THREAD, peer)


@functools.lru_cache(maxsize=4096)
def app_state_key(app_name: str, agent_id: str = DEFAULT_AGENT) -> SessionKey:
    """The key of the session whose metadata is `app_name`'s app state: channel
    `adk-state`, account `<app_name>:`, a `channel` peer `app`."""
    return SessionKey(
        agent_id, STATE_CHANNEL, f"{_escape(_text('app_name', app_name))}:", PeerKind.CHANNEL, "app"
    )


@functools.lru_cache(maxsize=4096)
def user_state_key(app_name: str, user_id: str, agent_id: str = DEFAULT_AGENT) -> SessionKey:
    """The key of the session whose metadata is `user_id`'s user state in `app_name`:
    channel `adk-state`, account `<app_name>:`, a `dm` peer `user:<user_id>`."""
    peer = f"user:{_escape(_text('user_id', user_id))}"
    if len(peer) > 255:
        raise ValueError(f"user_id: at most 250 characters (encoded), got {len(peer) - 5}")
    return SessionKey(
        agent_id, STATE_CHANNEL, f"{_escape(_text('app_name', app_name))}:", PeerKind.DM, peer
    )


def split_state(
    state: Mapping[str, Any], field: str = "state"
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """ADK state (or a state delta) as its app, user and session parts, app and user keys
    without their prefixes, `temp:` keys left out, every value made JSON (as ADK's own
    SQL stores make it: a value JSON cannot hold becomes its text). `ValueError` naming
    `field` for a key that is not a string UTF-8 can hold, and naming the argument
    (`field` up to its first dot) and the value's place for a value the store cannot
    hold (an integer beyond 64 bits, NaN, nesting deeper than `MAX_JSON_DEPTH`)."""
    kept: dict[str, Any] = {}
    for key, value in state.items():
        _text(f"{field} key {key!r}", key)
        if not key.startswith(State.TEMP_PREFIX):
            kept[key] = value
    stored = check_json(field.partition(".")[0], to_jsonable_python(kept, fallback=str), field)
    app: dict[str, Any] = {}
    user: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for key, value in stored.items():
        if key.startswith(State.APP_PREFIX):
            app[key.removeprefix(State.APP_PREFIX)] = value
        elif key.startswith(State.USER_PREFIX):
            user[key.removeprefix(State.USER_PREFIX)] = value
        else:
            own[key] = value
    return app, user, own


def event_to_message(event: Event) -> NewMessage:
    """The message row of an event: its content's parts as the row's `content`, the rest
    of the event (its JSON form, as ADK stores it) in the row's metadata under `event`;
    role `tool` for function responses, `user` for the user's events, else `assistant`."""
    data = event.model_dump(mode="json", exclude_none=True)
    # ADK never stores `temp:` state: not in the state, nor in the event's delta.
    actions = data.get("actions")
    delta = actions.get("state_delta") if isinstance(actions, dict) else None
    if (
        isinstance(actions, dict)
        and isinstance(delta, dict)
        and any(name.startswith(State.TEMP_PREFIX) for name in delta)
    ):
        actions["state_delta"] = {
            name: value for name, value in delta.items() if not name.startswith(State.TEMP_PREFIX)
        }
    content = data.get("content")
    parts = None
    if isinstance(content, dict) and "parts" in content:
        parts = content.pop("parts")
    if isinstance(parts, list) and any(
        isinstance(part, dict) and "function_response" in part for part in parts
    ):
        role = Role.TOOL
    elif event.author == "user":
        role = Role.USER
    else:
        role = Role.ASSISTANT
    try:
        return NewMessage(role, parts, meta={"source": SOURCE, "event": data})
    except ValueError:
        # Refused: say where in the event, in ADK's terms, not in the row's (the event
        # sits in the metadata under `event`, one level down).
        check_json("event", data, depth=2)
        check_json("event", parts, "event.content.parts")
        raise  # pragma: no cover - the same checks refused it above


def message_to_event(message: Message) -> Event:
    """The event a message row holds: rebuilt exactly from what `event_to_message`
    stored; a message another writer appended under the key (no such metadata) as an
    event of its role with its content as one text part. `DamagedRowError` naming the row
    for this adapter's metadata that ADK cannot read."""
    meta = message.meta
    data = meta.get("event") if meta.get("source") == SOURCE else None
    if not isinstance(data, dict):
        content = message.content
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        return Event(
            id=f"aisopod-message-{message.id}",
            invocation_id="",
            author="user" if message.role == Role.USER else str(message.role),
            content=types.Content(
                role="user" if message.role in (Role.USER, Role.TOOL) else "model",
                parts=[types.Part(text=text)],
            ),
            timestamp=message.created_at.timestamp(),
        )
    if message.content is not None:
        content = data.get("content")
        data = {**data, "content": {**(content if isinstance(content, dict) else {})}}
        data["content"]["parts"] = message.content
    try:
        return Event.model_validate_json(json.dumps(data))
    except ValidationError as exc:
        raise DamagedRowError(
            "messages", message.id, "metadata", f"not an ADK event: {exc}"
        ) from None


class AisopodSessionService(BaseSessionService):
    """A Google ADK session service whose sessions, events and state live in the session
    store.

    `repository` is a `SessionRepository` (its calls run on a worker thread, off the
    event loop) or an `AsyncSessionRepository` (faster: short calls run inline); a
    confined one works, and gives the keys its agent (else `agent_id`, by default
    `google-adk`). Each method is one atomic repository call for its writes:
    `create_session` creates the session and merges its app and user state in one write
    transaction; `append_event` checks that the session is not stale, merges the
    event's state delta into the session, app and user state and appends the event, in
    one. Share one service between runners, threads and event loops freely.
    """

    def __init__(
        self,
        repository: SessionRepository | AsyncSessionRepository,
        *,
        agent_id: str | None = None,
    ) -> None:
        """Bind the service to `repository`; `TypeError` naming `repository` if it is not
        one, `ValueError` naming `agent_id` if it is invalid (or not the agent a confined
        repository is confined to). No I/O."""
        if not isinstance(repository, SessionRepository | AsyncSessionRepository):
            raise TypeError(
                "repository: must be a SessionRepository or an AsyncSessionRepository, "
                f"not {type(repository).__name__}"
            )
        agent = agent_id if agent_id is not None else repository.agent_id or DEFAULT_AGENT
        try:
            agent = SessionKey(agent, CHANNEL, "a", PeerKind.THREAD, "s").agent_id
        except ValueError as exc:
            raise ValueError(f"agent_id: {exc}") from None
        if repository.agent_id not in (None, agent):
            raise ValueError(
                f"agent_id: {agent!r} is not {repository.agent_id!r}, the agent the "
                "repository is confined to"
            )
        self.repository = repository
        self.agent_id = agent
        self._engine: Engine | AsyncEngine | None = None
        self._closed = False
        # A lock and its number of users per session being appended to, and per event
        # loop (an asyncio lock serves one loop): `_one_append_at_a_time`.
        self._appending: dict[tuple[asyncio.AbstractEventLoop, SessionKey], list[Any]] = {}

    @classmethod
    def open(
        cls, target: str | os.PathLike[str] | URL, *, agent_id: str | None = None
    ) -> AisopodSessionService:
        """A service on a store of its own at `target` (a SQLite path or a database URL,
        as `open_database` takes), opened and migrated now, in the calling thread, and
        closed by `close()`."""
        engine = open_async_database_sync(target)
        try:
            service = cls(AsyncSessionRepository(engine), agent_id=agent_id)
        except BaseException:
            engine.sync_engine.dispose(close=False)
            raise
        service._engine = engine
        return service

    def close(self) -> _Done:
        """Close the store `open` opened (a repository passed in is left open: it is its
        owner's); later calls raise `RuntimeError`. Closing twice is harmless. Done when
        it returns, and awaitable too, so code written for ADK's own services (whose
        `close` is a coroutine) may `await service.close()`."""
        self._closed = True
        engine, self._engine = self._engine, None
        if isinstance(engine, Engine):
            engine.dispose()
        elif engine is not None:
            engine.sync_engine.dispose(close=False)
        return _Done()

    async def __aenter__(self) -> AisopodSessionService:
        """`async with AisopodSessionService.open(...) as service:` closes it at the end,
        as ADK's `DatabaseSessionService` does."""
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise RuntimeError("AisopodSessionService is closed")
        method = getattr(self.repository, name)
        if isinstance(self.repository, AsyncSessionRepository):
            return await cast(Callable[..., Awaitable[Any]], method)(*args, **kwargs)
        return await asyncio.to_thread(method, *args, **kwargs)

    def _keys(self, app_name: str, user_id: str) -> tuple[SessionKey, SessionKey]:
        return app_state_key(app_name, self.agent_id), user_state_key(
            app_name, user_id, self.agent_id
        )

    async def create_session(
        self,
        *,
        app_name: str,
        user_id: str,
        state: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> AdkSession:
        """Create the session (its id stripped of spaces; a new UUID if None or blank)
        with `state`: its `app:` and `user:` keys merged into the app and user state, its
        `temp:` keys dropped, in one write transaction. `AlreadyExistsError` if the
        session exists, with nothing written; `ValueError` naming the argument for
        invalid input."""
        if session_id is not None:
            session_id = _text("session_id", session_id).strip()
        session_id = session_id or str(uuid.uuid4())
        key = session_key(app_name, user_id, session_id, self.agent_id)
        if state is not None and not isinstance(state, Mapping):
            raise ValueError(f"state: must be a dict, not {type(state).__name__}")
        app, user, own = split_state(state or {})
        app_key, user_key = self._keys(app_name, user_id)
        now = time.time()
        meta = {**own, APP_NAME: _escape(app_name), USER_ID: _escape(user_id), UPDATE_TIME: now}
        try:
            result = await self._call(
                "apply_changes",
                key,
                create=True,
                meta=meta,
                related_meta={app_key: app, user_key: user},
            )
        except SessionExistsError:
            raise AlreadyExistsError(f"Session with id {session_id} already exists.") from None
        except ValueError as exc:  # a value of the state the store cannot hold
            stored = {
                **own,
                **{State.APP_PREFIX + name: value for name, value in app.items()},
                **{State.USER_PREFIX + name: value for name, value in user.items()},
            }
            raise ValueError(_refusal("state", str(exc), ("state", stored))) from None
        related = result.related
        return AdkSession(
            id=session_id,
            app_name=app_name,
            user_id=user_id,
            state=_merged(own, _shared(related[app_key].meta, related[user_key].meta)),
            events=[],
            last_update_time=now,
        )

    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> AdkSession | None:
        """The session with its merged state and its events oldest first, or None. With
        `config`: only the latest `num_recent_events` (none for 0), and only the events
        after the newest one older than `after_timestamp`, read from the newest back
        (ADK's in-memory rule; the same as a `timestamp >=` filter for events appended
        in timestamp order, as ADK appends them)."""
        try:
            key = session_key(
                app_name, user_id, _text("session_id", session_id).strip(), self.agent_id
            )
            app_key, user_key = self._keys(app_name, user_id)
        except ValueError:
            return None
        limit = None if config is None else config.num_recent_events
        if limit is not None and limit >= 2**62:
            limit = None  # more than any session holds: all of them
        after = None if config is None else config.after_timestamp
        # Two reads: the session with its state, then its events. An append between
        # them would give state older than the events: read again (at most three times)
        # until the newest event is the one the state was last updated with.
        for _ in range(3):
            session, app_row, user_row = await self._call("get_many", [key, app_key, user_key])
            if session is None:
                return None
            try:
                events, newest = await self._events(key, limit, after)
            except SessionNotFoundError:
                return None  # deleted since it was read
            stamp = session.meta.get(UPDATE_TIME)
            if newest is None or not isinstance(stamp, float | int) or newest == stamp:
                break
        return _adk_session(
            session,
            app_name,
            user_id,
            session_id.strip(),
            _shared(
                {} if app_row is None else app_row.meta, {} if user_row is None else user_row.meta
            ),
            events,
        )

    async def _events(
        self, key: SessionKey, limit: int | None, after: float | None
    ) -> tuple[list[Event], float | None]:
        """The events `get_session` returns, oldest first, and the timestamp of the newest
        one read if this adapter wrote it (None if none was read, or another writer
        appended it)."""
        if limit == 0:
            return [], None
        if after is None:
            messages: list[Message] = await self._call("get_history", key, limit=limit)
            events = [message_to_event(message) for message in messages]
            return events, _stamp(messages[-1], events[-1]) if messages else None
        newest_first: list[Event] = []
        newest: float | None = None
        before: int | None = None
        while limit is None or len(newest_first) < limit:
            step = _PAGE if limit is None else min(_PAGE, limit - len(newest_first))
            page: list[Message] = await self._call("get_history", key, limit=step, before_id=before)
            for message in reversed(page):
                event = message_to_event(message)
                if before is None and message is page[-1]:
                    newest = _stamp(message, event)
                if event.timestamp < after:
                    return newest_first[::-1], newest
                newest_first.append(event)
            if len(page) < step:
                break
            before = page[0].id
        return newest_first[::-1], newest

    async def list_sessions(
        self, *, app_name: str, user_id: str | None = None
    ) -> ListSessionsResponse:
        """The app's sessions (of `user_id`, or of every user if None), without events,
        with their merged state, the least recently updated first (ties: by user id, then
        id). Two reads: the sessions, then the state."""
        if user_id is None:
            _text("app_name", app_name)
            where: dict[str, Any] = {
                "agent_id": self.agent_id,
                "channel": CHANNEL,
                "meta": {APP_NAME: _escape(app_name)},
            }
        else:
            try:
                account = session_key(app_name, user_id, "s", self.agent_id).account_id
            except ValueError:
                return ListSessionsResponse()
            where = {"agent_id": self.agent_id, "channel": CHANNEL, "account_id": account}
        # One user's few sessions come in one short read (inline on an async
        # repository); a full page means there may be more: all of them in one read.
        rows: list[Session] = []
        if user_id is not None:
            rows = await self._call("list_sessions", where, limit=_PAGE, order="key")
        if user_id is None or len(rows) == _PAGE:
            rows = await self._call("list_sessions", where, limit=2**62, order="key")
        users = [user_id] if user_id is not None else sorted({_owner(row) for row in rows})
        state_keys = [app_state_key(app_name, self.agent_id)]
        state_keys += [user_state_key(app_name, user, self.agent_id) for user in users]
        states: list[Session | None] = []
        for start in range(0, len(state_keys), 100):
            states += await self._call("get_many", state_keys[start : start + 100])
        app_state = {} if states[0] is None else states[0].meta
        shared = {
            user: _shared(app_state, {} if row is None else row.meta)
            for user, row in zip(users, states[1:], strict=True)
        }
        sessions = []
        for row in rows:
            owner = _owner(row) if user_id is None else user_id
            sessions.append(
                _adk_session(row, app_name, owner, _unescape(row.peer_id), shared[owner], [])
            )
        sessions.sort(key=lambda s: (s.last_update_time, s.user_id, s.id))
        return ListSessionsResponse(sessions=sessions)

    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        """Delete the session and its events in one write transaction; nothing if there is
        none. App and user state stay."""
        try:
            key = session_key(
                app_name, user_id, _text("session_id", session_id).strip(), self.agent_id
            )
        except ValueError:
            return
        await self._call("delete", key)

    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        """`user_id`'s state in `app_name`, keys without the `user:` prefix; `{}` if there
        is none. One read."""
        try:
            key = user_state_key(app_name, user_id, self.agent_id)
        except ValueError:
            return {}
        row: Session | None = await self._call("get", key)
        return {} if row is None else dict(row.meta)

    async def append_event(self, session: AdkSession, event: Event) -> Event:
        """Store `event` (a partial one is returned unstored) and apply it to `session`.

        In one write transaction: `StaleSessionError` if the stored session was updated
        after `session.last_update_time` (another writer appended since it was read),
        with nothing written; else the state delta's `app:` and `user:` keys are merged
        into the app and user state and the rest into the session's (its `temp:` keys
        only into `session.state`, never stored), and the event is appended.
        `SessionNotFoundError` (ADK's) if there is no stored session."""
        if event.partial:
            return event
        delta = event.actions.state_delta if event.actions else None
        app, user, own = split_state(delta or {}, "event.actions.state_delta")
        key = session_key(session.app_name, session.user_id, session.id, self.agent_id)
        app_key, user_key = self._keys(session.app_name, session.user_id)
        related: dict[SessionKey, dict[str, Any]] = {}
        if app:
            related[app_key] = app
        if user:
            related[user_key] = user
        message = event_to_message(event)
        async with self._one_append_at_a_time(key):
            # Read after the previous append to this session through this service (on
            # this event loop) set it: tasks appending to one session object in turn
            # are not stale to each other, as with ADK's own services.
            seen = session.last_update_time

            def not_stale(meta: Mapping[str, Any]) -> None:
                stored = meta.get(UPDATE_TIME)
                if isinstance(stored, int | float) and stored > seen:
                    raise StaleSessionError(
                        "The last_update_time provided in the session object is earlier "
                        "than the update_time in storage. Please check if it is a stale "
                        "session."
                    )

            try:
                cancelled = await self._settled(
                    "apply_changes",
                    key,
                    messages=[message],
                    meta={**own, UPDATE_TIME: event.timestamp},
                    related_meta=related,
                    check=not_stale,
                )
            except SessionNotFoundError:
                raise AdkNotFoundError(f"Session {session.id} not found.") from None
            except ValueError as exc:
                if isinstance(exc, StaleSessionError):
                    raise
                event_data = (message.meta or {}).get("event")
                places = (("event", event_data), ("event.content.parts", message.content))
                raise ValueError(_refusal("event", str(exc), *places)) from None
            session.last_update_time = event.timestamp
            stored = await super().append_event(session, event)
        if cancelled:
            raise asyncio.CancelledError
        return stored

    @contextlib.asynccontextmanager
    async def _one_append_at_a_time(self, key: SessionKey) -> AsyncIterator[None]:
        """Appends to the session of `key` through this service take turns on this event
        loop (ADK's own services lock each session so too); the lock is dropped when its
        last user leaves."""
        turn = (asyncio.get_running_loop(), key)
        entry = self._appending.get(turn)
        if entry is None:
            entry = self._appending[turn] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._appending[turn]

    async def _settled(self, name: str, *args: Any, **kwargs: Any) -> bool:
        """Run a write to its end even if the caller is cancelled meanwhile (a write
        handed to a thread would commit anyway); True if it was. Its errors raise."""
        task = asyncio.ensure_future(self._call(name, *args, **kwargs))
        cancelled = False
        while True:
            try:
                await asyncio.shield(task)
                return cancelled
            except asyncio.CancelledError:
                if task.cancelled():
                    raise
                cancelled = True
                if task.done():
                    if task.exception() is not None:
                        raise
                    return True
            except BaseException:
                if cancelled:  # the write failed: the cancellation is what the caller sees
                    raise asyncio.CancelledError from None
                raise


def _refusal(argument: str, reason: str, *places: tuple[str, Any]) -> str:
    """Why the store refused `argument`: for a NUL character (PostgreSQL), the place of
    the first one in the values given as `(path, value)`, in ADK's terms, not the row's;
    else the store's own reason."""
    if "NUL character" in reason:
        for root, value in places:
            path = first_nul(value)
            if path is not None:
                return (
                    f"{argument}: the text at {root}{path} holds a NUL character (in a key "
                    "or a value), which PostgreSQL cannot store (SQLite can)"
                )
    return f"{argument}: {reason}"


def _stamp(message: Message, event: Event) -> float | None:
    """The event's timestamp if this adapter stored it (its `update_time` then)."""
    return event.timestamp if message.meta.get("source") == SOURCE else None


class _Done:
    """What `close()` returns: already done, and an awaitable that does nothing more."""

    def __await__(self) -> Generator[None, None, None]:
        yield from ()


def _owner(row: Session) -> str:
    """The ADK user of a session row."""
    user = row.meta.get(USER_ID)
    if isinstance(user, str):
        return _unescape(user)
    return _unescape(row.account_id.partition(":")[2])


def _shared(app: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
    """The app's and the user's state as a session shows them: with their prefixes."""
    state = {State.APP_PREFIX + name: value for name, value in app.items()}
    state.update({State.USER_PREFIX + name: value for name, value in user.items()})
    return state


def _merged(own: Mapping[str, Any], shared: Mapping[str, Any]) -> dict[str, Any]:
    """A session's state as ADK shows it: its own keys, then the app's and the user's
    (`_shared`)."""
    state = {name: value for name, value in own.items() if not name.startswith(State.TEMP_PREFIX)}
    state.update(shared)
    return state


def _adk_session(
    row: Session,
    app_name: str,
    user_id: str,
    session_id: str,
    shared: Mapping[str, Any],
    events: list[Event],
) -> AdkSession:
    stamp = row.meta.get(UPDATE_TIME)
    if not isinstance(stamp, int | float) or isinstance(stamp, bool):
        stamp = row.updated_at.timestamp()
    return AdkSession(
        id=session_id,
        app_name=app_name,
        user_id=user_id,
        state=_merged(row.meta, shared),
        events=events,
        last_update_time=float(stamp),
    )
