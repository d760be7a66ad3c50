"""The OpenAI Agents SDK adapter (`AisopodSession`): the SDK's `Session` contract on
SQLite and PostgreSQL, over both repositories, under the SDK's own `Runner` with its
scripted model (no network), from several threads and event loops."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from unittest.mock import AsyncMock, MagicMock

import pytest
from agents import Agent, RunConfig, Runner, Session, function_tool, set_tracing_disabled
from agents.memory import OpenAIResponsesCompactionSession, SessionSettings
from agents.testing import ScriptedModel, assistant_message, function_call
from sqlalchemy import Engine
from typer.testing import CliRunner

from aisopod_session import (
    AccessDeniedError,
    AsyncSessionRepository,
    NewMessage,
    Role,
    SessionKey,
    SessionRepository,
    open_async_database_sync,
)
from aisopod_session.asyncrepository import INLINE_MESSAGES, INLINE_TEXT
from aisopod_session.cli import app
from aisopod_session.integrations import openai_agents
from aisopod_session.integrations.openai_agents import (
    AisopodSession,
    SessionInputError,
    default_key,
    message_to_item,
)
from tests.dbtools import python_clock, refuse_boom, run_sql, snapshot

set_tracing_disabled(True)

ITEMS: list[dict[str, Any]] = [
    {"role": "user", "content": "What is the weather in Oslo?"},
    {"role": "system", "content": "Answer briefly."},
    {"role": "developer", "content": [{"type": "input_text", "text": "be kind"}]},
    {
        "type": "function_call",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"city": "Oslo"}',
        "id": "fc_1",
        "status": "completed",
    },
    {"type": "function_call_output", "call_id": "call_1", "output": "Rain in Oslo, 4 °C"},
    {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": "the user wants weather"}],
        "encrypted_content": None,
    },
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [
            {"type": "output_text", "text": "It rains in Oslo 🌧", "annotations": [], "logprobs": []}
        ],
    },
    {"type": "item_reference", "id": "msg_0"},
    {"type": "some_future_item", "payload": {"nested": [1, 2.5, True, None, "é"]}},
    {"role": "user", "content": ""},
]
"""Items of every shape the SDK stores: messages with text or blocks, a function call and
its output, a reasoning item, items without a text field, an item type from the future."""


def stored(session: AisopodSession) -> list[dict[str, Any]]:
    """Every item of `session`, as plain dicts."""
    return cast(list[dict[str, Any]], asyncio.run(session.get_items()))


@pytest.fixture(params=["sync", "async"])
def repository(
    request: pytest.FixtureRequest, store: Engine, store_url: str
) -> Iterator[SessionRepository | AsyncSessionRepository]:
    """A `SessionRepository` on `store`, or an `AsyncSessionRepository` on its database."""
    if request.param == "sync":
        yield SessionRepository(store)
        return
    engine = open_async_database_sync(store_url, clock=python_clock)
    try:
        yield AsyncSessionRepository(engine)
    finally:
        engine.sync_engine.dispose(close=False)


def test_every_kind_of_item_round_trips_exactly_in_order(
    repository: SessionRepository | AsyncSessionRepository,
) -> None:
    session = AisopodSession("chat-1", repository)
    assert isinstance(session, Session)

    async def run() -> list[Any]:
        await session.add_items(cast(Any, ITEMS[:4]))
        await session.add_items(cast(Any, ITEMS[4:]))
        return await session.get_items()

    items = asyncio.run(run())
    assert items == ITEMS
    # Key order too: the items read back dump to the same JSON text.
    assert [json.dumps(item) for item in items] == [json.dumps(item) for item in ITEMS]


def test_each_item_is_one_message_with_a_role_its_text_and_its_type(
    repository: SessionRepository | AsyncSessionRepository, store: Engine
) -> None:
    asyncio.run(AisopodSession("chat-1", repository).add_items(cast(Any, ITEMS)))
    history = SessionRepository(store).get_history(default_key("chat-1"))
    assert [(m.role, m.meta["item_type"]) for m in history] == [
        (Role.USER, "message"),
        (Role.SYSTEM, "message"),
        (Role.DEVELOPER, "message"),
        (Role.ASSISTANT, "function_call"),
        (Role.TOOL, "function_call_output"),
        (Role.ASSISTANT, "reasoning"),
        (Role.ASSISTANT, "message"),
        (Role.ASSISTANT, "item_reference"),
        (Role.ASSISTANT, "some_future_item"),
        (Role.USER, "message"),
    ]
    assert [m.content for m in history[3:6]] == [
        '{"city": "Oslo"}',
        "Rain in Oslo, 4 °C",
        [{"type": "summary_text", "text": "the user wants weather"}],
    ]
    assert history[7].content is None
    hits = SessionRepository(store).search_messages("oslo rain")
    assert [hit.message.id for hit in hits] == [history[4].id]
    hits = SessionRepository(store).search_messages("rains")
    assert [hit.message.id for hit in hits] == [history[6].id]


def test_a_reasoning_summary_beside_empty_content_is_the_text(
    repository: SessionRepository | AsyncSessionRepository, store: Engine
) -> None:
    """The text is the first of the fields that holds something: a reasoning item may
    carry `"content": null` or `[]` beside its summary."""
    empties: list[Any] = [None, []]
    items: list[dict[str, Any]] = [
        {
            "type": "reasoning",
            "id": f"rs_{n}",
            "content": empty,
            "summary": [{"type": "summary_text", "text": f"wombat plan {n}"}],
        }
        for n, empty in enumerate(empties)
    ]
    session = AisopodSession("chat-1", repository)
    asyncio.run(session.add_items(cast(Any, items)))
    assert stored(session) == items
    assert [json.dumps(item) for item in stored(session)] == [json.dumps(i) for i in items]
    history = SessionRepository(store).get_history(default_key("chat-1"))
    assert [m.content for m in history] == [item["summary"] for item in items]
    hits = SessionRepository(store).search_messages("wombat")
    assert sorted(hit.message.id or 0 for hit in hits) == [m.id for m in history]
    assert all("«wombat»" in hit.snippet for hit in hits)


def test_the_items_are_readable_with_the_command(
    repository: SessionRepository | AsyncSessionRepository, store_url: str
) -> None:
    asyncio.run(AisopodSession("chat-1", repository).add_items(cast(Any, ITEMS[:5])))
    shown = CliRunner().invoke(
        app, ["--db", store_url, "sessions", "show", str(default_key("chat-1"))]
    )
    assert shown.exit_code == 0, shown.output
    for text in ("What is the weather in Oslo?", '"city"', "Rain in Oslo"):
        assert text in shown.stdout


def test_get_items_gives_the_latest_in_chronological_order(
    repository: SessionRepository | AsyncSessionRepository,
) -> None:
    session = AisopodSession("chat-1", repository)
    limited = AisopodSession("chat-1", repository, session_settings=SessionSettings(limit=3))
    items = [{"role": "user", "content": f"m{i}"} for i in range(10)]

    async def run() -> None:
        assert await session.get_items() == []  # never written
        await session.add_items(cast(Any, items))
        assert await session.get_items() == items
        assert await session.get_items(4) == items[-4:]
        assert await session.get_items(0) == []
        assert await session.get_items(100) == items
        assert await limited.get_items() == items[-3:]
        assert await limited.get_items(5) == items[-5:]  # the argument wins
        for bad in (-1, 1.5, "3", True):
            with pytest.raises(ValueError, match="limit"):
                await session.get_items(cast(Any, bad))

    asyncio.run(run())


def test_items_read_from_any_row_are_what_their_messages_give(
    repository: SessionRepository | AsyncSessionRepository, store: Engine
) -> None:
    """`get_items` reads the rows' cells (`get_history_text`) and decodes each metadata
    text once per call: its items equal `message_to_item` of the rows' `Message` objects
    for rows of every shape, the adapter's and other writers' (metadata of another
    source, not an object, not JSON; content not JSON; a content field placed first or
    out of range), and no two items share a value a caller could change."""
    session = AisopodSession("chat-1", repository)
    nested = {"type": "tool_result", "data": {"tags": ["a"]}, "output": "done"}
    # As the SDK's Runner makes a user's turn: the content first.
    turn = {"content": "hi", "role": "user"}
    asyncio.run(
        session.add_items(cast(Any, [*ITEMS, ITEMS[0], ITEMS[3], nested, nested, turn, turn]))
    )
    key = default_key("chat-1")
    sync = SessionRepository(store)
    shaped = {"source": "openai-agents", "item_type": "message"}
    sync.append_messages(
        key,
        [
            NewMessage(Role.USER, "gateway's own message", meta={"source": "gateway"}),
            NewMessage(Role.USER, "b", meta={**shaped, "item": {"id": "m"}, "content_index": 0}),
            NewMessage(Role.USER, "c", meta={**shaped, "item": {"id": "m"}, "content_index": 7}),
            NewMessage(Role.USER, "d", meta={**shaped, "item": {"content": "x", "id": "m"}}),
            NewMessage(Role.USER, "e", meta={**shaped, "item": "not an object"}),
            NewMessage(Role.USER, "f", meta={**shaped, "item": {"a": 1}, "content_field": 3}),
            NewMessage(Role.USER, "g", meta={**shaped, "item": {"a": [1]}, "content_field": "t"}),
        ],
    )
    session_id = sync.get(key).id  # type: ignore[union-attr]
    plain_sql: list[tuple[str | bytes, str]] = [
        ("not json", "[1, 2]"),
        ('"ok"', "not json"),
        ("{", "{}"),
        (b'"a blob"', "{}"),
    ]
    for content, meta in plain_sql:
        run_sql(
            store,
            "INSERT INTO messages (session_id, role, content, created_at, metadata) "
            "VALUES (?, 'Narrator', ?, '2026-12-01T00:00:00+00:00', ?)",
            (session_id, content, meta),
        )
    expected = [message_to_item(message) for message in sync.get_history(key)]
    assert len(expected) == len(ITEMS) + 6 + 7 + 4
    items = stored(session)
    assert [json.dumps(item) for item in items] == [json.dumps(item) for item in expected]
    assert items[len(ITEMS) + 4 : len(ITEMS) + 6] == [turn, turn]
    assert [list(item) for item in items[len(ITEMS) + 4 : len(ITEMS) + 6]] == [
        ["content", "role"]
    ] * 2
    # The blob reads as its text on SQLite; PostgreSQL stored the bytes' hex form.
    blob = "a blob" if store.dialect.name == "sqlite" else "\\x" + b'"a blob"'.hex()
    assert expected[-1] == {"role": "Narrator", "content": blob}
    assert expected[len(ITEMS) + 6 : -1] == [
        {"role": "user", "content": "gateway's own message"},
        {"content": "b", "id": "m"},
        {"id": "m", "content": "c"},
        {"content": "d", "id": "m"},
        {"role": "user", "content": "e"},
        {"a": 1},
        {"a": [1], "t": "g"},
        {"role": "Narrator", "content": "not json"},
        {"role": "Narrator", "content": "ok"},
        {"role": "Narrator", "content": "{"},
    ]
    # Items made from one shared metadata text are distinct objects, and changing one
    # changes no other item, now or in a later read.
    first, again = items[0], items[len(ITEMS)]
    assert first == again
    assert first is not again
    first["role"] = "changed"
    items[3]["name"] = "changed"
    items[len(ITEMS) + 2]["data"]["tags"].append("changed")
    assert again["role"] == "user"
    assert items[len(ITEMS) + 1]["name"] == "get_weather"
    assert items[len(ITEMS) + 3] == nested
    items[len(ITEMS) + 4]["role"] = "changed"
    assert items[len(ITEMS) + 5] == turn
    assert stored(session) == expected


def test_a_long_history_is_decoded_off_the_event_loop(
    repository: SessionRepository | AsyncSessionRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items are decoded on the event loop only when the async repository read them
    there (at most 64 short rows); a longer history is decoded on a worker thread, as
    the repository's own long reads run, and everything through a `SessionRepository`."""
    decoded_on: list[threading.Thread] = []
    decode = openai_agents.items_of_rows

    def spy(rows: list[tuple[Any, Any, Any]]) -> list[dict[str, Any]]:
        decoded_on.append(threading.current_thread())
        return decode(rows)

    monkeypatch.setattr(openai_agents, "items_of_rows", spy)
    session = AisopodSession("chat-1", repository)
    items = [{"role": "user", "content": f"m{i}"} for i in range(100)]

    async def run() -> threading.Thread:
        await session.add_items(cast(Any, items))
        assert await session.get_items(3) == items[-3:]
        assert await session.get_items() == items
        assert await session.get_items(2) == items[-2:]
        return threading.current_thread()

    loop_thread = asyncio.run(run())
    on_loop = [thread is loop_thread for thread in decoded_on]
    if isinstance(repository, AsyncSessionRepository) and "sqlite" in str(repository.engine.url):
        assert on_loop == [True, False, True]
    elif isinstance(repository, AsyncSessionRepository):
        assert on_loop[1] is False
    else:
        assert on_loop == [False, False, False]


