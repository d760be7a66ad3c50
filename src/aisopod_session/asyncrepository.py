"""`AsyncSessionRepository`: `SessionRepository`'s calls as coroutines, derived from it
method by method (`_reads` and `_writes` below), so the two cannot drift apart: each
coroutine runs its twin's very code on a worker thread (see `asyncbridge.py`) and has
its twin's signature and docstring."""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator, Mapping
from datetime import datetime
from functools import partial
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from aisopod_session.asyncbridge import bridge_of, write_gate
from aisopod_session.database import companion_engines
from aisopod_session.enums import SessionStatus
from aisopod_session.keys import SessionKey
from aisopod_session.models import Message, NewMessage, Session, SessionFilter
from aisopod_session.repository import SessionRepository, messages_of_history
from aisopod_session.transactions import prepare_engine

_P = ParamSpec("_P")
_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

_AsyncMethod = Callable[Concatenate["AsyncSessionRepository", _P], Coroutine[Any, Any, _T]]


_Inline = Callable[..., bool]
"""Whether a call with these arguments is short enough to run inline (`asyncbridge`)."""


def _never(*args: Any, **kwargs: Any) -> bool:
    return False


def _always(*args: Any, **kwargs: Any) -> bool:
    return True


INLINE_MESSAGES = 64
"""The most messages an inline `append_messages` writes, or an inline `get_history` reads."""
INLINE_TEXT = 64 * 1024
"""The most characters of text (content, tool calls, metadata) an inline write carries."""
_INLINE_NODES = 4096


def fits_inline(*values: Any) -> bool:
    """Whether `values` (JSON values, messages) hold at most `INLINE_TEXT` characters of
    text and `_INLINE_NODES` values in all; stops looking as soon as they do not."""
    room = [INLINE_TEXT, _INLINE_NODES]
    stack = list(values)
    while stack:
        item = stack.pop()
        room[1] -= 1
        if room[1] < 0:
            return False
        if isinstance(item, str):
            room[0] -= len(item)
            if room[0] < 0:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, NewMessage):
            stack.extend((item.content, item.tool_calls, item.meta))
        elif type(item) not in _SCALARS and isinstance(item, Mapping):
            # A message given as another mapping (`as_new_messages` takes any).
            stack.extend(item.keys())
            stack.extend(item.values())
    return True


_SCALARS = frozenset({int, float, bool, type(None)})


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    """An argument given by position (`index`, after the key) or by `name`."""
    return args[index] if len(args) > index else kwargs.get(name)


def _small_message(*args: Any, **kwargs: Any) -> bool:
    return fits_inline(
        _argument(args, kwargs, 2, "content"), kwargs.get("tool_calls"), kwargs.get("meta")
    )


def _few_messages(*args: Any, **kwargs: Any) -> bool:
    given = _argument(args, kwargs, 1, "messages")
    return isinstance(given, list | tuple) and len(given) <= INLINE_MESSAGES and fits_inline(given)


def _small_changes(*args: Any, **kwargs: Any) -> bool:
    return fits_inline(_argument(args, kwargs, 1, "changes"))


def _small_meta(*args: Any, **kwargs: Any) -> bool:
    return fits_inline(kwargs.get("meta"))


def _few_keys(*args: Any, **kwargs: Any) -> bool:
    keys = _argument(args, kwargs, 0, "keys")
    return isinstance(keys, list | tuple) and len(keys) <= 8


def _small_changeset(*args: Any, **kwargs: Any) -> bool:
    messages = kwargs.get("messages", ())
    related = kwargs.get("related_meta") or {}
    return (
        isinstance(messages, list | tuple)
        and len(messages) <= INLINE_MESSAGES
        and isinstance(related, dict)
        and len(related) <= 8
        and fits_inline(messages, kwargs.get("meta"), list(related.values()))
    )


def _limit_at_most_inline(default: int | None) -> _Inline:
    """Inline when the call's `limit` (`default` if not given) is an int of at most
    `INLINE_MESSAGES` rows."""

    def small(*args: Any, **kwargs: Any) -> bool:
        limit = kwargs.get("limit", default)
        return type(limit) is int and 0 <= limit <= INLINE_MESSAGES

    return small


_a_page = _limit_at_most_inline(None)  # get_history: all messages without a limit
_few_sessions = _limit_at_most_inline(100)  # list_sessions' default limit
_a_sessions_page = _limit_at_most_inline(50)  # page_sessions' default limit


