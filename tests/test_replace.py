"""Replacing a session's history, or its newest messages (`replace_messages`): what the
session holds and counts afterwards, the old history kept whole when anything fails or
has moved on, and every refusal with nothing written."""

from __future__ import annotations

import threading
from collections import UserList
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import Engine

from aisopod_session import (
    AccessDeniedError,
    HistoryChangedError,
    Message,
    NewMessage,
    Role,
    SessionKey,
    SessionNotFoundError,
    SessionRepository,
    SessionStatus,
)
from aisopod_session.repository import _EXPIRED_PAGE
from tests.dbtools import before_io, no_statements, refuse_boom, run_sql, snapshot

KEY = SessionKey("agent-1", "telegram", "bot-A", "dm", "alice")
OTHER = SessionKey("agent-1", "telegram", "bot-A", "dm", "bob")
START = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """SQLite and PostgreSQL, sync and async API (see conftest)."""
    return store_repo


def test_replace_gives_the_session_exactly_the_new_messages_and_keeps_the_rest(
    repo: SessionRepository,
) -> None:
    with freeze_time(START) as clock:
        repo.get_or_create(KEY)
        repo.update_metadata(KEY, {"title": "kept"})
        old = repo.append_messages(
            KEY,
            [NewMessage("user", f"old {i}") for i in range(5)],
            input_tokens=5,
            output_tokens=7,
        )
        repo.compact(KEY, keep_last=4, summary="the first turn")
        repo.set_status(KEY, SessionStatus.IDLE)
        clock.tick(timedelta(minutes=5))
        new = repo.replace_messages(
            KEY,
            [
                NewMessage(Role.SYSTEM, "summary of it all", meta={"kind": "compaction"}),
                {"role": "user", "content": [{"type": "text", "text": "latest"}]},
                NewMessage("assistant", None, tool_calls=[{"id": "c1"}]),
            ],
            output_tokens=3,
        )
    assert [(m.role, m.content, m.tool_calls, m.meta) for m in new] == [
        (Role.SYSTEM, "summary of it all", None, {"kind": "compaction"}),
        (Role.USER, [{"type": "text", "text": "latest"}], None, {}),
        (Role.ASSISTANT, None, [{"id": "c1"}], {}),
    ]
    assert repo.get_history(KEY) == new
    # New rows, after every old one, stamped now.
    assert min(m.id or 0 for m in new) > max(m.id or 0 for m in old)
    assert {m.created_at for m in new} == {START + timedelta(minutes=5)}
    session = repo.get(KEY)
    assert session is not None
    assert session.message_count == 3
    assert session.updated_at == START + timedelta(minutes=5)
    assert session.status == SessionStatus.ACTIVE
    # What the conversation cost grows by the arguments; metadata and compaction stay.
    assert (session.token_usage, session.input_tokens, session.output_tokens) == (15, 5, 10)
    assert session.meta == {"title": "kept"}
    assert (session.compaction_count, session.last_compaction_summary) == (1, "the first turn")


def test_replace_with_no_messages_empties_the_session(repo: SessionRepository) -> None:
    repo.get_or_create(KEY)
    repo.append_messages(KEY, [NewMessage("user", "a"), NewMessage("user", "b")])
    empties: list[Sequence[NewMessage]] = [[], (), UserList()]
    for empty in empties:
        assert repo.replace_messages(KEY, empty) == []
        assert repo.get_history(KEY) == []
        session = repo.get(KEY)
        assert session is not None
        assert session.message_count == 0


def test_replace_touches_only_its_own_session_and_search_follows(
    repo: SessionRepository,
) -> None:
    repo.get_or_create(KEY)
    repo.get_or_create(OTHER)
    repo.append_message(KEY, "user", "zanzibar ferry times")
    theirs = repo.append_message(OTHER, "user", "zanzibar for bob")
    repo.replace_messages(KEY, [NewMessage("user", "timbuktu buses")])
    assert repo.get_history(OTHER) == [theirs]
    assert [hit.key for hit in repo.search_messages("zanzibar")] == [OTHER]
    assert [hit.message.content for hit in repo.search_messages("timbuktu")] == ["timbuktu buses"]


def test_a_count_left_wrong_by_another_program_becomes_true(
    repo: SessionRepository, store: Engine
) -> None:
    repo.get_or_create(KEY)
    repo.append_message(KEY, "user", "hello")
    run_sql(store, "UPDATE sessions SET message_count = 40")
    repo.replace_messages(KEY, [NewMessage("user", "a"), NewMessage("user", "b")])
    session = repo.get(KEY)
    assert session is not None
    assert session.message_count == 2


