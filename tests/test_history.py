"""get_history: chronological order, windows and cursors; get_history_text: the same
history as the cells stored."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import pytest
from sqlalchemy import Engine

from aisopod_session import (
    Message,
    NewMessage,
    Role,
    SessionKey,
    SessionNotFoundError,
    SessionRepository,
)
from aisopod_session.statements import HISTORY_TEXT, KEY, SELECT_SESSION_ID, history
from tests.dbtools import before_io, no_statements


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """Every test of this module runs on SQLite and on PostgreSQL (see conftest), but
    refusals made before any I/O, on SQLite alone (`dbtools.before_io`)."""
    return store_repo


@pytest.fixture
def filled(repo: SessionRepository, key: SessionKey, other_key: SessionKey) -> list[Message]:
    """25 messages in `key`, interleaved with messages of `other_key` so ids have gaps."""
    repo.get_or_create(key)
    repo.get_or_create(other_key)
    stored: list[Message] = []
    for i in range(25):
        stored.extend(repo.append_messages(key, [NewMessage(Role.USER, f"m{i}")]))
        repo.append_message(other_key, Role.USER, f"other {i}")
    return stored


def contents(messages: list[Message]) -> list[str]:
    texts: list[str] = []
    for message in messages:
        assert isinstance(message.content, str), message
        texts.append(message.content)
    return texts


def id_of(message: Message) -> int:
    assert message.id is not None
    return message.id


def test_whole_history_is_chronological(
    repo: SessionRepository, key: SessionKey, filled: list[Message]
) -> None:
    history = repo.get_history(key)
    assert contents(history) == [f"m{i}" for i in range(25)]
    assert history == filled


def test_limit_gives_the_newest_in_chronological_order(
    repo: SessionRepository, key: SessionKey, filled: list[Message]
) -> None:
    assert contents(repo.get_history(key, limit=3)) == ["m22", "m23", "m24"]
    assert repo.get_history(key, limit=100) == filled
    assert repo.get_history(key, limit=0) == []


def test_before_id_pages_backwards_through_everything_once(
    repo: SessionRepository, key: SessionKey, filled: list[Message]
) -> None:
    pages: list[list[Message]] = []
    before: int | None = None
    while True:
        page = repo.get_history(key, limit=7, before_id=before)
        if not page:
            break
        pages.append(page)
        before = id_of(page[0])
    assert [len(p) for p in pages] == [7, 7, 7, 4]
    assert [m for page in reversed(pages) for m in page] == filled


def test_after_id_with_limit_pages_forwards_through_everything_once(
    repo: SessionRepository, key: SessionKey, filled: list[Message]
) -> None:
    seen: list[Message] = []
    after = 0
    while page := repo.get_history(key, limit=10, after_id=after):
        seen.extend(page)
        after = id_of(page[-1])
    assert seen == filled
    assert contents(repo.get_history(key, limit=2, after_id=id_of(filled[4]))) == ["m5", "m6"]


def test_after_id_without_limit_gives_everything_after(
    repo: SessionRepository, key: SessionKey, filled: list[Message]
) -> None:
    assert repo.get_history(key, after_id=id_of(filled[21])) == filled[22:]


def test_before_and_after_bound_a_window(
    repo: SessionRepository, key: SessionKey, filled: list[Message]
) -> None:
    low, high = id_of(filled[5]), id_of(filled[12])
    assert repo.get_history(key, after_id=low, before_id=high) == filled[6:12]
    assert repo.get_history(key, after_id=low, before_id=high, limit=2) == filled[6:8]
    assert repo.get_history(key, before_id=high, limit=2) == filled[10:12]
    assert repo.get_history(key, after_id=high, before_id=low) == []


def test_an_empty_session_has_an_empty_history(repo: SessionRepository) -> None:
    key = SessionKey("a", "c", "x", "dm", "quiet")
    repo.get_or_create(key)
    assert repo.get_history(key) == []
    assert repo.get_history(key, limit=5) == []


def test_missing_session_is_an_error_not_an_empty_history(
    repo: SessionRepository, key: SessionKey
) -> None:
    with pytest.raises(SessionNotFoundError):
        repo.get_history(key, limit=5)


@before_io
@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("limit", -1),
        ("limit", 2.5),
        ("limit", "10"),
        ("limit", True),
        ("before_id", "7"),
        ("after_id", 1.0),
    ],
)
def test_bad_window_arguments_name_the_argument(
    repo: SessionRepository, key: SessionKey, filled: list[Message], argument: str, value: object
) -> None:
    with pytest.raises(ValueError, match=argument), no_statements():
        repo.get_history(key, **{argument: value})  # type: ignore[arg-type]


def test_get_history_text_gives_the_stored_cells_in_chronological_order(
    repo: SessionRepository, key: SessionKey, filled: list[Message]
) -> None:
    repo.append_message(key, Role.TOOL, {"rain": [4, None]}, meta={"call": "c1"})
    history = repo.get_history(key)
    rows = repo.get_history_text(key)
    assert all(isinstance(cell, str) for row in rows for cell in row)
    # The cells are the stored JSON text (no spaces), which decodes to what get_history read.
    assert rows[-1] == ("tool", '{"rain":[4,null]}', '{"call":"c1"}')
    assert [(role, json.loads(content), json.loads(meta)) for role, content, meta in rows] == [
        (str(m.role), m.content, m.meta) for m in history
    ]
    assert repo.get_history_text(key, limit=3) == rows[-3:]
    assert repo.get_history_text(key, limit=100) == rows
    assert repo.get_history_text(key, limit=0) == []


def test_get_history_text_of_an_empty_or_missing_session(
    repo: SessionRepository, key: SessionKey
) -> None:
    for limit in (None, 0, 5):
        with pytest.raises(SessionNotFoundError):
            repo.get_history_text(key, limit=limit)
    repo.get_or_create(key)
    assert repo.get_history_text(key) == []
    assert repo.get_history_text(key, limit=5) == []


def test_get_history_text_tells_missing_from_empty_in_one_snapshot(
    store: Engine, key: SessionKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session created with its first message by another writer just as the call
    looks the session up (after finding no message) is either not there yet or there
    with its message: never there without one, a state that never existed."""
    repo = SessionRepository(store)
    writer = SessionRepository(store)
    looked_up = repo._text

    def create_meanwhile(query: Any) -> str:
        if query is SELECT_SESSION_ID:
            thread = threading.Thread(
                target=writer.apply_changes,
                args=(key,),
                kwargs={"create": True, "messages": [NewMessage(Role.USER, "first")]},
            )
            thread.start()
            thread.join()
        return looked_up(query)

    monkeypatch.setattr(repo, "_text", create_meanwhile)
    try:
        rows = repo.get_history_text(key)
    except SessionNotFoundError:
        rows = None
    assert writer.get_history_text(key) == [("user", '"first"', "{}")]
    assert rows in (None, [("user", '"first"', "{}")])