def _reads(
    method: Callable[Concatenate[SessionRepository, _P], _T], inline: _Inline = _never
) -> _AsyncMethod[_P, _T]:
    """The coroutine twin of a `SessionRepository` method that only reads; `inline` says
    which calls may run on the event loop itself."""

    async def twin(self: AsyncSessionRepository, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await self._bridge.run(
            partial(method, self._sync, *args, **kwargs), self._inline(method, inline, args, kwargs)
        )

    return _named_after(twin, method)


def _writes(
    method: Callable[Concatenate[SessionRepository, _P], _T], inline: _Inline = _never
) -> _AsyncMethod[_P, _T]:
    """The coroutine twin of a `SessionRepository` method that writes: through the write
    gate (`AsyncSessionRepository._write`)."""

    async def twin(self: AsyncSessionRepository, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await self._write(
            partial(method, self._sync, *args, **kwargs), self._inline(method, inline, args, kwargs)
        )

    return _named_after(twin, method)


def _named_after(twin: _F, method: Callable[..., Any]) -> _F:
    """`twin` with `method`'s name, signature (`__wrapped__`) and docstring."""
    functools.update_wrapper(twin, method)
    twin.__qualname__ = f"AsyncSessionRepository.{method.__name__}"
    twin.__module__ = __name__
    twin.__doc__ = f"`SessionRepository.{method.__name__}`, awaited.\n\n{method.__doc__ or ''}"
    return twin


class AsyncSessionRepository:
    """`SessionRepository` for asyncio: the same methods with the same names, arguments,
    results, errors and guarantees, as coroutines. Wrap an engine from
    `open_async_database` and share the repository between tasks.

    Every method runs the very code of its `SessionRepository` twin (no query, rule or
    error mapping is written twice) on one of a few worker threads, over a synchronous
    engine on the same database (`asyncbridge.py`): the event loop never waits for the
    database, and the SQLite write lock is never held across event-loop turns. On a
    SQLite file, short calls run on the loop itself instead, never waiting for a lock and
    within a budget per turn of the loop (inline calls); this event loop's writers take
    turns on a write gate first.

    Cancelling a call: one not yet started never runs; one running finishes on its
    thread, rolling back if the cancellation reached it before its COMMIT (all or
    nothing, as always); `prune` stops after the batch in progress.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        """Wrap an engine from `open_async_database` (another `AsyncEngine` is prepared
        like `SessionRepository` prepares one, but its schema must be migrated)."""
        if not isinstance(engine, AsyncEngine):
            raise TypeError(
                f"engine: AsyncSessionRepository needs an AsyncEngine (from "
                f"open_async_database), not {type(engine).__name__}; a synchronous engine "
                "goes with SessionRepository"
            )
        prepare_engine(engine.sync_engine)  # the application's own connections
        self.engine = engine
        self._bridge = bridge_of(engine, companion_engines)
        self._sync = SessionRepository(self._bridge.engine)
        inline = self._bridge.inline
        self._inline_sync = None if inline is None else SessionRepository(inline)

    def __await__(self) -> Generator[Any, None, AsyncSessionRepository]:
        """Awaiting a repository gives it back, so `await repo.for_agent(...)` works as
        well as the plain call (for code that awaits every call of the async API)."""
        return self._itself().__await__()

    async def _itself(self) -> AsyncSessionRepository:
        return self

    def _inline(
        self, method: Callable[..., _T], inline: _Inline, args: Any, kwargs: Any
    ) -> Callable[[], _T] | None:
        """The call on the inline engine, if the store has one and `inline` allows it."""
        if self._inline_sync is None or not inline(*args, **kwargs):
            return None
        return partial(method, self._inline_sync, *args, **kwargs)

    async def _write(self, call: Callable[[], _T], inline: Callable[[], _T] | None = None) -> _T:
        """Run a call that writes. On SQLite, this event loop's writers take turns on the
        store's write gate first: SQLite lets one writer in at a time anyway, and a
        writer that waits here costs nothing, while one that waits in SQLite's busy
        handler holds a worker thread, polling."""
        gate = write_gate(self._bridge)
        if gate is None:
            return await self._bridge.run(call, inline, writes=True)
        async with gate:
            return await self._bridge.run(call, inline, writes=True)

    @property
    def agent_id(self) -> str | None:
        """The agent this repository is confined to, or None for the admin view."""
        return self._sync.agent_id

    def for_agent(self, agent_id: str) -> AsyncSessionRepository:
        """`SessionRepository.for_agent`: a repository on the same engine confined to
        `agent_id`'s sessions. It does no I/O, so it is a plain method (awaiting its
        result works too)."""
        scoped = copy.copy(self)
        scoped._sync = self._sync.for_agent(agent_id)
        if self._inline_sync is not None:
            scoped._inline_sync = self._inline_sync.for_agent(agent_id)
        return scoped

    async def get_or_create(self, key: SessionKey | str) -> Session:
        """`SessionRepository.get_or_create`, awaited. An existing session is read
        without waiting for the write gate (see `_write`)."""
        found = await self._bridge.run(
            partial(self._sync.get, key), self._inline(SessionRepository.get, _always, (key,), {})
        )
        if found is not None:
            return found
        return await self._write(
            partial(self._sync.get_or_create, key),
            self._inline(SessionRepository.get_or_create, _always, (key,), {}),
        )

    async def get_history(
        self,
        key: SessionKey | str,
        *,
        limit: int | None = None,
        before_id: int | None = None,
        after_id: int | None = None,
    ) -> list[Message]:
        """`SessionRepository.get_history`, awaited. A page (`limit` of at most
        `INLINE_MESSAGES`) is read inline; if its rows hold more than `INLINE_TEXT`
        characters of text, they are decoded on a worker thread, not on the loop."""
        read = partial(
            SessionRepository._get_history_rows,
            key=key,
            limit=limit,
            before_id=before_id,
            after_id=after_id,
        )
        if self._inline_sync is None or not _a_page(limit=limit):
            return await self._bridge.run(
                partial(
                    self._sync.get_history, key, limit=limit, before_id=before_id, after_id=after_id
                )
            )
        rows = await self._bridge.run(partial(read, self._sync), partial(read, self._inline_sync))
        if rows.text_size() <= INLINE_TEXT:
            return messages_of_history(rows)
        return await self._bridge.run(partial(messages_of_history, rows))

    get_history.__doc__ = f"{get_history.__doc__}\n\n{SessionRepository.get_history.__doc__}"

    async def pop_message(self, key: SessionKey | str) -> Message | None:
        """`SessionRepository.pop_message`, awaited. It runs inline; a message holding
        more than `INLINE_TEXT` characters of text is not decoded on the loop: that call
        rolls back, having written nothing, and the pop runs on a worker thread."""
        inline = None
        if self._inline_sync is not None:
            inline = partial(self._inline_sync._pop_message, key, text_limit=INLINE_TEXT)
        return await self._write(partial(self._sync.pop_message, key), inline)

    pop_message.__doc__ = f"{pop_message.__doc__}\n\n{SessionRepository.pop_message.__doc__}"

    # Each method of SessionRepository, and which of its calls may run inline (on a
    # SQLite file: see asyncbridge.py); the rest always go to a worker thread.
    create = _writes(SessionRepository.create, _small_meta)
    get = _reads(SessionRepository.get, _always)
    get_by_id = _reads(SessionRepository.get_by_id, _always)
    get_many = _reads(SessionRepository.get_many, _few_keys)
    list_sessions = _reads(SessionRepository.list_sessions, _few_sessions)
    count_sessions = _reads(SessionRepository.count_sessions)
    page_sessions = _reads(SessionRepository.page_sessions, _a_sessions_page)
    search_messages = _reads(SessionRepository.search_messages)
    summary = _reads(SessionRepository.summary)
    get_history_text = _reads(SessionRepository.get_history_text, _a_page)
    now = _reads(SessionRepository.now, _always)
    update_metadata = _writes(SessionRepository.update_metadata, _small_changes)
    set_status = _writes(SessionRepository.set_status, _always)
    delete = _writes(SessionRepository.delete)
    fork = _writes(SessionRepository.fork)
    append_messages = _writes(SessionRepository.append_messages, _few_messages)
    append_message = _writes(SessionRepository.append_message, _small_message)
    # Never inline: it deletes every message of the session first, however many.
    replace_messages = _writes(SessionRepository.replace_messages)
    apply_changes = _writes(SessionRepository.apply_changes, _small_changeset)
    compact = _writes(SessionRepository.compact)
    reset = _writes(SessionRepository.reset)
    mark_idle = _writes(SessionRepository.mark_idle)

    async def prune(
        self,
        *,
        updated_before: datetime,
        status: SessionStatus | str | None = None,
        filter: SessionFilter | Mapping[str, Any] | None = None,
        dry_run: bool = False,
        on_batch: Callable[[int], object] | None = None,
    ) -> int:
        """`SessionRepository.prune`, awaited: the same checks and batches, each batch
        one call through the write gate. `on_batch` is called between batches in the
        caller's task, and may be a coroutine function (it is awaited before the next
        batch). Cancelled, it stops after the batch in progress."""
        if dry_run:
            count = partial(
                self._sync.prune,
                updated_before=updated_before,
                status=status,
                filter=filter,
                dry_run=True,
            )
            return await self._bridge.run(count)
        deleted = 0
        batches = self.prune_batches(updated_before=updated_before, status=status, filter=filter)
        async for deleted in batches:
            if on_batch is not None:
                result = on_batch(deleted)
                if inspect.isawaitable(result):
                    await result
        return deleted

    def prune_batches(
        self,
        *,
        updated_before: datetime,
        status: SessionStatus | str | None = None,
        filter: SessionFilter | Mapping[str, Any] | None = None,
    ) -> AsyncIterator[int]:
        """`SessionRepository.prune_batches` for `async for`: the arguments are checked
        when this is called, and each step runs one batch on a worker thread, through the
        write gate. Cancelled, it stops after the batch in progress."""
        return self._batches(
            self._sync.prune_batches(updated_before=updated_before, status=status, filter=filter)
        )

    async def _batches(self, batches: Iterator[int]) -> AsyncIterator[int]:
        # Each batch runs on a worker thread, through the write gate, advancing `batches`.
        while (done := await self._write(partial(next, batches, None))) is not None:
            yield done
            # Let this loop's other writers, waiting on the gate, go before the next batch.
            await asyncio.sleep(0)
