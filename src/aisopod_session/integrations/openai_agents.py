"""`AisopodSession`: the OpenAI Agents SDK's `Session` protocol on the session store, so
`Runner.run(agent, input, session=AisopodSession(...))` keeps its history there.

Each item the SDK hands over (a message, a function call, its output, a reasoning
item, ...) is one message row: its text-bearing field (see `CONTENT_FIELDS`) is the row's
`content`, so `sessions show` prints it and `search_messages` finds it; the rest of the
item, its type and that field's name and position are in the row's metadata, from which
the item is rebuilt exactly (docs/integrations.md has the mapping). Needs the extra
`aisopod-session[openai-agents]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from agents.memory.session_settings import SessionSettings
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from aisopod_session.asyncrepository import (
    INLINE_MESSAGES,
    INLINE_TEXT,
    AsyncSessionRepository,
    fits_inline,
)
from aisopod_session.database import open_async_database_sync
from aisopod_session.enums import PeerKind, Role
from aisopod_session.errors import HistoryChangedError, SessionNotFoundError
from aisopod_session.keys import SessionKey
from aisopod_session.models import Message, NewMessage
from aisopod_session.repository import SessionRepository
from aisopod_session.validation import check_json, first_nul

if TYPE_CHECKING:
    from agents.items import TResponseInputItem
    from sqlalchemy.ext.asyncio import AsyncEngine

_T = TypeVar("_T")

DEFAULT_AGENT = "openai-agents"
"""The key's agent for a session id, unless the repository is confined to another."""
DEFAULT_CHANNEL = "agents-sdk"
DEFAULT_ACCOUNT = "default"
DEFAULT_PEER_KIND = PeerKind.THREAD
"""`default_key(session_id)` is `openai-agents:agents-sdk:default:thread:<session_id>`."""

SOURCE = "openai-agents"
"""The `source` of the metadata of every message this adapter writes."""

CONTENT_FIELDS = ("content", "output", "summary", "arguments")
"""The item field stored as the message's `content`: the first of these the item has
with a value other than null, `[]` or `""` (else the first it has at all): a message's
`content`, a tool call output's `output`, a reasoning item's `summary`, a function call's
`arguments`. An item with none of them has `None` content."""


class SessionInputError(ValueError, TypeError):
    """Input the adapter refuses (an item, the settings), before anything is written: a
    `ValueError` naming the field, as every refusal of this library is, and a `TypeError`,
    as the SDK's own `SQLiteSession` raises for the same input, so code written against
    either catches it."""


_ROLES = {role.value: role for role in (Role.USER, Role.ASSISTANT, Role.SYSTEM, Role.DEVELOPER)}


def default_key(session_id: str, agent_id: str = DEFAULT_AGENT) -> SessionKey:
    """The store key of an SDK session id: agent `agent_id`, channel `agents-sdk`,
    account `default`, a `thread` whose peer id is `session_id` (`ValueError` naming
    `session_id` for an id the key cannot hold exactly: empty, with spaces at either
    end, control characters, over 255 characters)."""
    if not isinstance(session_id, str):
        raise ValueError(f"session_id: must be a string, not {type(session_id).__name__}")
    if session_id != session_id.strip():
        raise ValueError(f"session_id: must not start or end with spaces, got {session_id!r}")
    try:
        return SessionKey(agent_id, DEFAULT_CHANNEL, DEFAULT_ACCOUNT, DEFAULT_PEER_KIND, session_id)
    except ValueError as exc:
        raise ValueError(f"session_id: {exc}") from None


