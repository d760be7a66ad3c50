"""The session stores of peer projects, each driven through its own public API, behind one
interface (`Peer`) so that `bench.py` can measure them beside our store.

* openai-agents `SQLiteSession` (plain `sqlite3`, one object per session id) and
  `SQLAlchemySession` (`agents.extensions.memory.sqlalchemy_session`, on
  `sqlite+aiosqlite`);
* google-adk `DatabaseSessionService` (SQLAlchemy asyncio on `sqlite+aiosqlite`);
* langchain-community `SQLChatMessageHistory` (SQLAlchemy on `sqlite:///`, sync API).

Each peer creates its store in a new file, in WAL mode where its API lets us ask for it.
The scenario methods are plain or `async def` as the peer's API is; the driver awaits the
coroutine functions (`inspect.iscoroutinefunction`) inside one event loop. `open` and
`close` are always plain: an async peer runs its set-up and tear-down to completion on a
private event loop (see `_run_to_completion`) and leaves no pooled connection behind
between them, so nothing it holds is tied to a loop.

A scenario the peer's public API cannot do raises `NotSupported`. The packages come from
the `bench` dependency group (`make bench`); `available_peers()` skips the ones that fail
to import.

On PostgreSQL (`available_server_peers()`, the PostgreSQL half of `make bench`) the same
three SQLAlchemy-based stores run on psycopg 3 (`postgresql+psycopg`, its asyncio
connection for the async ones), each opened with `open_server(url)` on a URL whose
`search_path` names a schema of its own; everything else is the SQLite peer's code.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import uuid
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from agents import SQLiteSession, TResponseInputItem
    from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession
    from google.adk.events import Event
    from google.adk.sessions import DatabaseSessionService
    from google.adk.sessions import Session as AdkSession
    from langchain_community.chat_message_histories import SQLChatMessageHistory
    from langchain_core.messages import BaseMessage
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")

ROLES = ("user", "assistant", "tool", "system")
# The id under which tool results answer a call, for the peers whose tool messages need one.
TOOL_CALL_ID = "call_bench"
# A session id `open` uses to make a per-session peer create its schema; nothing is ever
# written under it.
SCHEMA_PROBE_ID = "__schema_probe__"


class NotSupported(Exception):  # noqa: N818 (the name the driver expects)
    """The peer's public API cannot do this scenario."""


class Peer(Protocol):
    """One peer store. The scenario methods may be plain or `async def` (the driver awaits
    coroutine functions); they raise `NotSupported` when the public API cannot do it."""

    name: str
    """Store and installed version, e.g. "openai-agents SQLiteSession 0.24.0"."""

    def open(self, path: Path) -> None:
        """Create the store in a new file at `path`."""
        ...

    def journal_mode(self) -> str:
        """The file's journal mode, read with plain sqlite3 after `open`."""
        ...

    def close(self) -> None:
        """Release everything: engines disposed, connections closed."""
        ...

    def create_session(self, session_id: str) -> Awaitable[None] | None:
        """Start a session."""
        ...

    def append_one(self, session_id: str, role: str, content: str) -> Awaitable[None] | None:
        """One message, one call (the peer's own transaction granularity)."""
        ...

    def append_batch(
        self, session_id: str, messages: list[tuple[str, str]]
    ) -> Awaitable[None] | None:
        """Many `(role, content)` messages in one call of the peer's API."""
        ...

    def read_newest(self, session_id: str, limit: int) -> list[Any] | Awaitable[list[Any]]:
        """The newest `limit` messages, oldest first, through the API's own limit."""
        ...

    def get_or_create(self, session_id: str) -> Any | Awaitable[Any]:
        """Fetch an existing session (create it if missing, where the API can)."""
        ...

    def list_sessions(self, limit: int) -> list[Any] | Awaitable[list[Any]]:
        """Up to `limit` sessions, most recently updated first."""
        ...


# --- helpers --------------------------------------------------------------------------