def test_many_items_are_checked_off_the_event_loop(
    repository: SessionRepository | AsyncSessionRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items to write are checked on the event loop only when the async repository
    would write them there (at most 64 short items); more, for `add_items` and the
    compaction hook alike, are checked on a worker thread."""
    checked_on: list[threading.Thread] = []
    check = AisopodSession._messages

    def spy(self: AisopodSession, items: Any) -> list[NewMessage]:
        checked_on.append(threading.current_thread())
        return check(self, items)

    monkeypatch.setattr(AisopodSession, "_messages", spy)
    session = AisopodSession("chat-1", repository)
    many = [{"role": "user", "content": f"m{i}"} for i in range(100)]

    async def run() -> threading.Thread:
        await session.add_items(cast(Any, many[:3]))
        await session.add_items(cast(Any, many))
        await session.add_items(cast(Any, [{"role": "user", "content": "x" * 70_000}]))
        assert await AisopodSession._atomic_replace_items(session, cast(Any, many))
        return threading.current_thread()

    loop_thread = asyncio.run(run())
    assert [thread is loop_thread for thread in checked_on] == [True, False, False, False]
    assert stored(session) == many


def test_only_text_counts_towards_decoding_on_the_loop() -> None:
    """The size rule of `get_items`' decoding on the event loop (`INLINE_MESSAGES` rows,
    `INLINE_TEXT` characters of text): text and blob cells count by length, and a cell
    of another type (which no stored row should hold) counts for nothing."""
    decoded_inline = openai_agents._decoded_inline
    small = [("user", '"hi"', "{}")]
    assert decoded_inline(small)
    assert decoded_inline([*small, ("user", 42, None)])
    assert decoded_inline(small * INLINE_MESSAGES)
    assert not decoded_inline(small * (INLINE_MESSAGES + 1))
    assert decoded_inline([("user", "x" * (INLINE_TEXT - 2), "{}")])
    assert not decoded_inline([("user", "x" * (INLINE_TEXT - 1), "{}")])
    assert not decoded_inline([("user", 42, b"x" * (INLINE_TEXT + 1))])


def _compaction_looks_up(hook: str) -> bool:
    """Whether the installed SDK's compaction session looks up `hook` on the session it
    wraps: `_get_compaction_snapshot` from openai-agents 0.23, `_atomic_replace_items`
    from 0.24 (the extra allows 0.21, where it clears the session and adds the items)."""
    from agents.memory import openai_responses_compaction_session

    return hook in inspect.getsource(openai_responses_compaction_session)


needs_snapshot_hook = pytest.mark.skipif(
    not _compaction_looks_up("_get_compaction_snapshot"),
    reason="this openai-agents (< 0.23) compacts without a snapshot from the session",
)
needs_replace_hook = pytest.mark.skipif(
    not _compaction_looks_up("_atomic_replace_items"),
    reason="this openai-agents (< 0.24) rewrites a history with clear_session and add_items",
)


COMPACTED: list[dict[str, Any]] = [
    {"type": "compaction", "id": "cmp_1", "encrypted_content": "what was said, compacted"},
    {"role": "user", "content": "and the latest question"},
]


def _compactor(session: Session, output: list[dict[str, Any]]) -> Any:
    """The SDK's compaction session over `session`, its OpenAI client replaced by one
    whose `responses.compact` answers `output` (no network)."""
    client = MagicMock()
    client.responses.compact = AsyncMock(return_value=SimpleNamespace(output=output, usage=None))
    return OpenAIResponsesCompactionSession("chat-1", session, client=client)


@needs_replace_hook
def test_the_sdks_compaction_rewrites_the_history_in_one_transaction(
    repository: SessionRepository | AsyncSessionRepository,
    store: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The SDK's `OpenAIResponsesCompactionSession` replaces the stored items with the
    compacted ones through the adapter's `_atomic_replace_items` (one write
    transaction), never through `clear_session` then `add_items`, whose gap a dying
    process would leave empty; a replacement the store refuses leaves the history whole."""
    session = AisopodSession("chat-1", repository)
    compactor = _compactor(session, COMPACTED)

    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the SDK fell back to clear_session and add_items")

    monkeypatch.setattr(AisopodSession, "clear_session", refuse)

    async def run() -> list[Any]:
        await compactor.add_items(cast(Any, ITEMS))
        await compactor.run_compaction({"force": True})
        return await session.get_items()

    assert asyncio.run(run()) == COMPACTED
    sent = compactor.client.responses.compact.call_args.kwargs["input"]
    assert len(sent) == len(ITEMS)
    assert sent[0]["content"] == ITEMS[0]["content"]
    assert [m.role for m in SessionRepository(store).get_history(default_key("chat-1"))] == [
        Role.ASSISTANT,
        Role.USER,
    ]
    # Compacted items are checked as `add_items` checks them: nothing is written.
    before = snapshot(store)
    with pytest.raises(SessionInputError, match=r"items\[1\]"):
        asyncio.run(AisopodSession._atomic_replace_items(session, cast(Any, [COMPACTED[0], 7])))
    assert snapshot(store) == before