def item_to_message(item: Mapping[str, Any], at: str = "item") -> NewMessage:
    """The message row of one SDK item (see the module's docstring); `ValueError` naming
    the field for an item that is not a JSON object or holds a value the store refuses,
    with its place in the item from `at` (the item's own name in the message) on."""
    if not isinstance(item, Mapping):
        raise ValueError(f"items: each item must be a dict, not {type(item).__name__}")
    names = list(item)
    present = [name for name in CONTENT_FIELDS if name in item]
    # A reasoning item may carry `"content": null` (or `[]`) beside its summary: the text
    # is the first field that holds something.
    field = next((name for name in present if item[name] not in (None, [], "")), None)
    if field is None and present:
        field = present[0]
    kind = item.get("type", "message")
    if not isinstance(kind, str):
        kind = "message"
    meta: dict[str, Any] = {
        "source": SOURCE,
        "item_type": kind,
        "item": {name: value for name, value in item.items() if name != field},
    }
    # Left out in the common case (a message's `content`, its last field), so that a
    # chat's rows stay small: the metadata is decoded with every row read. An item
    # without any of the fields says so with null.
    if field != "content":
        meta["content_field"] = field
    if field is not None and names.index(field) != len(names) - 1:
        meta["content_index"] = names.index(field)
    role = item.get("role")
    if isinstance(role, str) and role in _ROLES:
        stored_role = _ROLES[role]
    elif kind.endswith("_output"):
        stored_role = Role.TOOL
    else:
        stored_role = Role.ASSISTANT
    content = item[field] if field is not None else None
    try:
        return NewMessage(stored_role, content, meta=meta)
    except ValueError:
        # Refused: say where in the item, not where in the row (its text is the row's
        # content; the rest sits in the metadata under `item`, two levels down).
        if field is not None:
            check_json(at, content, f"{at}.{field}")
        check_json(at, meta["item"], at, depth=2)
        raise  # pragma: no cover - the same checks refused it above


def _nul_in_items(items: Sequence[Any], index: int) -> str:
    """Why PostgreSQL refuses `items[index]`: the place of its first NUL character."""
    path = first_nul(dict(items[index]))
    return (
        f"items[{index}]: the text at items[{index}]{path or ''} holds a NUL character "
        "(in a key or a value), which PostgreSQL cannot store (SQLite can)"
    )


def message_to_item(message: Message) -> dict[str, Any]:
    """The SDK item a message row holds: rebuilt exactly from what `item_to_message`
    stored; a message another writer appended under the key (no such metadata) as an
    easy input message, `{"role": ..., "content": ...}`."""
    return _assemble(_layout(message.meta), message.role, message.content)


_Layout = tuple[dict[str, Any], str, dict[str, Any]] | dict[str, Any] | None
"""How an item is rebuilt from its row (`_layout`)."""


def _layout(meta: Mapping[str, Any]) -> _Layout:
    """How a row's metadata rebuilds its item: `(before, field, after)`, the rest of the
    item around its content's field; the rest alone, for an item stored without a
    content field; or None for a message another writer appended (its role and
    content are the item)."""
    rest = meta.get("item") if meta.get("source") == SOURCE else None
    if not isinstance(rest, dict):
        return None
    field = meta.get("content_field", "content")
    if not isinstance(field, str):
        return rest
    index = meta.get("content_index")
    if not isinstance(index, int) or not 0 <= index <= len(rest):
        return rest, field, {}
    pairs = list(rest.items())
    # A field the rest holds too keeps its first place and takes the last value, as
    # `dict` of the pairs with the content inserted at `index` does.
    return dict(pairs[:index]), field, dict(pairs[index:])


def _assemble(layout: _Layout, role: Any, content: Any) -> dict[str, Any]:
    """A new item from its layout and its row's role and content, read (the rest's
    values are shared with `layout`, not copied)."""
    if layout is None:
        return {"role": str(role), "content": content}
    if isinstance(layout, dict):
        return dict(layout)
    before, field, after = layout
    return {**before, field: content, **after}


# The readers of the `messages` columns, so stored cells read here exactly as they read
# in a `Message` (leniently: see models.py).
_COLUMNS = cast(Any, Message).__table__.c
_read_role: Callable[[Any], Any] = _COLUMNS.role.type.read
_read_content: Callable[[Any], Any] = _COLUMNS.content.type.read
_read_meta: Callable[[Any], Any] = _COLUMNS.metadata.type.read
_SCALARS = (str, int, float, bool, type(None))
_UNKNOWN: Any = object()