def read_journal_mode(path: Path) -> str:
    """The journal mode of an existing database file, with a plain sqlite3 connection that
    cannot create the file."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True)
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        conn.close()


def _run_to_completion(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run an async set-up or tear-down step from plain code: on a private event loop, in
    a helper thread when this thread already runs one (the driver's)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def _version(distribution: str) -> str:
    return metadata.version(distribution)


def _wal_listener(dbapi_connection: Any, _record: Any) -> None:
    """A SQLAlchemy "connect" listener that switches the file to WAL, as SQLAlchemySession
    of openai-agents does for itself; WAL is persistent, later connections keep it."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _missing(sessions: dict[str, T], session_id: str) -> T:
    try:
        return sessions[session_id]
    except KeyError:
        raise KeyError(f"no session {session_id!r}: call create_session first") from None


# --- openai-agents --------------------------------------------------------------------


def _openai_item(role: str, content: str) -> TResponseInputItem:
    """A Responses API input item: an easy input message, or a tool's function call
    output."""
    if role == "user":
        return {"role": "user", "content": content}
    if role == "assistant":
        return {"role": "assistant", "content": content}
    if role == "system":
        return {"role": "system", "content": content}
    _check_role(role)
    return {"type": "function_call_output", "call_id": TOOL_CALL_ID, "output": content}


class _OnFile:
    """What every peer shares: the file it was opened on, and its journal mode."""

    name: str
    _path: Path | None = None

    def journal_mode(self) -> str:
        """The file's journal mode, read with plain sqlite3 after `open`."""
        return read_journal_mode(self._file())

    def _file(self) -> Path:
        if self._path is None:
            raise RuntimeError(f"{self.name}: call open first")
        return self._path


class _OpenAISessionCalls(_OnFile):
    """The scenario calls of both openai-agents stores: each implements the SDK's
    `Session` protocol (`add_items`, `get_items`), and neither has a call that fetches or
    lists sessions (a session is an id; its row appears with its first message)."""

    label: str
    _sessions: dict[str, Any]

    async def append_one(self, session_id: str, role: str, content: str) -> None:
        await _missing(self._sessions, session_id).add_items([_openai_item(role, content)])

    async def append_batch(self, session_id: str, messages: list[tuple[str, str]]) -> None:
        items = [_openai_item(role, content) for role, content in messages]
        await _missing(self._sessions, session_id).add_items(items)

    async def read_newest(self, session_id: str, limit: int) -> list[Any]:
        items: list[Any] = await _missing(self._sessions, session_id).get_items(limit=limit)
        return items

    def get_or_create(self, session_id: str) -> Any:
        raise NotSupported(f"{self._store()} has no call that fetches a session")

    def list_sessions(self, limit: int) -> list[Any]:
        raise NotSupported(f"{self._store()} has no call that lists sessions")

    def _store(self) -> str:
        return self.label.split()[-1]


class OpenAISQLiteSessionPeer(_OpenAISessionCalls):
    """openai-agents `SQLiteSession`: one object per session id over a shared file, each
    running its `sqlite3` calls in worker threads (`asyncio.to_thread`).

    WAL: the class sets `PRAGMA journal_mode=WAL` on every connection it opens itself.
    No session object (`get_or_create`) and no listing (`list_sessions`): a session is an
    id, and its row appears with its first message.
    """

    label = "openai-agents SQLiteSession"
    distribution = "openai-agents"

    def __init__(self) -> None:
        from agents import SQLiteSession

        self._session_class = SQLiteSession
        self.name = f"{self.label} {_version(self.distribution)}"
        self._path: Path | None = None
        self._sessions: dict[str, SQLiteSession] = {}

    def open(self, path: Path) -> None:
        # Constructing a session creates the schema (and WAL); a probe writes no rows.
        self._session_class(SCHEMA_PROBE_ID, db_path=path).close()
        self._path = path

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()

    def create_session(self, session_id: str) -> None:
        """Construct the session object (schema check, WAL pragma); nothing is written."""
        self._sessions[session_id] = self._session_class(session_id, db_path=self._file())