def test_a_failed_compaction_write_leaves_the_history_whole(
    repository: SessionRepository | AsyncSessionRepository, store: Engine
) -> None:
    """The deletion of the old items and the insertion of the compacted ones are one
    transaction: when the database refuses a compacted row (a trigger another program
    added), the old items are all still there."""
    session = AisopodSession("chat-1", repository)
    compactor = _compactor(session, [{"role": "assistant", "content": "boom"}])
    asyncio.run(compactor.add_items(cast(Any, ITEMS)))
    refuse_boom(store)
    with pytest.raises(Exception, match="boom refused"):
        asyncio.run(compactor.run_compaction({"force": True}))
    assert stored(session) == ITEMS


def _run_compacting(
    session: Session, compact: Any, reply: str = "done"
) -> OpenAIResponsesCompactionSession:
    """One turn ("continue") under the SDK's `Runner` through its compaction session
    over `session`, which compacts after every turn (input mode, one item of history
    per turn: `session_settings.limit` 1) with `compact` as `responses.compact`."""
    client = MagicMock()
    client.responses.compact = AsyncMock(side_effect=compact)
    compactor = OpenAIResponsesCompactionSession(
        "chat-1",
        session,
        client=client,
        compaction_mode="input",
        should_trigger_compaction=lambda _: True,
    )
    model = ScriptedModel(steps=[[assistant_message(reply)]])
    asyncio.run(
        Runner.run(
            Agent(name="worker", model=model),
            "continue",
            session=compactor,
            run_config=RunConfig(session_settings=SessionSettings(limit=1)),
        )
    )
    return compactor