def items_of_rows(rows: list[tuple[Any, Any, Any]]) -> list[dict[str, Any]]:
    """The items of `SessionRepository.get_history_text` rows, exactly as
    `message_to_item` rebuilds them from the rows' `Message` objects, each a new dict.

    The rows of one session share a few metadata texts (every user turn's is the
    same): a text whose layout holds only strings, numbers, booleans and nulls (nothing
    a caller could change in one item and see in another) is decoded once per call and
    its layout used for each of its rows, half the cost of reading a history of short
    messages; any other text is decoded row by row."""
    layouts: dict[str, _Layout] = {}
    items = []
    for role, content, meta_text in rows:
        cached = type(meta_text) is str
        layout = layouts.get(meta_text, _UNKNOWN) if cached else _UNKNOWN
        if layout is _UNKNOWN:
            layout = _layout(_read_meta(meta_text))
            if cached and _shareable(layout):
                layouts[meta_text] = layout
        if type(layout) is tuple:  # the common case, without a call
            before, field, after = layout
            items.append({**before, field: _read_content(content), **after})
        else:
            items.append(_assemble(layout, _read_role(role), _read_content(content)))
    return items


def _shareable(layout: _Layout) -> bool:
    """Whether items built from one `layout` share nothing a caller could change."""
    parts = (
        [layout] if isinstance(layout, dict) else [] if layout is None else [layout[0], layout[2]]
    )
    return all(isinstance(value, _SCALARS) for part in parts for value in part.values())


def _decoded_inline(rows: list[tuple[Any, Any, Any]]) -> bool:
    """Whether `rows` are few and small enough to decode on the event loop: what the
    async repository would read inline (`INLINE_MESSAGES` rows, `INLINE_TEXT`
    characters of text)."""
    if len(rows) > INLINE_MESSAGES:
        return False
    try:
        size = sum([len(content) + len(meta) for _, content, meta in rows])
    except TypeError:  # a cell plain SQL stored as a number: only text counts
        size = sum(
            len(cell) for _, *cells in rows for cell in cells if isinstance(cell, str | bytes)
        )
    return size <= INLINE_TEXT


def _read_items(
    repository: SessionRepository, key: SessionKey, limit: int | None
) -> list[dict[str, Any]]:
    return items_of_rows(repository.get_history_text(key, limit=limit))


class _PruneFailedError(Exception):
    """The SDK's `prune_prefix` raised (its exception is the cause): told apart from the
    store's refusal of an item, which `_stored` reports as a `SessionInputError`."""


@dataclasses.dataclass(frozen=True)
class CompactionSnapshot:
    """What `AisopodSession._get_compaction_snapshot` gives the SDK's compaction: the
    attributes of the SDK's own snapshot (`agents.memory.session._CompactionSnapshot`,
    internal to the SDK, so not imported): the newest items, oldest first, whether they
    are every item of the session, and the call that replaces the items from an index
    on, atomically, if they are still the session's newest."""

    items: list[TResponseInputItem]
    complete: bool
    replace_suffix: Callable[[int, list[TResponseInputItem]], Awaitable[bool]]


