"""Bad input of every field: a ValueError naming the field, raised before anything is
written, so the database is exactly as it was."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine

from aisopod_session import (
    NewMessage,
    Role,
    SessionFilter,
    SessionKey,
    SessionRepository,
    SessionStatus,
)
from aisopod_session.asyncrepository import INLINE_MESSAGES, INLINE_TEXT, fits_inline
from aisopod_session.validation import MAX_JSON_DEPTH, dump_json
from tests.dbtools import before_io, no_statements, snapshot


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """Every test of this module runs on SQLite and on PostgreSQL (see conftest), but
    refusals made before any I/O, on SQLite alone (`dbtools.before_io`)."""
    return store_repo


Call = Callable[[SessionRepository, SessionKey], object]


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"d": value}
    return value


class Unserialisable:
    pass


BEYOND_UTC = datetime(9999, 12, 31, 23, 59, tzinfo=timezone(-timedelta(hours=23, minutes=59)))
"""A time with no UTC time (it would be in the year 10000 there)."""

BAD_CALLS: dict[str, tuple[str, Call]] = {
    # key parts, given as text keys
    "empty agent": ("agent_id", lambda r, k: r.get_or_create(":telegram:a:dm:p")),
    "space channel": ("channel", lambda r, k: r.get_or_create("agent-1: :a:dm:p")),
    "long account": ("account_id", lambda r, k: r.get_or_create(f"a:c:{'x' * 256}:dm:p")),
    "control peer": ("peer_id", lambda r, k: r.get_or_create("a:c:acc:dm:p\x07")),
    "unknown peer kind": ("peer_kind", lambda r, k: r.get_or_create("a:c:acc:email:p")),
    "key not a key": ("key", lambda r, k: r.get_or_create(42)),  # type: ignore[arg-type]
    "short text key": ("key", lambda r, k: r.append_message("a:c:acc", "user", "x")),
    # messages
    "unknown role": ("role", lambda r, k: r.append_message(k, "narrator", "x")),
    "role not text": ("role", lambda r, k: r.append_message(k, 3, "x")),  # type: ignore[arg-type]
    "role unhashable": ("role", lambda r, k: r.append_message(k, ["user"], "x")),  # type: ignore[arg-type]
    "content not text": ("content", lambda r, k: r.append_message(k, "user", b"x")),  # type: ignore[arg-type]
    "content NaN": ("content", lambda r, k: r.append_message(k, "user", float("nan"))),
    "content too deep": (
        "content",
        lambda r, k: r.append_message(k, "user", nested(MAX_JSON_DEPTH)),
    ),
    "lone surrogate": ("content", lambda r, k: r.append_message(k, "user", "a\udc80b")),
    "tool_calls object, integer beyond 64 bits": (
        "tool_calls",
        lambda r, k: r.append_message(k, "assistant", "", tool_calls={"id": 2**64}),
    ),
    "tool_calls NaN": (
        "tool_calls",
        lambda r, k: r.append_message(k, "assistant", "", tool_calls=[{"x": float("nan")}]),
    ),
    "tool_calls inf": (
        "tool_calls",
        lambda r, k: r.append_message(k, "assistant", "", tool_calls=[float("inf")]),
    ),
    "tool_calls set": (
        "tool_calls",
        lambda r, k: r.append_message(k, "assistant", "", tool_calls=[{1, 2}]),
    ),
    "tool_calls object inside": (
        "tool_calls",
        lambda r, k: r.append_message(k, "assistant", "", tool_calls=[Unserialisable()]),
    ),
    "tool_calls int key": (
        "tool_calls",
        lambda r, k: r.append_message(k, "assistant", "", tool_calls=[{1: "a"}]),
    ),
    "tool_calls too deep": (
        "tool_calls",
        lambda r, k: r.append_message(k, "assistant", "", tool_calls=[nested(MAX_JSON_DEPTH)]),
    ),
    "tool_calls surrogate": (
        "tool_calls",
        lambda r, k: r.append_message(k, "assistant", "", tool_calls=["\ud800"]),
    ),
    "no messages": ("messages", lambda r, k: r.append_messages(k, [])),
    "messages a string": ("messages", lambda r, k: r.append_messages(k, "hello")),  # type: ignore[arg-type]
    "messages a single one": (
        "messages",
        lambda r, k: r.append_messages(k, NewMessage("user", "x")),  # type: ignore[arg-type]
    ),
    "message not a message": (
        "messages[1]",
        lambda r, k: r.append_messages(k, [NewMessage("user", "ok"), 5]),  # type: ignore[list-item]
    ),
    "bad message in a batch": (
        "role",
        lambda r, k: r.append_messages(k, [NewMessage("user", "ok"), {"role": "x", "content": ""}]),
    ),
    # tokens
    "negative tokens": ("tokens", lambda r, k: r.append_message(k, "user", "x", tokens=-1)),
    "float tokens": ("tokens", lambda r, k: r.append_message(k, "user", "x", tokens=1.5)),  # type: ignore[arg-type]
    "bool tokens": ("tokens", lambda r, k: r.append_message(k, "user", "x", tokens=True)),
    "text tokens": ("tokens", lambda r, k: r.append_message(k, "user", "x", tokens="3")),  # type: ignore[arg-type]
    # metadata
    "changes a list": ("changes", lambda r, k: r.update_metadata(k, [("a", 1)])),  # type: ignore[arg-type]
    "changes NaN": ("changes", lambda r, k: r.update_metadata(k, {"a": float("nan")})),
    "changes int key": ("changes", lambda r, k: r.update_metadata(k, {1: "a"})),  # type: ignore[dict-item]
    "changes object": ("changes", lambda r, k: r.update_metadata(k, {"a": Unserialisable()})),
    "changes too deep": ("changes", lambda r, k: r.update_metadata(k, nested(MAX_JSON_DEPTH))),
    "changes datetime": ("changes", lambda r, k: r.update_metadata(k, {"at": datetime.now()})),
    # status
    "unknown status": ("status", lambda r, k: r.set_status(k, "deleted")),
    "status not text": ("status", lambda r, k: r.set_status(k, 1)),  # type: ignore[arg-type]
    # list / count
    "negative limit": ("limit", lambda r, k: r.list_sessions(limit=-1)),
    "negative offset": ("offset", lambda r, k: r.list_sessions(offset=-5)),
    "filter naive time": (
        "created_after",
        lambda r, k: r.list_sessions({"created_after": datetime(2026, 1, 1)}),
    ),
    "filter time with no UTC time": (
        "updated_after",
        lambda r, k: r.list_sessions({"updated_after": BEYOND_UTC}),
    ),
    "prune time with no UTC time": (
        "updated_before",
        lambda r, k: r.prune(updated_before=BEYOND_UTC),
    ),
    "filter bad status": ("status", lambda r, k: r.count_sessions({"status": "gone"})),
    "filter unknown field": ("colour", lambda r, k: r.count_sessions({"colour": "red"})),
    "filter empty agent": ("agent_id", lambda r, k: r.list_sessions({"agent_id": " "})),
    "filter wrong type": ("filter", lambda r, k: r.list_sessions("agent-1")),  # type: ignore[arg-type]
    "bad session id": ("id: must be", lambda r, k: r.get_by_id("1")),  # type: ignore[arg-type]
}


def test_no_statements_sees_the_statements_of_both_apis(
    populated: SessionRepository, key: SessionKey
) -> None:
    """The guard of the refusals below (`dbtools.no_statements`) fails on a call that
    reaches the database, whichever thread of either API runs it: the async API runs
    small calls inline and writes of many messages or much text on its worker thread."""
    with pytest.raises(AssertionError, match="statements ran"), no_statements():
        populated.get(key)
    with pytest.raises(AssertionError, match="statements ran"), no_statements():
        populated.append_messages(key, [NewMessage(Role.USER, "x")] * (INLINE_MESSAGES + 1))
    with pytest.raises(AssertionError, match="statements ran"), no_statements():
        populated.append_message(key, Role.USER, "x" * (INLINE_TEXT + 1))


def test_the_inline_size_rule_counts_messages_given_as_any_mapping() -> None:
    """The async API writes a batch inline only if its text is small (`fits_inline`):
    a message given as a mapping that is no dict (which `append_messages` takes) counts
    too, so a big one goes to a worker thread instead of holding the event loop."""
    big, small = "x" * (INLINE_TEXT + 1), "x" * 10
    for message in (dict, MappingProxyType):
        assert not fits_inline([message({"role": "user", "content": big})])
        assert not fits_inline([message({"role": "user", "content": "", "meta": {"k": big}})])
        assert fits_inline([message({"role": "user", "content": small, "tool_calls": [1.5]})])


@pytest.fixture
def populated(repo: SessionRepository, key: SessionKey) -> SessionRepository:
    repo.get_or_create(key)
    repo.append_message(key, Role.USER, "before")
    repo.update_metadata(key, {"kept": True})
    return repo


@before_io
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_rejected_naming_the_field_and_nothing_is_written(
    populated: SessionRepository, key: SessionKey, store: Engine, case: str
) -> None:
    field, call = BAD_CALLS[case]
    before = snapshot(store)
    with pytest.raises(ValueError, match=re.escape(field)), no_statements():
        call(populated, key)
    assert snapshot(store) == before


def test_none_content_and_tool_calls_that_are_an_object_are_accepted(
    populated: SessionRepository, key: SessionKey, store: Engine
) -> None:
    """Content and tool calls are any JSON value: None content and an object of tool
    calls, refused by earlier versions, are stored as JSON text and read back."""
    first = populated.append_message(key, "user", None)
    second = populated.append_message(key, "assistant", "", tool_calls={"id": 1})
    assert (first.content, first.tool_calls) == (None, None)
    assert (second.content, second.tool_calls) == ("", {"id": 1})
    history = populated.get_history(key)
    assert [(m.content, m.tool_calls) for m in history] == [
        ("before", None),
        (None, None),
        ("", {"id": 1}),
    ]
    with store.connect() as connection:
        cells = connection.exec_driver_sql(
            "SELECT content, tool_calls FROM messages ORDER BY id"
        ).all()
    assert [tuple(row) for row in cells] == [
        (dump_json("before"), None),
        ("null", None),
        ('""', '{"id":1}'),
    ]


def test_filter_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="colour"):
        SessionFilter.model_validate({"colour": "red"})


def test_new_message_is_validated_on_construction() -> None:
    with pytest.raises(ValidationError) as caught:
        NewMessage("robot", "x")
    assert caught.value.errors()[0]["loc"] == ("role",)
    message = NewMessage(" Assistant ", "hi", ({"id": "t"},))  # type: ignore[arg-type]
    assert message.role is Role.ASSISTANT
    assert message.tool_calls == [{"id": "t"}]


@pytest.mark.parametrize(
    "build",
    [
        lambda: NewMessage("user", {"bad": float("nan"), "text": "s3cr3t"}),
        lambda: NewMessage("user", "s3cr3t", meta={"bad": {1, 2}}),
        lambda: NewMessage("robot", "s3cr3t"),
        lambda: SessionFilter.model_validate({"meta": {"s3cr3t": 1}, "colour": "s3cr3t"}),
    ],
)
def test_errors_never_repeat_the_refused_values(build: Callable[[], object]) -> None:
    """Chat text and metadata stay out of error messages (and so out of logs): the error
    names the field and the problem only. (pydantic would also print a repr of
    the input, which for a value of megabytes took seconds.)"""
    with pytest.raises(ValueError, match=r"content|meta|role|colour") as caught:
        build()
    assert "s3cr3t" not in str(caught.value)
    assert "input_value" not in str(caught.value)


def test_json_at_the_depth_limit_is_accepted(populated: SessionRepository, key: SessionKey) -> None:
    deep = nested(MAX_JSON_DEPTH - 1)
    assert populated.update_metadata(key, deep, replace=True).meta == deep
    stored = populated.append_message(key, "assistant", "", tool_calls=[nested(MAX_JSON_DEPTH - 2)])
    assert stored.tool_calls == [nested(MAX_JSON_DEPTH - 2)]


def test_sql_meta_characters_are_plain_data_in_every_text_field(
    repo: SessionRepository, store: Engine
) -> None:
    evil = "'; DROP TABLE sessions; --"
    key = SessionKey(evil, evil, evil, "dm", evil)
    repo.get_or_create(key)
    repo.append_message(key, Role.USER, evil, tool_calls=[{evil: evil}])
    repo.update_metadata(key, {evil: evil})
    session = repo.get(key)
    assert session is not None
    assert session.key == key
    assert session.meta == {evil: evil}
    history = repo.get_history(key)
    assert history[0].content == evil
    assert history[0].tool_calls == [{evil: evil}]
    assert repo.count_sessions({"agent_id": evil, "peer_id": evil}) == 1
    assert repo.set_status(key, SessionStatus.IDLE).status is SessionStatus.IDLE
    assert {"sessions", "messages"} <= set(snapshot(store))


@before_io
@pytest.mark.parametrize(
    ("field", "call"),
    [
        ("tokens", lambda r, k: r.append_message(k, "user", "x", tokens=2**63)),
        ("limit", lambda r, k: r.list_sessions(limit=2**64)),
        ("offset", lambda r, k: r.list_sessions(offset=2**63)),
        ("before_id", lambda r, k: r.get_history(k, before_id=-(2**63) - 1)),
        ("id", lambda r, k: r.get_by_id(2**70)),
    ],
)
def test_integers_beyond_64_bits_are_rejected(
    populated: SessionRepository, key: SessionKey, store: Engine, field: str, call: Call
) -> None:
    before = snapshot(store)
    with pytest.raises(ValueError, match=rf"{field}: must fit in a 64-bit"), no_statements():
        call(populated, key)
    assert snapshot(store) == before