class OpenAISQLAlchemySessionPeer(_OpenAISessionCalls):
    """openai-agents `SQLAlchemySession` on one shared `sqlite+aiosqlite` AsyncEngine, one
    session object per id (`create_tables` only for the schema probe in `open`).

    WAL: the class registers a "connect" listener on the engine that sets
    `PRAGMA journal_mode = WAL` (and `busy_timeout`). No session object (`get_or_create`)
    and no listing (`list_sessions`), as for `SQLiteSession`.
    """

    label = "openai-agents SQLAlchemySession"
    distribution = "openai-agents"

    def __init__(self) -> None:
        from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession
        from sqlalchemy.ext.asyncio import create_async_engine

        self._session_class = SQLAlchemySession
        self._create_engine = create_async_engine
        self.name = f"{self.label} {_version(self.distribution)}"
        self._path: Path | None = None
        self._engine: AsyncEngine | None = None
        self._sessions: dict[str, SQLAlchemySession] = {}

    def open(self, path: Path) -> None:
        engine = self._create_engine(f"sqlite+aiosqlite:///{path.resolve()}")

        async def create_schema() -> None:
            probe = self._session_class(SCHEMA_PROBE_ID, engine=engine, create_tables=True)
            await probe.get_items()  # creates the tables first; reads nothing
            await engine.dispose()  # no pooled connection outlives this private loop

        _run_to_completion(create_schema)
        self._path, self._engine = path, engine

    def close(self) -> None:
        self._sessions.clear()
        engine, self._engine = self._engine, None
        if engine is not None:
            _run_to_completion(engine.dispose)

    def create_session(self, session_id: str) -> None:
        """Construct the session object on the shared engine; nothing is written."""
        self._sessions[session_id] = self._session_class(session_id, engine=self._opened())

    def _opened(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError(f"{self.name}: call open first")
        return self._engine


# --- google-adk -----------------------------------------------------------------------


class AdkDatabaseSessionPeer(_OnFile):
    """google-adk `DatabaseSessionService` on a `sqlite+aiosqlite:///` file URL (the form
    it requires: a plain `sqlite://` URL is refused as a synchronous driver).

    Sessions belong to one app and one user. `create_session` keeps the `Session` it
    returns and every `append_event` reuses it, as a runner does during an invocation: the
    service refreshes that object's storage revision marker on each commit, so it never
    goes stale while it is the only writer, and nothing forces a refetch (the object's
    `events` list grows in memory, as the API does). A message is an `Event` with text
    content. WAL: the service only sets `foreign_keys=ON`; we add a "connect" listener to
    its public `db_engine` (before any connection exists) that sets
    `PRAGMA journal_mode=WAL`. No batch append: `append_event` takes one event.
    """

    label = "google-adk DatabaseSessionService"
    distribution = "google-adk"
    app_name = "aisopod-bench"
    user_id = "bench-user"
    agent_name = "bench_agent"

    def __init__(self) -> None:
        from google.adk.events import Event
        from google.adk.sessions import DatabaseSessionService
        from google.adk.sessions.base_session_service import GetSessionConfig
        from google.genai import types
        from sqlalchemy import event

        self._service_class = DatabaseSessionService
        self._event_class = Event
        self._get_config = GetSessionConfig
        self._content, self._part = types.Content, types.Part
        self._listen = event.listen
        self.name = f"{self.label} {_version(self.distribution)}"
        self._path: Path | None = None
        self._service: DatabaseSessionService | None = None
        self._sessions: dict[str, AdkSession] = {}
        self._invocations: dict[str, str] = {}

    def open(self, path: Path) -> None:
        service = self._service_class(f"sqlite+aiosqlite:///{path.resolve()}")
        self._listen(service.db_engine.sync_engine, "connect", _wal_listener)

        async def create_schema() -> None:
            await service.prepare_tables()  # the documented eager form of the lazy set-up
            await service.db_engine.dispose()  # no pooled connection outlives this loop

        _run_to_completion(create_schema)
        self._path, self._service = path, service

    def close(self) -> None:
        self._sessions.clear()
        service, self._service = self._service, None
        if service is not None:
            _run_to_completion(service.close)  # disposes the engine the service owns

    async def create_session(self, session_id: str) -> None:
        session = await self._opened().create_session(
            app_name=self.app_name, user_id=self.user_id, session_id=session_id
        )
        self._sessions[session_id] = session

    async def append_one(self, session_id: str, role: str, content: str) -> None:
        session = _missing(self._sessions, session_id)
        await self._opened().append_event(session, self._event(session_id, role, content))

    def append_batch(self, session_id: str, messages: list[tuple[str, str]]) -> None:
        raise NotSupported("DatabaseSessionService.append_event takes one event per call")

    async def read_newest(self, session_id: str, limit: int) -> list[Any]:
        session = await self._opened().get_session(
            app_name=self.app_name,
            user_id=self.user_id,
            session_id=session_id,
            config=self._get_config(num_recent_events=limit),
        )
        if session is None:
            raise KeyError(f"no session {session_id!r}")
        events: list[Any] = session.events
        return events

    async def get_or_create(self, session_id: str) -> Any:
        """`get_session` without events (`num_recent_events=0`, the API's metadata-only
        read), then `create_session` if missing, as the runner's auto-create does. (A
        runner's default `get_session` loads every event.)"""
        service = self._opened()
        session = await service.get_session(
            app_name=self.app_name,
            user_id=self.user_id,
            session_id=session_id,
            config=self._get_config(num_recent_events=0),
        )
        if session is None:
            session = await service.create_session(
                app_name=self.app_name, user_id=self.user_id, session_id=session_id
            )
        return session

    async def list_sessions(self, limit: int) -> list[Any]:
        """`list_sessions(app_name, user_id)` returns every session of the user (no paging,
        no limit, oldest update first, without events); the newest `limit` are cut here."""
        response = await self._opened().list_sessions(app_name=self.app_name, user_id=self.user_id)
        sessions: list[Any] = response.sessions
        return sessions[::-1][: max(limit, 0)]

    def _event(self, session_id: str, role: str, content: str) -> Event:
        """An event as a runner records it: a user message starts a new invocation, which
        the agent's replies (role "model") and tool results (role "user", as ADK stores
        function responses) share. ADK has no system messages: they are the agent's."""
        _check_role(role)
        if role == "user" or session_id not in self._invocations:
            self._invocations[session_id] = f"e-{uuid.uuid4()}"
        author = "user" if role == "user" else self.agent_name
        content_role = "user" if role in ("user", "tool") else "model"
        return self._event_class(
            author=author,
            invocation_id=self._invocations[session_id],
            content=self._content(role=content_role, parts=[self._part(text=content)]),
        )

    def _opened(self) -> DatabaseSessionService:
        if self._service is None:
            raise RuntimeError(f"{self.name}: call open first")
        return self._service


# --- langchain-community --------------------------------------------------------------


class LangChainSQLHistoryPeer(_OnFile):
    """langchain-community `SQLChatMessageHistory` (sync API) on one shared SQLAlchemy
    Engine on a `sqlite:///` file, one history object per session id.

    WAL: the class takes an Engine as `connection`; ours has a "connect" listener that
    sets `PRAGMA journal_mode=WAL`. A session is only an id in the message table: no
    session object (`get_or_create`), no listing (`list_sessions`), and reads return the
    whole history (`read_newest`).
    """

    label = "langchain-community SQLChatMessageHistory"
    distribution = "langchain-community"

    def __init__(self) -> None:
        with warnings.catch_warnings():
            # 0.4 warns at import that the package is being sunset; it still works.
            warnings.simplefilter("ignore", DeprecationWarning)
            from langchain_community.chat_message_histories import SQLChatMessageHistory
        from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
        from sqlalchemy import create_engine, event

        self._history_class = SQLChatMessageHistory
        self._human, self._ai, self._system = HumanMessage, AIMessage, SystemMessage
        self._tool = ToolMessage
        self._create_engine = create_engine
        self._listen = event.listen
        self.name = f"{self.label} {_version(self.distribution)}"
        self._path: Path | None = None
        self._engine: Engine | None = None
        self._histories: dict[str, SQLChatMessageHistory] = {}

    def open(self, path: Path) -> None:
        engine = self._create_engine(f"sqlite:///{path.resolve()}")
        self._listen(engine, "connect", _wal_listener)
        # Constructing a history creates the table; a probe writes no rows.
        self._history_class(SCHEMA_PROBE_ID, connection=engine)
        self._path, self._engine = path, engine

    def close(self) -> None:
        self._histories.clear()
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose()

    def create_session(self, session_id: str) -> None:
        """Construct the history object (it checks the table); nothing is written."""
        self._histories[session_id] = self._history_class(session_id, connection=self._opened())

    def append_one(self, session_id: str, role: str, content: str) -> None:
        _missing(self._histories, session_id).add_message(self._message(role, content))

    def append_batch(self, session_id: str, messages: list[tuple[str, str]]) -> None:
        batch = [self._message(role, content) for role, content in messages]
        _missing(self._histories, session_id).add_messages(batch)

    def read_newest(self, session_id: str, limit: int) -> list[Any]:
        raise NotSupported("SQLChatMessageHistory only reads a session's whole history")

    def get_or_create(self, session_id: str) -> Any:
        raise NotSupported("SQLChatMessageHistory has no session object")

    def list_sessions(self, limit: int) -> list[Any]:
        raise NotSupported("SQLChatMessageHistory has no call that lists sessions")

    def _message(self, role: str, content: str) -> BaseMessage:
        if role == "user":
            return self._human(content=content)
        if role == "assistant":
            return self._ai(content=content)
        if role == "system":
            return self._system(content=content)
        _check_role(role)
        return self._tool(content=content, tool_call_id=TOOL_CALL_ID)

    def _opened(self) -> Engine:
        if self._engine is None:
            raise RuntimeError(f"{self.name}: call open first")
        return self._engine


# --- the same stores on PostgreSQL --------------------------------------------------


class OpenAISQLAlchemySessionServerPeer(OpenAISQLAlchemySessionPeer):
    """openai-agents `SQLAlchemySession` on a `postgresql+psycopg` AsyncEngine (psycopg's
    asyncio connection), one session object per id, as on SQLite."""

    def open_server(self, url: str) -> None:
        """Create the store's tables in the schema `url`'s search path names."""
        engine = self._create_engine(server_url(url))

        async def create_schema() -> None:
            probe = self._session_class(SCHEMA_PROBE_ID, engine=engine, create_tables=True)
            await probe.get_items()  # creates the tables first; reads nothing
            await engine.dispose()  # no pooled connection outlives this private loop

        _run_to_completion(create_schema)
        self._engine = engine


class AdkDatabaseSessionServerPeer(AdkDatabaseSessionPeer):
    """google-adk `DatabaseSessionService` on a `postgresql+psycopg` URL: SQLAlchemy picks
    psycopg's asyncio connection for it (ADK refuses synchronous drivers; its error
    message suggests asyncpg, which is not installed, and psycopg 3 is asynchronous
    too)."""

    def open_server(self, url: str) -> None:
        """Create the service's tables in the schema `url`'s search path names."""
        service = self._service_class(server_url(url))

        async def create_schema() -> None:
            await service.prepare_tables()
            await service.db_engine.dispose()  # no pooled connection outlives this loop

        _run_to_completion(create_schema)
        self._service = service


class LangChainSQLHistoryServerPeer(LangChainSQLHistoryPeer):
    """langchain-community `SQLChatMessageHistory` (sync API) on one SQLAlchemy Engine on
    `postgresql+psycopg`, one history object per session id, as on SQLite."""

    def open_server(self, url: str) -> None:
        """Create the message table in the schema `url`'s search path names."""
        engine = self._create_engine(server_url(url))
        self._history_class(SCHEMA_PROBE_ID, connection=engine)
        self._engine = engine


def server_url(url: str) -> str:
    """`url` (any PostgreSQL URL) on the psycopg 3 driver, which SQLAlchemy runs sync or
    asyncio as the engine asks."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


SERVER_PEERS: list[Callable[[], Any]] = [
    OpenAISQLAlchemySessionServerPeer,
    AdkDatabaseSessionServerPeer,
    LangChainSQLHistoryServerPeer,
]


# --- the list the driver loops over ---------------------------------------------------

PEERS: list[Callable[[], Peer]] = [
    OpenAISQLiteSessionPeer,
    OpenAISQLAlchemySessionPeer,
    AdkDatabaseSessionPeer,
    LangChainSQLHistoryPeer,
]


def available_peers() -> list[Peer]:
    """One instance of each peer whose package imports; the others are skipped with the
    reason printed on stderr."""
    return _instances(PEERS)


def available_server_peers() -> list[Any]:
    """One instance of each PostgreSQL peer whose package imports (`open_server`)."""
    return _instances(SERVER_PEERS)


def _instances(factories: list[Callable[[], Any]]) -> list[Any]:
    peers: list[Any] = []
    for factory in factories:
        try:
            peers.append(factory())
        except Exception as error:  # an import failure can be any exception
            label = getattr(factory, "label", getattr(factory, "__name__", repr(factory)))
            print(f"skipping {label}: {type(error).__name__}: {error}", file=sys.stderr)
    return peers