def test_a_failed_insert_leaves_the_old_history_whole(
    repo: SessionRepository, store: Engine
) -> None:
    """The deletion and the insertion are one transaction: a new row the database
    refuses (here a trigger another program added) rolls the deletion back too."""
    repo.get_or_create(KEY)
    repo.append_messages(KEY, [NewMessage("user", f"old {i}") for i in range(3)])
    refuse_boom(store)
    before = snapshot(store)
    with pytest.raises(Exception, match="boom refused"):
        repo.replace_messages(KEY, [NewMessage("user", "fine"), NewMessage("user", "boom")])
    assert snapshot(store) == before


def test_readers_see_the_old_history_or_the_new_one_never_a_mix(
    repo: SessionRepository,
) -> None:
    repo.get_or_create(KEY)
    old = [m.content for m in repo.append_messages(KEY, [NewMessage("user", "old")] * 30)]
    new = ["new"] * 20
    seen: set[tuple[object, ...]] = set()
    done = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not done.is_set():
                seen.add(tuple(m.content for m in repo.get_history(KEY)))
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for turn in range(20):
            contents = new if turn % 2 == 0 else old
            repo.replace_messages(KEY, [NewMessage("user", text) for text in contents])
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert seen <= {tuple(old), tuple(new)}


def test_replacing_the_newest_messages_keeps_the_older_ones(repo: SessionRepository) -> None:
    repo.get_or_create(KEY)
    old = repo.append_messages(KEY, [NewMessage("user", f"old {i}") for i in range(6)], tokens=4)
    new = repo.replace_messages(
        KEY,
        [NewMessage(Role.SYSTEM, "the last four, compacted")],
        replacing=old[2:],
    )
    assert repo.get_history(KEY) == [*old[:2], *new]
    assert (new[0].id or 0) > (old[-1].id or 0)
    session = repo.get(KEY)
    assert session is not None
    assert (session.message_count, session.token_usage) == (3, 4)
    assert sorted(str(hit.message.content) for hit in repo.search_messages("old")) == [
        "old 0",
        "old 1",
    ]
    # Replacing the newest message by nothing removes it, as a pop would.
    assert repo.replace_messages(KEY, [], replacing=new) == []
    assert repo.get_history(KEY) == old[:2]


def test_replacing_messages_that_are_no_longer_the_newest_writes_nothing(
    repo: SessionRepository, store: Engine
) -> None:
    """A rewrite computed from a history that has moved on (a message appended, popped,
    deleted or rewritten since it was read, or messages that were never the newest) is
    refused whole."""
    repo.get_or_create(KEY)
    repo.get_or_create(OTHER)
    read = repo.append_messages(KEY, [NewMessage("user", f"m{i}") for i in range(4)])
    theirs = repo.append_message(OTHER, "user", "another session's newest")
    summary = [NewMessage(Role.SYSTEM, "summary")]
    stale: list[list[Message]] = [
        read[:3],  # not the newest
        read[1:3],
        [*read[2:], theirs],  # another session's message
        [read[0], read[3]],  # a gap
        [*read[:3], read[3].model_copy(update={"content": "not what it says"})],
    ]
    before = snapshot(store)
    for replacing in stale:
        with pytest.raises(HistoryChangedError):
            repo.replace_messages(KEY, summary, replacing=replacing)
    assert snapshot(store) == before
    appended = repo.append_message(KEY, "user", "written meanwhile")
    with pytest.raises(HistoryChangedError):
        repo.replace_messages(KEY, summary, replacing=read)
    assert repo.get_history(KEY) == [*read, appended]
    repo.pop_message(KEY)
    repo.pop_message(KEY)
    with pytest.raises(HistoryChangedError):
        repo.replace_messages(KEY, summary, replacing=read)
    assert repo.get_history(KEY) == read[:3]