@needs_snapshot_hook
def test_automatic_compaction_rewrites_only_the_newest_items(
    repository: SessionRepository | AsyncSessionRepository,
) -> None:
    """Under `Runner`, the SDK's automatic compaction reads the newest items through
    the adapter's `_get_compaction_snapshot` and replaces only those the model saw,
    atomically: the older items stay as they were."""
    session = AisopodSession("chat-1", repository)
    older = [{"role": "user", "content": str(i)} for i in range(4)]
    asyncio.run(session.add_items(cast(Any, older)))
    compacted = {"type": "compaction", "id": "cmp_1", "encrypted_content": "summary"}
    sent: list[Any] = []

    async def compact(**kwargs: Any) -> Any:
        sent.append(kwargs["input"])
        return SimpleNamespace(output=[compacted], usage=None)

    _run_compacting(session, compact)
    [request] = sent
    assert [item.get("content") for item in request[:2]] == ["3", "continue"]
    assert len(request) == 3  # the newest stored item, the turn and the model's reply
    assert stored(session) == [*older[:3], compacted]


@needs_snapshot_hook
def test_an_item_written_while_compacting_is_never_lost(
    repository: SessionRepository | AsyncSessionRepository,
) -> None:
    """An item another writer adds while the compaction request is out makes the
    snapshot stale: the SDK's replacement is refused and writes nothing, and every item
    stays."""
    session = AisopodSession("chat-1", repository)
    other = AisopodSession("chat-1", repository)  # another worker on the same chat
    older = [{"role": "user", "content": str(i)} for i in range(4)]
    asyncio.run(session.add_items(cast(Any, older)))
    meanwhile = {"role": "user", "content": "written meanwhile"}

    async def compact(**kwargs: Any) -> Any:
        await other.add_items(cast(Any, [meanwhile]))
        return SimpleNamespace(output=[{"type": "compaction", "id": "c", "encrypted_content": "s"}])

    _run_compacting(session, compact)
    items = stored(session)
    assert items[:4] == older
    assert [item.get("content") for item in items[4:5]] == ["continue"]
    assert items[-1] == meanwhile
    assert len(items) == 7  # the turn's two items stored, nothing replaced