@before_io
@pytest.mark.parametrize("value", [-1, 2.5, "10", True])
def test_get_history_text_names_a_bad_limit(
    repo: SessionRepository, key: SessionKey, value: object
) -> None:
    with pytest.raises(ValueError, match="limit"), no_statements():
        repo.get_history_text(key, limit=value)  # type: ignore[arg-type]


def test_the_newest_messages_of_a_long_session_are_read_off_the_index_on_postgresql(
    pg_store: Engine,
) -> None:
    """On PostgreSQL the newest 50 of a session of thousands are read off
    `idx_messages_session_id` (session_id, id) from its end: no step of the plan reads
    more of the session's messages than the page (before migration 5 and the LATERAL
    read, every message of the session was read and sorted)."""
    repo = SessionRepository(pg_store)
    keys = [SessionKey("agent", "telegram", "bot", "dm", f"peer-{n}") for n in range(3)]
    for key in keys:
        repo.get_or_create(key)
    for turn in range(4):
        for key in keys:  # interleaved, as a gateway's sessions are
            repo.append_messages(key, [NewMessage(Role.USER, f"{turn}-{n}") for n in range(500)])
    sql = history(newest_first=True, limit=True, after=False, before=False).on(pg_store.dialect)
    page = {**dict(zip(KEY, keys[0].parts(), strict=True)), "limit": 50, "offset": 0}
    with pg_store.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        plan = [
            row[0]
            for row in conn.exec_driver_sql(
                f"EXPLAIN (ANALYZE, COSTS OFF) {sql.text}",
                sql.bind(page),
            )
        ]
    read = [line for line in plan if " on messages" in line]
    assert read, plan
    rows = [int(re.search(r"rows=(\d+)", line).group(1)) for line in read]  # type: ignore[union-attr]
    assert max(rows) <= 50, "\n".join(plan)
    history_page = repo.get_history(keys[0], limit=50)
    assert [m.content for m in history_page] == [f"3-{n}" for n in range(450, 500)]
    # get_history_text's statement is a LATERAL read too: with its session's id as an
    # InitPlan, the planner cannot know the session and reads all of it to sort it.
    text_sql = HISTORY_TEXT.on(pg_store.dialect)
    with pg_store.connect() as conn:
        text_plan = [
            row[0] for row in conn.exec_driver_sql(f"EXPLAIN {text_sql.text}", text_sql.bind(page))
        ]
    assert not any("InitPlan" in line for line in text_plan), "\n".join(text_plan)
    assert any(line.lstrip().startswith("->  Limit") for line in text_plan), text_plan
    assert [json.loads(row[1]) for row in repo.get_history_text(keys[0], limit=50)] == [
        f"3-{n}" for n in range(450, 500)
    ]