class AisopodSession:
    """An OpenAI Agents SDK `Session` whose items live in the session store.

    `repository` is a `SessionRepository` (its calls run on a worker thread, off the
    event loop) or an `AsyncSessionRepository` (faster: short calls run inline); a
    confined one works, and gives the default key its agent. `key` overrides the default
    key of `session_id` (`default_key`), so a gateway can keep the SDK's items under its
    own chat key. Every method is one repository call (`add_items` two when it creates the
    session), atomic as those are. Share the store between sessions, threads and event
    loops freely.
    """

    session_id: str
    session_settings: SessionSettings | None

    def __init__(
        self,
        session_id: str,
        repository: SessionRepository | AsyncSessionRepository,
        *,
        key: SessionKey | str | None = None,
        session_settings: SessionSettings | Mapping[str, Any] | None = None,
    ) -> None:
        """Bind `session_id` to its key in `repository`; `ValueError` naming
        `session_id` or `key` if one is invalid, `SessionInputError` naming
        `session_settings` (an unknown field, as the SDK's `TypeError` says), `TypeError`
        naming `repository` if it is not a repository. No I/O."""
        if not isinstance(repository, SessionRepository | AsyncSessionRepository):
            raise TypeError(
                "repository: must be a SessionRepository or an AsyncSessionRepository, "
                f"not {type(repository).__name__}"
            )
        if key is None:
            self.key = default_key(session_id, repository.agent_id or DEFAULT_AGENT)
        else:
            if not isinstance(session_id, str):
                raise ValueError(f"session_id: must be a string, got {session_id!r}")
            try:
                self.key = key if isinstance(key, SessionKey) else SessionKey.parse(key)
            except ValueError as exc:
                raise ValueError(f"key: {exc}") from None
        self.session_id = session_id
        self.session_settings = _settings(session_settings)
        self.repository = repository
        self._engine: Engine | AsyncEngine | None = None
        self._closed = False

    @classmethod
    def open(
        cls,
        session_id: str,
        target: str | os.PathLike[str] | URL,
        *,
        key: SessionKey | str | None = None,
        session_settings: SessionSettings | Mapping[str, Any] | None = None,
    ) -> AisopodSession:
        """A session on a store of its own at `target` (a SQLite path or a database URL,
        as `open_database` takes), opened and migrated now, in the calling thread, and
        closed by `close()`. For many sessions, open the store once and pass its
        repository instead."""
        engine = open_async_database_sync(target)
        try:
            session = cls(
                session_id,
                AsyncSessionRepository(engine),
                key=key,
                session_settings=session_settings,
            )
        except BaseException:
            engine.sync_engine.dispose(close=False)
            raise
        session._engine = engine
        return session

    def close(self) -> None:
        """Close the store `open` opened (a repository passed in is left open: it is its
        owner's); later calls raise `RuntimeError`. Closing twice is harmless."""
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is None:
            return
        if isinstance(engine, Engine):
            engine.dispose()
        else:
            # The AsyncEngine's own pool is never used (the repository's calls run on its
            # companion engines, which this disposes of): nothing to close on a loop.
            engine.sync_engine.dispose(close=False)

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise RuntimeError("AisopodSession is closed")
        method = getattr(self.repository, name)
        if isinstance(self.repository, AsyncSessionRepository):
            return await cast(Callable[..., Awaitable[Any]], method)(*args, **kwargs)
        return await asyncio.to_thread(method, *args, **kwargs)

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The latest `limit` items (or `session_settings.limit`; all if both are None) in
        chronological order; none for a session never written. One read."""
        if limit is None and self.session_settings is not None:
            limit = self.session_settings.limit
        _check_limit("limit", limit)
        if self._closed:
            raise RuntimeError("AisopodSession is closed")
        repository = self.repository
        try:
            if not isinstance(repository, AsyncSessionRepository):
                items = await asyncio.to_thread(_read_items, repository, self.key, limit)
            else:
                rows = await repository.get_history_text(self.key, limit=limit)
                # Decoding a long or large history would hold the event loop: it goes to
                # a thread, as the async repository's own long reads do.
                if _decoded_inline(rows):
                    items = items_of_rows(rows)
                else:
                    items = await asyncio.to_thread(items_of_rows, rows)
        except SessionNotFoundError:
            return []
        return cast("list[TResponseInputItem]", items)

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append `items` in order, in one write transaction (the session is created
        first, in its own, if there is none). Every item is checked before anything is
        written (`SessionInputError`, a `ValueError` and a `TypeError`, naming `items[i]`
        and the field)."""
        messages = await self._checked(items)
        if messages:
            await self._stored("append_messages", items, messages)

    async def _atomic_replace_items(self, items: list[TResponseInputItem]) -> bool:
        """The SDK's hook for rewriting a whole history, which its compaction
        (`OpenAIResponsesCompactionSession`, manual `run_compaction()` and automatic runs
        that read the whole history) looks up on the session's class: without it, the
        SDK clears the session, then adds the compacted items, and a process that dies
        in between leaves the history empty. Here `items` become the session's items in
        one write transaction (`SessionRepository.replace_messages`), checked as
        `add_items` checks them; True when done. False, so that the SDK replaces the
        items its own way through `clear_session` and `add_items`, for a subclass that
        overrides `add_items` or `get_items` (its own handling of items must not be
        bypassed)."""
        if not self._replaces_its_own_items():
            return False
        messages = await self._checked(items)
        if messages:
            await self._stored("replace_messages", items, messages)
            return True
        # Nothing stored and nothing to store: no session is made for it.
        with contextlib.suppress(SessionNotFoundError):
            await self._call("replace_messages", self.key, messages)
        return True

    async def _checked(self, items: Any) -> list[NewMessage]:
        """`_messages(items)`: on the event loop for what the async repository would
        write there (`INLINE_MESSAGES` items, `INLINE_TEXT` characters of text), else on
        a worker thread (checking walks every value of every item)."""
        if not isinstance(items, list | tuple) or (
            len(items) <= INLINE_MESSAGES and fits_inline(items)
        ):
            return self._messages(items)
        return await asyncio.to_thread(self._messages, items)

    def _messages(self, items: Any) -> list[NewMessage]:
        """The message rows of `items`, each checked (`SessionInputError` naming
        `items[i]` and the field); `RuntimeError` once the session is closed."""
        if self._closed:
            raise RuntimeError("AisopodSession is closed")
        if not isinstance(items, list | tuple):
            raise SessionInputError(f"items: must be a list of items, not {type(items).__name__}")
        messages = []
        for index, item in enumerate(items):
            at = f"items[{index}]"
            try:
                messages.append(item_to_message(cast(Mapping[str, Any], item), at))
            except ValueError as exc:
                reason = str(exc)
                raise SessionInputError(
                    reason if reason.startswith(at) else f"{at}: {reason}"
                ) from None
        return messages

    async def _stored(
        self,
        method: str,
        items: Sequence[Any],
        messages: list[NewMessage],
        *,
        create: bool = True,
        **options: Any,
    ) -> None:
        """`append_messages` or `replace_messages` of `messages` (the rows of `items`)
        under the key, the session created first (in its own write transaction) if
        there is none and `create` says so. What only the store can refuse is a
        `SessionInputError` naming the item."""
        try:
            try:
                await self._call(method, self.key, messages, **options)
            except SessionNotFoundError:
                if not create:
                    raise
                await self._call("get_or_create", self.key)
                await self._call(method, self.key, messages, **options)
        except ValueError as exc:
            # What only the store can refuse (a NUL character on PostgreSQL), before it
            # writes anything, names `messages[i]` (`items[i]` here), or no index for one.
            reason = str(exc)
            index = re.match(r"messages\[(\d+)\]", reason)
            if "NUL character" in reason and (index or len(items) == 1):
                reason = _nul_in_items(items, int(index[1]) if index else 0)
            elif index:
                reason = "items[" + reason.removeprefix("messages[")
            elif len(messages) == 1:
                reason = f"items[0].{reason}"
            raise SessionInputError(reason) from None

    async def _get_compaction_snapshot(
        self, limit: int, *, prune_prefix: Callable[[Any], bool] | None = None
    ) -> CompactionSnapshot | None:
        """The SDK's hook for compacting the newest part of a history, which its
        automatic compaction (`OpenAIResponsesCompactionSession` under `Runner`) looks up
        on the session: the newest `limit` items, whether they are all the session holds,
        and `replace_suffix(start, items)`, which replaces the items from `start` on
        with `items` in one write transaction if they are still the session's newest
        messages as read (`SessionRepository.replace_messages(..., replacing=...)`), and
        else writes nothing and returns False, so that items written meanwhile are never
        lost. One read. `prune_prefix(item)` (the SDK's `EncryptedSession` passes it) is
        asked about the oldest items in that write transaction, from the first on, and
        those it calls expired go too, up to the first it keeps
        (`replace_messages(..., expired=...)`). None, so that the SDK goes through
        `add_items` and `get_items`, for a subclass that overrides them."""
        if not self._replaces_its_own_items():
            return None
        if type(limit) is not int or limit < 1:
            return None
        try:
            # One more than asked: whether there is anything older, in the same read.
            messages: list[Message] = await self._call("get_history", self.key, limit=limit + 1)
        except SessionNotFoundError:
            messages = []
        complete = len(messages) <= limit
        messages = messages[-limit:]
        items = [message_to_item(message) for message in messages]

        async def replace_suffix(start: int, output: list[TResponseInputItem]) -> bool:
            replacing = messages[start:] if type(start) is int and start >= 0 else []
            if not replacing:
                return False
            expired = None
            if prune_prefix is not None:
                prune = prune_prefix

                def expired(message: Message) -> bool:
                    try:
                        return bool(prune(message_to_item(message)))
                    except Exception as exc:
                        raise _PruneFailedError from exc  # not a refused item: see below

            try:
                await self._stored(
                    "replace_messages",
                    output,
                    await self._checked(output),
                    create=False,
                    replacing=replacing,
                    expired=expired,
                )
            except (HistoryChangedError, SessionNotFoundError):
                return False
            except _PruneFailedError as failed:
                raise cast(Exception, failed.__cause__) from None  # the SDK's own error
            return True

        return CompactionSnapshot(cast("list[TResponseInputItem]", items), complete, replace_suffix)

    def _replaces_its_own_items(self) -> bool:
        """Whether the SDK's compaction hooks may write here directly: not for a subclass
        that overrides `add_items` or `get_items` (its own handling of items must not be
        bypassed)."""
        own = type(self)
        return own.add_items is AisopodSession.add_items and (
            own.get_items is AisopodSession.get_items
        )

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the latest item (`SessionRepository.pop_message`), or None if
        there is none. Concurrent pops never return one item twice."""
        try:
            message: Message | None = await self._call("pop_message", self.key)
        except SessionNotFoundError:
            return None
        return None if message is None else cast("TResponseInputItem", message_to_item(message))

    async def clear_session(self) -> None:
        """Remove every item, in one write transaction (`SessionRepository.reset`: the
        session row, its metadata and its id stay, its counters return to 0)."""
        try:
            await self._call("reset", self.key)
        except SessionNotFoundError:
            return


def _check_limit(field: str, limit: Any) -> None:
    """`SessionInputError` naming `field` unless `limit` is None or an int from 0 to
    2**63 - 1 (what the store's history takes)."""
    if limit is not None and (type(limit) is not int or not 0 <= limit < 2**63):
        raise SessionInputError(f"{field}: must be an int >= 0 (64-bit) or None, got {limit!r}")


def _settings(value: SessionSettings | Mapping[str, Any] | None) -> SessionSettings:
    """`SessionSettings` from itself, a mapping of its fields, or None (the defaults);
    its `limit` must be None or an int >= 0, as `get_items`' own (`SessionInputError`
    naming `session_settings.limit`)."""
    if isinstance(value, Mapping):
        _check_limit("session_settings.limit", value.get("limit"))
    elif isinstance(value, SessionSettings):
        _check_limit("session_settings.limit", value.limit)
    if value is None:
        return SessionSettings()
    if isinstance(value, SessionSettings):
        return value
    if isinstance(value, Mapping):
        known = {field.name for field in dataclasses.fields(SessionSettings)}
        unknown = sorted(str(name) for name in value if name not in known)
        if unknown:
            raise SessionInputError(
                f"session_settings: Unknown session settings: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        try:
            return SessionSettings(**value)
        except Exception as exc:
            raise SessionInputError(f"session_settings: {exc}") from None
    raise SessionInputError(
        f"session_settings: must be SessionSettings, a dict or None, not {value!r}"
    )