@needs_snapshot_hook
def test_an_encrypted_history_compacts_without_losing_an_item_written_meanwhile(
    repository: SessionRepository | AsyncSessionRepository,
) -> None:
    """Under the SDK's `EncryptedSession` (which asks the snapshot to delete expired
    items too, and gets them left in place), compaction still refuses a stale suffix: the
    item another worker wrote meanwhile stays; without one, only the newest items are
    rewritten."""
    from agents.extensions.memory.encrypt_session import EncryptedSession

    def encrypted() -> EncryptedSession:
        backend = cast(Any, AisopodSession("chat-1", repository))  # a Session, not SessionABC
        return EncryptedSession("chat-1", backend, encryption_key="a key", ttl=3600)

    session, other = encrypted(), encrypted()
    older = [{"role": "user", "content": str(i)} for i in range(4)]
    asyncio.run(session.add_items(cast(Any, older)))
    meanwhile = {"role": "user", "content": "written meanwhile"}
    compacted = {"type": "compaction", "id": "c", "encrypted_content": "s"}

    async def compact_racing(**kwargs: Any) -> Any:
        await other.add_items(cast(Any, [meanwhile]))
        return SimpleNamespace(output=[compacted], usage=None)

    _run_compacting(session, compact_racing)
    first = asyncio.run(session.get_items())
    assert first[:4] == older
    assert first[-1] == meanwhile
    assert len(first) == 7

    async def compact(**kwargs: Any) -> Any:
        return SimpleNamespace(output=[compacted], usage=None)

    # The next turn sees the newest item (meanwhile), its own and the reply: those three
    # become the compacted item.
    _run_compacting(session, compact)
    assert asyncio.run(session.get_items()) == [*first[:6], compacted]