def test_a_summary_that_took_a_read_messages_id_is_not_replaced(
    repo: SessionRepository,
) -> None:
    """`compact`'s summary takes the id of the newest message it removes: a rewrite of
    messages read before that compaction finds the same ids but not the same messages,
    and is refused, so the summary it never read stays."""
    repo.get_or_create(KEY)
    read = repo.append_messages(KEY, [NewMessage("user", f"m{i}") for i in range(6)])
    repo.compact(KEY, keep_last=1, summary="what m0 to m4 said")
    history = repo.get_history(KEY)
    assert [m.id for m in history] == [m.id for m in read[4:]]
    with pytest.raises(HistoryChangedError):
        repo.replace_messages(KEY, [NewMessage(Role.SYSTEM, "stale")], replacing=read[4:])
    assert repo.get_history(KEY) == history
    # What it read now, it may rewrite.
    repo.replace_messages(KEY, [NewMessage(Role.SYSTEM, "fresh")], replacing=history)
    assert [m.content for m in repo.get_history(KEY)] == ["fresh"]


def test_expired_messages_ahead_of_the_replaced_ones_go_too(
    repo: SessionRepository, store: Engine
) -> None:
    """With `expired`, the oldest messages go while it calls them expired (read page by
    page), up to the first it keeps; the messages after that one stay, expired or not.
    It is asked in the same write transaction: when it raises, nothing is written."""
    repo.get_or_create(KEY)
    stale = [NewMessage("user", "stale")] * 1100  # more than one page of them
    kept = [NewMessage("user", "kept"), NewMessage("user", "stale"), NewMessage("user", "kept")]
    repo.append_messages(KEY, [*stale, *kept, NewMessage("user", "newest")])
    asked: list[object] = []

    def expired(message: Message) -> bool:
        asked.append(message.content)
        return message.content == "stale"

    read = repo.get_history(KEY, limit=1)
    before = repo.get_history(KEY)
    repo.replace_messages(
        KEY, [NewMessage(Role.SYSTEM, "summary")], replacing=read, expired=expired
    )
    assert [m.content for m in repo.get_history(KEY)] == ["kept", "stale", "kept", "summary"]
    assert asked == ["stale"] * 1100 + ["kept"]
    session = repo.get(KEY)
    assert session is not None
    assert session.message_count == 4

    def refuse(message: Message) -> bool:
        raise RuntimeError("cannot tell")

    read = repo.get_history(KEY, limit=1)
    state = snapshot(store)
    with pytest.raises(RuntimeError, match="cannot tell"):
        repo.replace_messages(KEY, [], replacing=read, expired=refuse)
    assert snapshot(store) == state
    assert len(before) == 1104


async def _async_expired(message: Message) -> bool:
    return False


def _generating(message: Message) -> Iterator[bool]:
    yield False


class _AsyncCall:
    async def __call__(self, message: Message) -> bool:
        return False


def test_an_expired_that_answers_with_an_awaitable_writes_nothing(
    repo: SessionRepository, store: Engine
) -> None:
    """A plain function that returns a coroutine (or any awaitable) cannot be awaited
    inside the write transaction, and an unawaited coroutine is no answer: the call is
    refused naming `expired`, the transaction rolled back, no message expired."""
    repo.get_or_create(KEY)
    repo.append_messages(KEY, [NewMessage("user", "old"), NewMessage("user", "newest")])
    read = repo.get_history(KEY, limit=1)
    before = snapshot(store)
    answers: list[Any] = []

    def deferred(message: Message) -> Any:
        answer = _async_expired(message)
        answers.append(answer)
        return answer

    with pytest.raises(ValueError, match=r"expired: returned an awaitable or a generator"):
        repo.replace_messages(KEY, [NewMessage(Role.SYSTEM, "s")], replacing=read, expired=deferred)
    assert snapshot(store) == before
    assert len(answers) == 1
    assert answers[0].cr_frame is None  # closed: never awaited, and no warning about it

    async def agen(message: Message) -> AsyncIterator[bool]:
        yield False

    for answer in (lambda m: agen(m), lambda m: (no for no in [False])):
        with pytest.raises(ValueError, match=r"expired: returned an awaitable or a generator"):
            repo.replace_messages(KEY, [], replacing=read, expired=answer)
    assert snapshot(store) == before