@needs_snapshot_hook
def test_an_encrypted_history_drops_its_expired_items_when_compacted(
    repository: SessionRepository | AsyncSessionRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's `EncryptedSession` asks the snapshot to delete its expired items ahead
    of the compacted ones (`prune_prefix`): they go in the same write transaction, and
    the live ones stay."""
    from agents.extensions.memory.encrypt_session import EncryptedSession

    clock = [1_000.0]  # what the encryption's timestamps and TTL checks read
    monkeypatch.setattr("cryptography.fernet.time.time", lambda: clock[0])
    backend = AisopodSession("chat-1", repository)
    session = EncryptedSession("chat-1", cast(Any, backend), encryption_key="a key", ttl=10)
    asyncio.run(session.add_items(cast(Any, [{"role": "user", "content": "expired"}] * 3)))
    clock[0] += 11
    live = [{"role": "user", "content": f"live {i}"} for i in range(3)]
    asyncio.run(session.add_items(cast(Any, live)))
    compacted = {"type": "compaction", "id": "c", "encrypted_content": "s"}

    async def compact(**kwargs: Any) -> Any:
        return SimpleNamespace(output=[compacted], usage=None)

    _run_compacting(session, compact)
    # The newest live item, the turn and the reply became the compacted item.
    assert asyncio.run(session.get_items()) == [*live[:2], compacted]
    assert len(stored(backend)) == 3  # the expired rows are gone from the store


def test_an_error_of_the_sdks_prune_callback_reaches_the_sdk_as_it_is(
    repository: SessionRepository | AsyncSessionRepository, store: Engine
) -> None:
    """An exception from the SDK's `prune_prefix` refuses the replacement, nothing
    written, and reaches the SDK as raised: not as a refused item."""
    session = AisopodSession("chat-1", repository)
    asyncio.run(session.add_items(cast(Any, ITEMS[:3])))

    def unreadable(item: Any) -> bool:
        raise ValueError("cannot read its timestamp")

    async def run() -> None:
        snapshot_ = await session._get_compaction_snapshot(1, prune_prefix=unreadable)
        assert snapshot_ is not None
        await snapshot_.replace_suffix(0, cast(Any, [ITEMS[0]]))

    before = snapshot(store)
    with pytest.raises(ValueError, match="cannot read its timestamp") as raised:
        asyncio.run(run())
    assert not isinstance(raised.value, SessionInputError)
    assert snapshot(store) == before


def test_the_compaction_snapshot_reads_the_newest_items_once(
    repository: SessionRepository | AsyncSessionRepository, store: Engine
) -> None:
    """`_get_compaction_snapshot(limit)`: the newest `limit` items, whether they are all
    of them, and a `replace_suffix` that refuses an empty or stale suffix; None where
    the SDK must replace the whole history itself."""
    session = AisopodSession("chat-1", repository)

    async def run() -> None:
        empty = await session._get_compaction_snapshot(3)
        assert empty is not None
        assert (empty.items, empty.complete) == ([], True)
        assert await empty.replace_suffix(0, []) is False
        await session.add_items(cast(Any, ITEMS[:5]))
        newest = await session._get_compaction_snapshot(2)
        whole = await session._get_compaction_snapshot(5)
        assert newest is not None
        assert whole is not None
        assert (newest.items, newest.complete) == (ITEMS[3:5], False)
        assert (whole.items, whole.complete) == (ITEMS[:5], True)
        assert await newest.replace_suffix(2, []) is False  # nothing from there on
        assert await newest.replace_suffix(1, cast(Any, [ITEMS[0]])) is True
        assert await session.get_items() == [*ITEMS[:4], ITEMS[0]]
        assert await whole.replace_suffix(0, []) is False  # read before that write
        assert await session.get_items() == [*ITEMS[:4], ITEMS[0]]
        for limit in (0, -1, 1.5):
            assert await session._get_compaction_snapshot(cast(Any, limit)) is None
        pruning = await session._get_compaction_snapshot(2, prune_prefix=lambda _: True)
        assert pruning is not None
        assert pruning.items == await session.get_items(2)

    asyncio.run(run())


def test_a_subclass_that_changes_items_keeps_the_sdks_own_replacement(
    repository: SessionRepository | AsyncSessionRepository,
) -> None:
    """A subclass that overrides `add_items` (say, to redact items) is not bypassed:
    `_atomic_replace_items` declines, changing nothing, and the SDK's compaction
    replaces the items through the subclass's own `clear_session` and `add_items`."""

    class Redacting(AisopodSession):
        async def add_items(self, items: list[Any]) -> None:
            await super().add_items(
                cast(Any, [{**item, "content": "[redacted]"} for item in items])
            )

    session = Redacting("chat-1", repository)
    asyncio.run(session.add_items([{"role": "user", "content": "secret"}]))
    assert asyncio.run(Redacting._atomic_replace_items(session, [])) is False
    assert asyncio.run(session._get_compaction_snapshot(5)) is None
    assert stored(session) == [{"role": "user", "content": "[redacted]"}]
    compactor = _compactor(session, [{"role": "assistant", "content": "summary"}])
    asyncio.run(compactor.run_compaction({"force": True}))
    assert stored(session) == [{"role": "assistant", "content": "[redacted]"}]


def test_compacting_a_session_never_written_creates_nothing_for_no_items(
    repository: SessionRepository | AsyncSessionRepository, store: Engine
) -> None:
    session = AisopodSession("never-written", repository)
    before = snapshot(store)
    assert asyncio.run(AisopodSession._atomic_replace_items(session, [])) is True
    assert snapshot(store) == before
    assert asyncio.run(AisopodSession._atomic_replace_items(session, cast(Any, COMPACTED[1:])))
    assert stored(session) == COMPACTED[1:]


def test_pop_item_removes_the_latest_and_clear_session_removes_all(
    repository: SessionRepository | AsyncSessionRepository, store: Engine
) -> None:
    session = AisopodSession("chat-1", repository)

    async def run() -> None:
        assert await session.pop_item() is None  # never written
        await session.clear_session()  # nothing to clear: no error
        await session.add_items(cast(Any, ITEMS[:3]))
        assert await session.pop_item() == ITEMS[2]
        assert await session.get_items() == ITEMS[:2]
        await session.clear_session()
        assert await session.get_items() == []
        assert await session.pop_item() is None
        await session.add_items(cast(Any, ITEMS[3:4]))
        assert await session.get_items() == ITEMS[3:4]

    SessionRepository(store).get_or_create(default_key("chat-1"))
    SessionRepository(store).update_metadata(default_key("chat-1"), {"title": "kept"})
    asyncio.run(run())
    stored = SessionRepository(store).get(default_key("chat-1"))
    assert stored is not None
    assert (stored.message_count, stored.meta) == (1, {"title": "kept"})


def test_sessions_keep_apart_and_a_key_can_be_the_gateways_own(
    repository: SessionRepository | AsyncSessionRepository, store: Engine
) -> None:
    gateway = SessionKey("agent-1", "telegram", "bot-A", "dm", "alice")
    sync = SessionRepository(store)
    sync.get_or_create(gateway)
    sync.append_message(gateway, "user", "written by the gateway")
    first = AisopodSession("a", repository)
    second = AisopodSession("b", repository)
    own = AisopodSession("whatever", repository, key=str(gateway))

    async def run() -> None:
        await first.add_items([{"role": "user", "content": "to a"}])
        await second.add_items([{"role": "user", "content": "to b"}])
        await own.add_items([{"role": "assistant", "content": "reply"}])
        assert await first.get_items() == [{"role": "user", "content": "to a"}]
        assert await second.get_items() == [{"role": "user", "content": "to b"}]
        # A message the gateway wrote reads as an easy input message.
        assert await own.get_items() == [
            {"role": "user", "content": "written by the gateway"},
            {"role": "assistant", "content": "reply"},
        ]
        await first.clear_session()
        assert await second.get_items() != []

    asyncio.run(run())
    assert str(default_key("a")) == "openai-agents:agents-sdk:default:thread:a"
    assert sync.get(default_key("b")) is not None


def test_a_confined_repository_gives_the_default_key_its_agent(
    repository: SessionRepository | AsyncSessionRepository,
) -> None:
    confined = repository.for_agent("support-bot")
    session = AisopodSession("chat-1", confined)
    assert session.key == SessionKey("support-bot", "agents-sdk", "default", "thread", "chat-1")
    other = AisopodSession("x", confined, key="billing-bot:agents-sdk:default:thread:x")

    async def run() -> None:
        await session.add_items([{"role": "user", "content": "hi"}])
        assert await session.get_items() == [{"role": "user", "content": "hi"}]
        with pytest.raises(AccessDeniedError):
            await other.get_items()

    asyncio.run(run())


def test_bad_input_is_refused_naming_it_and_nothing_is_written(
    repository: SessionRepository | AsyncSessionRepository, store: Engine
) -> None:
    session = AisopodSession("chat-1", repository)
    before = snapshot(store)
    with pytest.raises(ValueError, match=r"items\[1\]: .*dict"):
        asyncio.run(session.add_items(cast(Any, [{"role": "user", "content": "ok"}, "text"])))
    # Named by the item's own fields, whether they become the row's content or metadata.
    refused: list[tuple[dict[str, Any], str]] = [
        ({"role": "user", "content": float("nan")}, r"nan at items\[0\]\.content is not"),
        ({"role": "user", "content": "x", "n": 2**64}, r"the integer at items\[0\]\.n does not"),
        (
            {"type": "function_call_output", "call_id": "c", "output": [{"v": -(2**70)}]},
            r"the integer at items\[0\]\.output\[0\]\.v does not",
        ),
    ]
    for item, reason in refused:
        with pytest.raises(SessionInputError, match=r"^items\[0\]: " + reason):
            asyncio.run(session.add_items(cast(Any, [item])))
    assert snapshot(store) == before
    for bad in ("", " padded", "a\x00b", "x" * 256, 42):
        with pytest.raises(ValueError, match="session_id"):
            AisopodSession(cast(Any, bad), repository)
    with pytest.raises(ValueError, match="key"):
        AisopodSession("chat-1", repository, key="not a key")
    # Refused items and settings are TypeErrors too, as the SDK's SQLiteSession raises.
    with pytest.raises(TypeError, match=r"items\[0\]"):
        asyncio.run(session.add_items(cast(Any, [{"role": "user", "content": object()}])))
    assert snapshot(store) == before
    with pytest.raises(ValueError, match="session_settings: Unknown session settings: limitt"):
        AisopodSession("chat-1", repository, session_settings={"limitt": 1})
    with pytest.raises(TypeError, match="limitt"):
        AisopodSession("chat-1", repository, session_settings={"limitt": 1})
    with pytest.raises(TypeError, match="repository"):
        AisopodSession("chat-1", cast(Any, "sessions.db"))
    # A limit in the settings is checked as get_items checks its own, and not coerced.
    for limit in (-1, True, "2", 2.0, 2**70):
        with pytest.raises(TypeError, match=r"session_settings\.limit"):
            AisopodSession("chat-1", repository, session_settings={"limit": limit})
    with pytest.raises(ValueError, match=r"session_settings\.limit"):
        AisopodSession("chat-1", repository, session_settings=SessionSettings(limit=-1))
    with pytest.raises(TypeError, match="items: must be a list"):
        asyncio.run(session.add_items(cast(Any, {"role": "user", "content": "hi"})))
    with pytest.raises(ValueError, match="session_id: must be a string, not int"):
        AisopodSession(cast(Any, 5), repository)
    assert snapshot(store) == before


def test_what_only_the_store_refuses_names_the_item_too(
    repository: SessionRepository | AsyncSessionRepository, store: Engine
) -> None:
    """A NUL character, which PostgreSQL's text cannot hold (SQLite stores it)."""
    session = AisopodSession("chat-1", repository)
    if store.dialect.name != "postgresql":
        asyncio.run(session.add_items([{"role": "user", "content": "a\x00b"}]))
        assert stored(session) == [{"role": "user", "content": "a\x00b"}]
        return
    before = snapshot(store)
    with pytest.raises(TypeError, match=r"items\[1\]\.content"):
        asyncio.run(
            session.add_items(
                [{"role": "user", "content": "ok"}, {"role": "user", "content": "a\x00b"}]
            )
        )
    with pytest.raises(ValueError, match=r"items\[0\]\.content"):
        asyncio.run(session.add_items([{"role": "user", "content": "a\x00b"}]))
    # Any field of the item, by its own name, not by the row's layout.
    for item, field in [
        ({"type": "function_call_output", "call_id": "c", "output": "a\x00"}, r"\.output"),
        (
            {"type": "function_call", "call_id": "c\x00", "name": "f", "arguments": "{}"},
            r"\.call_id",
        ),
        ({"role": "user", "content": "x", "name": ["ok", "\x00"]}, r"\.name\[1\]"),
    ]:
        reason = r"^items\[1\]: the text at items\[1\]" + field + " holds a NUL character"
        with pytest.raises(SessionInputError, match=reason):
            asyncio.run(session.add_items(cast(Any, [{"role": "user", "content": "ok"}, item])))
    assert snapshot(store) == before


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Rain in {city}"


def test_runner_keeps_several_turns_with_tool_calls(
    repository: SessionRepository | AsyncSessionRepository,
) -> None:
    model = ScriptedModel()
    agent = Agent(name="weather", model=model, tools=[get_weather])
    session = AisopodSession("chat-1", repository)
    model.enqueue([function_call("get_weather", {"city": "Oslo"}, call_id="call_1")])
    model.enqueue([assistant_message("It rains in Oslo.")])
    model.enqueue([assistant_message("You asked about Oslo.")])

    async def run() -> None:
        result = await Runner.run(agent, "Weather in Oslo?", session=session)
        assert result.final_output == "It rains in Oslo."
        result = await Runner.run(agent, "What did I ask?", session=session)
        assert result.final_output == "You asked about Oslo."

    asyncio.run(run())
    # The last call saw the whole first turn from the store, then the new question.
    sent = model.calls[-1].input
    assert [item.get("type", "message") for item in sent] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
        "message",
    ]
    assert sent[2]["output"] == "Rain in Oslo"
    items = stored(session)
    assert len(items) == 6
    assert items[-1]["content"][0]["text"] == "You asked about Oslo."


def test_run_sync_works_from_plain_threads(
    repository: SessionRepository | AsyncSessionRepository,
) -> None:
    """`Runner.run_sync` starts an event loop per call: several threads, several loops,
    one store."""
    errors: list[BaseException] = []

    def converse(number: int) -> None:
        try:
            model = ScriptedModel()
            agent = Agent(name="echo", model=model)
            session = AisopodSession(f"thread-{number}", repository)
            for turn in range(3):
                model.enqueue([assistant_message(f"reply {number}.{turn}")])
                Runner.run_sync(agent, f"question {number}.{turn}", session=session)
        except BaseException as exc:
            errors.append(exc)
        finally:
            # run_sync leaves the thread's default loop open for its next call.
            asyncio.get_event_loop_policy().get_event_loop().close()

    threads = [threading.Thread(target=converse, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for number in range(4):
        items = stored(AisopodSession(f"thread-{number}", repository))
        assert [item["content"] for item in items[::2]] == [
            f"question {number}.{turn}" for turn in range(3)
        ]


def test_loops_in_threads_share_one_session_and_pops_never_repeat(
    repository: SessionRepository | AsyncSessionRepository,
) -> None:
    session = AisopodSession("shared", repository)
    asyncio.run(session.add_items([{"role": "user", "content": f"m{i}"} for i in range(60)]))
    popped: list[Any] = []
    errors: list[BaseException] = []

    def pop_and_add(number: int) -> None:
        async def run() -> None:
            for turn in range(10):
                item = await session.pop_item()
                assert item is not None
                popped.append(cast(dict[str, Any], item)["content"])
                await session.add_items([{"role": "assistant", "content": f"t{number}.{turn}"}])

        try:
            asyncio.run(run())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pop_and_add, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(popped) == 30
    assert len(set(popped)) == 30  # no item popped twice
    left = [item["content"] for item in stored(session)]
    assert len(left) == 60
    assert sorted(set(popped) | set(left)) == sorted(
        [f"m{i}" for i in range(60)] + [f"t{n}.{t}" for n in range(3) for t in range(10)]
    )


def test_open_makes_its_own_store_and_close_closes_it(tmp_path: Path) -> None:
    path = tmp_path / "agents.db"
    session = AisopodSession.open("chat-1", path, session_settings={"limit": 1})
    asyncio.run(
        session.add_items([{"role": "user", "content": "hi"}, {"role": "user", "content": "2"}])
    )
    assert asyncio.run(session.get_items()) == [{"role": "user", "content": "2"}]
    session.close()
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(session.get_items())
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(session.add_items([]))
    again = AisopodSession.open("chat-1", str(path))
    assert len(asyncio.run(again.get_items())) == 2
    again.close()