@pytest.mark.parametrize("pages", [1, 2])
@pytest.mark.parametrize("then", ["a kept one", "the replaced ones"])
def test_whole_pages_of_expired_messages_go(repo: SessionRepository, pages: int, then: str) -> None:
    """`expired` reads the oldest messages a page at a time: a run of expired messages
    that fills whole pages goes whole, whatever follows it."""
    repo.get_or_create(KEY)
    stale = [NewMessage("user", "stale")] * (_EXPIRED_PAGE * pages)
    kept = [NewMessage("user", "kept")] if then == "a kept one" else []
    repo.append_messages(KEY, [*stale, *kept, NewMessage("user", "newest")])
    read = repo.get_history(KEY, limit=1)
    repo.replace_messages(
        KEY, [], replacing=read, expired=lambda message: message.content == "stale"
    )
    assert [m.content for m in repo.get_history(KEY)] == [m.content for m in kept]
    session = repo.get(KEY)
    assert session is not None
    assert session.message_count == len(kept)


def test_of_two_rewrites_of_one_read_only_one_lands(repo: SessionRepository) -> None:
    """Two compactions computed from the same read race: the first to take the write
    lock replaces the messages, the other finds them gone and writes nothing."""
    repo.get_or_create(KEY)
    read = repo.append_messages(KEY, [NewMessage("user", f"m{i}") for i in range(10)])
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def rewrite(name: str) -> None:
        barrier.wait()
        try:
            repo.replace_messages(KEY, [NewMessage(Role.SYSTEM, name)], replacing=read[4:])
            outcomes.append(name)
        except HistoryChangedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=rewrite, args=(f"by {i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes).count("refused") == 3
    [winner] = [name for name in outcomes if name != "refused"]
    assert [m.content for m in repo.get_history(KEY)] == [*(m.content for m in read[:4]), winner]


def test_replace_of_a_missing_session_raises_and_creates_nothing(
    repo: SessionRepository, store: Engine
) -> None:
    before = snapshot(store)
    with pytest.raises(SessionNotFoundError):
        repo.replace_messages(OTHER, [NewMessage("user", "hi")])
    with pytest.raises(SessionNotFoundError):
        repo.replace_messages(OTHER, [])
    assert snapshot(store) == before


@before_io
def test_replace_refuses_bad_arguments_another_agent_and_a_bad_key_before_any_io(
    repo: SessionRepository, store: Engine
) -> None:
    repo.get_or_create(KEY)
    stored = repo.append_messages(KEY, [NewMessage("user", "hello"), NewMessage("user", "you")])
    before = snapshot(store)
    refusals: list[tuple[object, dict[str, object], str]] = [
        (None, {}, r"messages: must be a sequence"),
        ("text", {}, r"messages: must be a sequence"),
        ("", {}, r"messages: must be a sequence"),
        (b"", {}, r"messages: must be a sequence"),
        ([NewMessage("user", "ok"), 3], {}, r"messages\[1\]"),
        ([{"role": "user"}], {}, r"messages\[0\]"),
        ([NewMessage("user", "ok")], {"tokens": -1}, "tokens"),
        ([], {"output_tokens": 1.5}, "output_tokens"),
        ([], {"replacing": []}, r"replacing: must hold at least one"),
        ([], {"replacing": 7}, r"replacing: must be a sequence"),
        ([], {"replacing": "12"}, r"replacing: must be a sequence"),
        ([], {"replacing": [1]}, r"replacing\[0\]: must be a stored Message"),
        ([], {"replacing": [*stored, NewMessage("user", "x")]}, r"replacing\[2\]"),
        ([], {"replacing": stored[::-1]}, r"replacing: the messages must be in increasing"),
        ([], {"replacing": [stored[0], stored[0]]}, r"replacing: the messages must be in"),
        ([], {"replacing": [stored[0].model_copy(update={"id": None})]}, r"replacing\[0\]"),
        ([], {"expired": lambda m: True}, r"expired: .* goes with `replacing`"),
        ([], {"replacing": stored, "expired": "yes"}, r"expired: must be callable"),
        (
            [],
            {"replacing": stored, "expired": _async_expired},
            r"expired: .*coroutine or generator function",
        ),
        ([], {"replacing": stored, "expired": _AsyncCall()}, r"expired: .*coroutine or gen"),
        ([], {"replacing": stored, "expired": _generating}, r"expired: .*coroutine or gen"),
    ]
    for messages, counts, field in refusals:
        with pytest.raises(ValueError, match=field), no_statements():
            repo.replace_messages(KEY, messages, **counts)  # type: ignore[arg-type]
    with pytest.raises(AccessDeniedError), no_statements():
        repo.for_agent("agent-2").replace_messages(KEY, [])
    with pytest.raises(ValueError, match="peer_id"), no_statements():
        repo.replace_messages("agent-1:telegram:bot-A:dm:", [])
    assert snapshot(store) == before
