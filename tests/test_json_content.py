"""JSON content (issue 14): a message's `content` and `tool_calls` are any JSON value and its
`meta` a JSON object, stored as compact JSON text (`json.dumps(value, ensure_ascii=False,
separators=(",", ":"))`, byte for byte, on SQLite and on PostgreSQL alike); bad values are
refused naming the field, nothing written; cells other programs wrote are read leniently
(history never fails or drops a row); timestamps in any RFC 3339 form are read; the
input/output token split adds up exactly, also under concurrent writers.

Every test that touches a store runs on SQLite and on PostgreSQL, and where it goes
through `store_repo` through the sync and the async API (see conftest). A test of many
values runs them all on the one store it is given, each value on a session key of its own
(`check_each`), and names every value that failed (a fresh store per value cost ~0.1 s
each on PostgreSQL). The property test runs a quick number of examples by default, all on
one store; `AISOPOD_STRESS=<n>` runs n times as many, and the concurrent writers write n
times as much.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any, TypeVar

import pytest
from freezegun import freeze_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from aisopod_session import (
    AsyncSessionRepository,
    Message,
    NewMessage,
    Role,
    SessionKey,
    SessionRepository,
    open_async_database,
    open_database,
)
from aisopod_session.validation import MAX_JSON_DEPTH, check_json, first_nul
from tests.dbtools import (
    AwaitingRepository,
    before_io,
    event_loop_thread,
    no_statements,
    python_clock,
    run_on,
    run_sql,
    run_threads,
    snapshot,
    stress,
)
from tests.forking import describe, fork, wait

MAX_BIGINT = 2**63 - 1
STRESS = stress()
FIXED_WIDTH = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00")
"""The form this library writes every timestamp in."""
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
GOOD_STAMP = "2024-01-01T00:00:00.000000+00:00"

T = TypeVar("T")


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """Through both APIs on both backends (see conftest)."""
    return store_repo


# --- helpers ------------------------------------------------------------------------------


def dump(value: Any) -> str:
    """The stored text the contract promises."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def on_postgresql(store: Engine) -> bool:
    return store.dialect.name == "postgresql"


def raw_row(store: Engine, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    """One row read with plain SQL through the backend's driver (`?` parameters)."""
    if on_postgresql(store):
        sql = sql.replace("?", "%s")
    with store.connect() as connection:
        found = connection.exec_driver_sql(sql, params).fetchone()
    assert found is not None, f"no row for {sql} {params}"
    return tuple(found)


def raw_message(store: Engine, message_id: int | None) -> tuple[Any, ...]:
    """content, tool_calls, metadata, role and created_at of a message, as stored."""
    assert message_id is not None
    return raw_row(
        store,
        "SELECT content, tool_calls, metadata, role, created_at FROM messages WHERE id = ?",
        (message_id,),
    )


def raw_counters(store: Engine, session_id: int | None) -> tuple[int, ...]:
    """message_count, token_usage, input_tokens, output_tokens, as stored."""
    assert session_id is not None
    row = raw_row(
        store,
        "SELECT message_count, token_usage, input_tokens, output_tokens FROM sessions WHERE id = ?",
        (session_id,),
    )
    return tuple(int(value) for value in row)


def insert_raw_message(
    store: Engine,
    session_id: int | None,
    *,
    role: str = "user",
    content: Any = '"hi"',
    tool_calls: Any = None,
    created_at: str = GOOD_STAMP,
    metadata: str = "{}",
) -> int:
    """A message row written with plain SQL, as another program would; its id."""
    assert session_id is not None
    run_sql(
        store,
        "INSERT INTO messages (session_id, role, content, tool_calls, created_at, metadata) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (session_id, role, content, tool_calls, created_at, metadata),
    )
    (newest,) = raw_row(store, "SELECT max(id) FROM messages")
    return int(newest)


def same_json(actual: Any, expected: Any, path: str = "$") -> None:
    """Equal as JSON and of the same JSON type all the way down: `True` is not `1`, `1` is
    not `1.0`, floats bit for bit (`-0.0` is not `0.0`), key order kept; tuples in
    `expected` read back as lists."""
    if expected is None or isinstance(expected, bool):
        assert actual is expected, f"{path}: got {actual!r}, expected {expected!r}"
    elif isinstance(expected, int):
        assert type(actual) is int, f"{path}: got {actual!r}, expected int {expected!r}"
        assert actual == expected, f"{path}: got {actual!r}, expected {expected!r}"
    elif isinstance(expected, float):
        assert type(actual) is float, f"{path}: got {actual!r}, expected float {expected!r}"
        assert struct.pack("<d", actual) == struct.pack("<d", expected), (
            f"{path}: got {actual!r}, expected {expected!r}"
        )
    elif isinstance(expected, str):
        assert type(actual) is str, f"{path}: got {actual!r}, expected str {expected!r}"
        assert actual == expected, f"{path}: got {actual!r}, expected {expected!r}"
    elif isinstance(expected, list | tuple):
        assert type(actual) is list, f"{path}: got {actual!r}, expected a list"
        assert len(actual) == len(expected), f"{path}: got {actual!r}, expected {expected!r}"
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            same_json(got, want, f"{path}[{index}]")
    elif isinstance(expected, dict):
        assert type(actual) is dict, f"{path}: got {actual!r}, expected a dict"
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for name, want in expected.items():
            same_json(actual[name], want, f"{path}.{name}")
    else:  # pragma: no cover - a mistake in a test
        raise TypeError(f"{path}: {type(expected).__name__} is not a JSON type")


def deep_lists(levels: int, leaf: Any = 1) -> Any:
    """`leaf` inside `levels` lists: JSON depth `levels + 1` (a scalar is depth 1)."""
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


def deep_dicts(levels: int) -> Any:
    """An int inside `levels` dicts: JSON depth `levels + 1`."""
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    return value


def json_depth(value: Any) -> int:
    """Depth as the store counts it: a scalar or an empty container is 1."""
    if isinstance(value, dict):
        return 1 + max(map(json_depth, value.values()), default=0)
    if isinstance(value, list | tuple):
        return 1 + max(map(json_depth, value), default=0)
    return 1


def has_nul(value: Any) -> bool:
    """Whether a string anywhere in `value` (dict keys too) holds NUL."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in name or has_nul(item) for name, item in value.items())
    if isinstance(value, list | tuple):
        return any(map(has_nul, value))
    return False


def without_nul(value: Any) -> Any:
    """`value` with every NUL taken out of its strings (dict keys too)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {name.replace("\x00", ""): without_nul(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_nul(item) for item in value]
    return value


FAILED = (Exception, pytest.fail.Exception)
"""What a failing check raises: an assertion, `pytest.raises`' "DID NOT RAISE" (a
BaseException), or whatever the code under test raised."""


def case_key(index: int) -> SessionKey:
    """The session key of a test's case `index` (`check_each`)."""
    return SessionKey("agent-1", "telegram", "bot-A", "dm", f"case-{index}")


def check_each(cases: Mapping[str, T], check: Callable[[SessionKey, T], None]) -> None:
    """Run `check(key, value)` for every case on the test's one store, each case on a
    session key of its own (`case_key`), and fail at the end naming every case that failed
    and how: a broken value neither hides the others nor goes unnamed."""
    assert cases, "no cases to check"
    failures: list[str] = []
    for index, (case, value) in enumerate(cases.items()):
        try:
            check(case_key(index), value)
        except FAILED as exc:
            failures.append(f"case {case!r}: {type(exc).__name__}: {exc}")
    if failures:
        pytest.fail(f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures))


@contextmanager
def labelled(label: str) -> Iterator[None]:
    """A failure inside the block, re-raised as an AssertionError starting with `label`."""
    try:
        yield
    except FAILED as exc:
        raise AssertionError(f"{label}: {type(exc).__name__}: {exc}") from exc


TABLES = {
    # Every relation made in a schema depends on it: pg_depend finds the schema's tables by
    # an index, where pg_class (a seq scan, and the suite bloats it) takes a millisecond.
    "postgresql": "SELECT c.relname FROM pg_depend d JOIN pg_class c ON c.oid = d.objid"
    " WHERE d.refclassid = 'pg_namespace'::regclass"
    " AND d.refobjid = current_schema()::regnamespace"
    " AND d.classid = 'pg_class'::regclass AND c.relkind IN ('r', 'p') ORDER BY 1",
    "sqlite": "SELECT name FROM sqlite_master"
    " WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY 1",
}
"""The tables `dbtools.snapshot` reads (SQLAlchemy's `get_table_names`), by one query."""


def everything(store: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """What `dbtools.snapshot(store)` gives, every row of every table (the tables looked up
    afresh each time), in a fraction of its time on PostgreSQL, where its reflection takes
    ~5 ms and `refused` takes two per call. The bad-JSON test checks that the two agree."""
    with store.connect() as connection:
        names = [name for (name,) in connection.exec_driver_sql(TABLES[store.dialect.name])]
        return {
            name: [
                tuple(row)
                for row in connection.exec_driver_sql(f'SELECT * FROM "{name}" ORDER BY 1')
            ]
            for name in names
        }


def refused(
    store: Engine, call: Callable[[], object], field: str, *, exact_start: bool = False
) -> str:
    """`call` raises a `ValueError` naming `field` (as `field:`; at the very start of the
    message with `exact_start`), and writes nothing. The message."""
    before = everything(store)
    with pytest.raises(ValueError, match=re.escape(field)) as raised, no_statements():
        call()
    message = str(raised.value)
    if exact_start:
        assert message.startswith(f"{field}:"), message
    else:
        assert f"{field}:" in message, message
    assert everything(store) == before, f"written although refused: {message}"
    return message


# --- 1. content is any JSON value ---------------------------------------------------------

STRINGS_THAT_LOOK_LIKE_JSON = [
    "123",
    "-1.5e3",
    "null",
    "true",
    "false",
    '{"a": 1}',
    "[1, 2]",
    '"quoted"',
    "",
    " ",
    "not json {",
]

CONTENT_VALUES: dict[str, Any] = {
    **{f"str {text!r}": text for text in STRINGS_THAT_LOOK_LIKE_JSON},
    "non-ASCII str": "héllo wörld — 日本語 🦀 \u2028 \ufeff",
    "str with quotes, backslash, controls": 'say "hi"\\n\n\t\x01\x7f',
    "list": [1, "two", 3.5, None, True, [], {}],
    "dict": {"type": "text", "text": "hi", "n": 1, "nested": {"a": [1, {"b": None}]}},
    "non-ASCII dict": {"ключ": "значение", "🔑": ["🦀", "é"]},
    "int": 42,
    "zero": 0,
    "negative int": -7,
    "64-bit bounds": [MAX_BIGINT, -(2**63)],
    "float": 1.5,
    "negative zero": -0.0,
    "tiny and huge floats": [5e-324, 1.7976931348623157e308, 0.1, 1e16],
    "true": True,
    "false": False,
    "None": None,
    "empty list": [],
    "empty dict": {},
    "OpenAI content parts": [
        {"type": "input_text", "text": "What is in this image?"},
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
    ],
}


def test_any_json_content_round_trips_and_is_stored_as_compact_json(
    repo: SessionRepository, store: Engine
) -> None:
    def check(key: SessionKey, content: Any) -> None:
        repo.get_or_create(key)
        one = repo.append_message(key, Role.USER, content)
        batch = repo.append_messages(
            key, [NewMessage(Role.ASSISTANT, content), {"role": "tool", "content": content}]
        )
        history = repo.get_history(key)
        assert [m.id for m in history] == [one.id, *(m.id for m in batch)]
        for message in [one, *batch, *history]:
            same_json(message.content, content, f"message {message.id}")
            assert message.tool_calls is None
            assert message.meta == {}
        for message in history:
            stored_content, stored_calls, stored_meta, _, _ = raw_message(store, message.id)
            assert stored_content == dump(content)
            assert stored_calls is None  # SQL NULL, not the text 'null'
            assert stored_meta == "{}"

    check_each(CONTENT_VALUES, check)


def test_a_str_stays_a_str_in_content_and_tool_calls(
    repo: SessionRepository, store: Engine
) -> None:
    def check(key: SessionKey, text: str) -> None:
        repo.get_or_create(key)
        message = repo.append_message(key, Role.ASSISTANT, text, tool_calls=text, meta={"m": text})
        (read,) = repo.get_history(key)
        for found in (message, read):
            assert type(found.content) is str
            assert found.content == text
            assert type(found.tool_calls) is str
            assert found.tool_calls == text
            assert found.meta == {"m": text}
        content, calls, meta, _, _ = raw_message(store, read.id)
        assert content == json.dumps(text, ensure_ascii=False)
        assert calls == json.dumps(text, ensure_ascii=False)
        assert meta == dump({"m": text})

    check_each({repr(text): text for text in STRINGS_THAT_LOOK_LIKE_JSON}, check)


def test_non_ascii_is_stored_as_utf8_not_escaped(
    repo: SessionRepository, key: SessionKey, store: Engine
) -> None:
    repo.get_or_create(key)
    content = {"texte": "déjà vu 🦀", "日本": ["語"]}
    calls = [{"name": "météo", "args": {"ville": "Zürich"}}]
    meta = {"modèle": "gpt-🦀"}
    message = repo.append_message(key, Role.ASSISTANT, content, tool_calls=calls, meta=meta)
    stored_content, stored_calls, stored_meta, _, _ = raw_message(store, message.id)
    assert stored_content == '{"texte":"déjà vu 🦀","日本":["語"]}'
    assert stored_calls == '[{"name":"météo","args":{"ville":"Zürich"}}]'
    assert stored_meta == '{"modèle":"gpt-🦀"}'
    assert "\\u" not in stored_content + stored_calls + stored_meta
    # The cell holds exactly those UTF-8 bytes, also on PostgreSQL (text, not bytea).
    if on_postgresql(store):
        (same,) = raw_row(
            store,
            "SELECT convert_to(content, 'UTF8') = ? FROM messages WHERE id = ?",
            (stored_content.encode(), message.id),
        )
        (kind,) = raw_row(
            store, "SELECT pg_typeof(content)::text FROM messages WHERE id = ?", (message.id,)
        )
        assert kind == "text"
    else:
        (same,) = raw_row(
            store,
            "SELECT CAST(content AS BLOB) = ? FROM messages WHERE id = ?",
            (stored_content.encode(), message.id),
        )
        (kind,) = raw_row(store, "SELECT typeof(content) FROM messages WHERE id = ?", (message.id,))
        assert kind == "text"
    assert bool(same)


TOOL_CALLS_VALUES: dict[str, Any] = {
    "OpenAI list": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}
    ],
    "a dict": {"name": "lookup", "args": {"q": "x"}},
    "a str": "call_1",
    "an int": 7,
    "a float": 2.5,
    "a bool": False,
    "an empty list": [],
    "an empty dict": {},
}


def test_tool_calls_are_any_json_value_stored_as_compact_json(
    repo: SessionRepository, store: Engine
) -> None:
    def check(key: SessionKey, calls: Any) -> None:
        repo.get_or_create(key)
        one = repo.append_message(key, Role.ASSISTANT, "", tool_calls=calls)
        (two,) = repo.append_messages(
            key, [{"role": "assistant", "content": "", "tool_calls": calls}]
        )
        history = repo.get_history(key)
        assert [m.id for m in history] == [one.id, two.id]
        for message in [one, two, *history]:
            same_json(message.tool_calls, calls)
        for message in history:
            assert raw_message(store, message.id)[1] == dump(calls)

    check_each(TOOL_CALLS_VALUES, check)


def test_no_tool_calls_are_sql_null_and_read_as_none(
    repo: SessionRepository, key: SessionKey, store: Engine
) -> None:
    repo.get_or_create(key)
    message = repo.append_message(key, Role.ASSISTANT, "x", tool_calls=None)
    assert message.tool_calls is None
    (is_null,) = raw_row(
        store, "SELECT tool_calls IS NULL FROM messages WHERE id = ?", (message.id,)
    )
    assert bool(is_null)
    assert repo.get_history(key)[0].tool_calls is None


def test_meta_is_stored_as_a_json_object_and_defaults_to_empty(
    repo: SessionRepository, key: SessionKey, store: Engine
) -> None:
    repo.get_or_create(key)
    meta = {"model": "gpt-5", "usage": {"in": 3, "out": 4}, "ids": ["a", "b"], "x": None}
    with_meta = repo.append_message(key, Role.ASSISTANT, "a", meta=meta)
    without = repo.append_message(key, Role.USER, "b")
    empty = repo.append_message(key, Role.USER, "c", meta={})
    batch = repo.append_messages(
        key, [NewMessage(Role.USER, "d", meta=meta), {"role": "user", "content": "e"}]
    )
    history = repo.get_history(key)
    assert [m.id for m in history] == [with_meta.id, without.id, empty.id, *(m.id for m in batch)]
    expected = [meta, {}, {}, meta, {}]
    for message, want in zip(history, expected, strict=True):
        same_json(message.meta, want)
        assert raw_message(store, message.id)[2] == dump(want)
    for message, want in zip([with_meta, without, empty, *batch], expected, strict=True):
        same_json(message.meta, want)


def test_tuples_come_back_as_lists(repo: SessionRepository, key: SessionKey) -> None:
    repo.get_or_create(key)
    # Typed Any: `JSONValue` names lists only, though tuples are documented as taken.
    content: Any = ("a", (1, (2,)), {"t": ()})
    calls: Any = ({"args": (1, 2)},)
    meta: dict[str, Any] = {"pair": ("x", "y")}
    message = repo.append_message(key, Role.ASSISTANT, content, tool_calls=calls, meta=meta)
    built = NewMessage(Role.USER, content, calls, meta)
    same_json(built.content, ["a", [1, [2]], {"t": []}])
    (batched,) = repo.append_messages(key, [built])
    first, second = repo.get_history(key)
    for found in (message, batched, first, second):
        same_json(found.content, ["a", [1, [2]], {"t": []}])
        same_json(found.tool_calls, [{"args": [1, 2]}])
        same_json(found.meta, {"pair": ["x", "y"]})


def test_new_message_takes_every_field_positionally_and_by_name() -> None:
    by_position = NewMessage(Role.ASSISTANT, {"a": 1}, [1], {"m": 2})
    by_name = NewMessage(role="assistant", content={"a": 1}, tool_calls=[1], meta={"m": 2})
    for message in (by_position, by_name):
        assert message.role is Role.ASSISTANT
        assert message.content == {"a": 1}
        assert message.tool_calls == [1]
        assert message.meta == {"m": 2}
    plain = NewMessage(Role.USER, 5)
    assert (plain.content, plain.tool_calls, plain.meta) == (5, None, None)


# --- 2. bad input -------------------------------------------------------------------------


class Opaque:
    """An object JSON cannot carry."""


BAD_JSON: dict[str, Any] = {
    "set": {1, 2},
    "frozenset inside": [frozenset({1})],
    "bytes": b"bytes",
    "bytes inside": {"a": b"x"},
    "bytearray": bytearray(b"x"),
    "NaN": math.nan,
    "inf": math.inf,
    "-inf inside": [1, -math.inf],
    "int past 64 bits": MAX_BIGINT + 1,
    "int below 64 bits": [-(2**63) - 1],
    "huge int": 10**5000,
    "too deep (lists)": deep_lists(MAX_JSON_DEPTH),
    "too deep (dicts)": deep_dicts(MAX_JSON_DEPTH),
    "lone surrogate": "a\ud800b",
    "lone surrogate inside": ["ok", {"x": "\udfff"}],
    "lone surrogate in a key": {"\ud83d": 1},
    "int key": {1: "a"},
    "None key": {None: "a"},
    "tuple key": {(1, 2): "a"},
    "Decimal": Decimal("1.5"),
    "datetime": datetime(2024, 1, 1, tzinfo=UTC),
    "object": Opaque(),
}

BAD_META: dict[str, Any] = {
    "a list": [1, 2],
    "a str": "{}",
    "an int": 5,
    "a list of pairs": [("a", 1)],
    "True": True,
    **{case: {"v": value} for case, value in BAD_JSON.items() if "key" not in case},
    "int key": {1: "a"},
    "surrogate key": {"\udc00": 1},
    "too deep": {"v": deep_lists(MAX_JSON_DEPTH - 1)},
}


def bad_calls(field: str, value: Any) -> dict[str, Callable[[SessionRepository, SessionKey], Any]]:
    """Every way to hand `value` as `field` to the store."""
    one: dict[str, Any] = {"content": "fine", field: value}
    return {
        "append_message": lambda r, k: r.append_message(k, Role.USER, **one),
        "append_messages": lambda r, k: r.append_messages(
            k, [NewMessage(Role.USER, "ok"), {"role": "user", **one}]
        ),
        "NewMessage": lambda r, k: r.append_messages(k, [NewMessage(role=Role.USER, **one)]),
    }


BAD_INPUT: dict[str, tuple[str, Any]] = {
    f"{field}-{case}": (field, value)
    for field, table in (("content", BAD_JSON), ("tool_calls", BAD_JSON), ("meta", BAD_META))
    for case, value in table.items()
}


@before_io
def test_bad_json_is_refused_naming_the_field_and_nothing_is_written(
    repo: SessionRepository, store: Engine
) -> None:
    def check(key: SessionKey, case: tuple[str, Any]) -> None:
        field, value = case
        repo.get_or_create(key)
        repo.append_message(key, Role.USER, "before", tokens=1, input_tokens=2, output_tokens=3)
        before = repo.get(key)
        for how, call in bad_calls(field, value).items():
            with labelled(how):
                refused(store, partial(call, repo, key), field)
                assert repo.get(key) == before
                assert [m.content for m in repo.get_history(key)] == ["before"]

    check_each(BAD_INPUT, check)
    # `refused` sees every row of every table, as `dbtools.snapshot` does.
    assert everything(store) == snapshot(store)


def test_nesting_up_to_the_limit_is_accepted(
    repo: SessionRepository, key: SessionKey, store: Engine
) -> None:
    repo.get_or_create(key)
    content = deep_lists(MAX_JSON_DEPTH - 1, "🦀")
    calls = deep_dicts(MAX_JSON_DEPTH - 1)
    meta = {"v": deep_lists(MAX_JSON_DEPTH - 2)}
    assert json_depth(content) == json_depth(calls) == json_depth(meta) == MAX_JSON_DEPTH
    message = repo.append_message(key, Role.USER, content, tool_calls=calls, meta=meta)
    (read,) = repo.get_history(key)
    for found in (message, read):
        same_json(found.content, content)
        same_json(found.tool_calls, calls)
        same_json(found.meta, meta)
    assert raw_message(store, message.id)[:3] == (dump(content), dump(calls), dump(meta))


NUL_VALUES: dict[str, Any] = {
    "str": "a\x00b",
    "only NUL": "\x00",
    "in a list": ["ok", "x\x00"],
    "in a dict value": {"a": {"b": "\x00"}},
    "in a dict key": {"k\x00": 1},
    "in a nested key": [{"fine": [{"\x00": None}]}],
}


def nul_call(
    field: str, value: Any, batched: bool
) -> Callable[[SessionRepository, SessionKey], list[Message]]:
    if field == "meta" and not isinstance(value, dict):
        value = {"m": value}
    fields: dict[str, Any] = {"content": "fine", field: value}
    if batched:
        return lambda r, k: r.append_messages(
            k, [NewMessage(Role.USER, "ok"), NewMessage(role=Role.USER, **fields)]
        )
    return lambda r, k: [r.append_message(k, Role.USER, **fields)]


NUL_INPUT: dict[str, tuple[str, Any]] = {
    f"{field}-{case}": (field, value)
    for case, value in NUL_VALUES.items()
    for field in ("content", "tool_calls", "meta")
}


def test_nul_is_refused_on_postgresql_naming_the_field_and_stored_on_sqlite(
    repo: SessionRepository, store: Engine
) -> None:
    def check(key: SessionKey, case: tuple[str, Any]) -> None:
        field, value = case
        expected = {"m": value} if field == "meta" and not isinstance(value, dict) else value
        column = {"content": 0, "tool_calls": 1, "meta": 2}[field]
        repo.get_or_create(key)
        for batched in (False, True):
            with labelled("append_messages" if batched else "append_message"):
                call = nul_call(field, value, batched)
                if on_postgresql(store):
                    name = f"messages[1].{field}" if batched else field
                    message = refused(store, partial(call, repo, key), name, exact_start=True)
                    assert "NUL" in message
                    continue
                stored = call(repo, key)[-1]
                (read,) = repo.get_history(key, after_id=(stored.id or 0) - 1)
                for found in (stored, read):
                    same_json(getattr(found, field), expected)
                assert raw_message(store, stored.id)[column] == dump(expected)
        session = repo.get(key)
        assert session is not None
        written = 0 if on_postgresql(store) else 3
        assert session.message_count == len(repo.get_history(key)) == written

    check_each(NUL_INPUT, check)


def test_places_in_error_messages_keep_the_message_on_one_line() -> None:
    """A key that would not print (a newline, a control character, nothing at all) or
    that holds `.` or `[` is named as a JSON string in brackets, so the message stays
    one line and says exactly where."""
    nul_at = first_nul({"plain": [{"two\nlines": ["ok", "\x00"]}]})
    assert nul_at == '.plain[0]["two\\nlines"][1]'
    with pytest.raises(ValueError, match="does not fit in 64 bits") as refused_int:
        check_json("meta", {"": {"a.b": {"\x1b[31m": 2**70}}})
    message = str(refused_int.value)
    assert message == (
        'meta: the integer at meta[""]["a.b"]["\\u001b[31m"] does not fit in 64 bits'
    )
    assert "\n" not in message
    assert "\x1b" not in message


# --- 3. lenient reading -------------------------------------------------------------------


def test_cells_written_by_others_never_make_history_fail_or_drop_a_row(
    repo: SessionRepository, key: SessionKey, store: Engine
) -> None:
    session = repo.get_or_create(key)
    first = repo.append_message(key, Role.USER, {"ok": True})
    rows = [
        # (cell values, what each reads as: role, content, tool_calls, meta, created_at)
        (
            {"content": "not json {"},
            (Role.USER, "not json {", None, {}, datetime(2024, 1, 1, tzinfo=UTC)),
        ),
        ({"tool_calls": "[oops"}, (Role.USER, "hi", "[oops", {}, None)),
        ({"role": "critic"}, ("critic", "hi", None, {}, None)),
        ({"role": "USER"}, (Role.USER, "hi", None, {}, None)),
        ({"role": " Developer "}, (Role.DEVELOPER, "hi", None, {}, None)),
        ({"metadata": "[1,2]"}, (Role.USER, "hi", None, {}, None)),
        ({"metadata": "garbage"}, (Role.USER, "hi", None, {}, None)),
        ({"metadata": "null"}, (Role.USER, "hi", None, {}, None)),
        ({"metadata": '"text"'}, (Role.USER, "hi", None, {}, None)),
        ({"metadata": '{"source":"crate"}'}, (Role.USER, "hi", None, {"source": "crate"}, None)),
        ({"created_at": "yesterday"}, (Role.USER, "hi", None, {}, EPOCH)),
        ({"content": "NaN"}, (Role.USER, "NaN", None, {}, None)),
        ({"content": "1e999"}, (Role.USER, "1e999", None, {}, None)),
        ({"content": "[1, 2"}, (Role.USER, "[1, 2", None, {}, None)),
        ({"content": "42"}, (Role.USER, 42, None, {}, None)),
        ({"content": "null"}, (Role.USER, None, None, {}, None)),
        ({"content": '{"a": [1, 2.5]}'}, (Role.USER, {"a": [1, 2.5]}, None, {}, None)),
        ({"tool_calls": '[{"id": "c1"}]'}, (Role.USER, "hi", [{"id": "c1"}], {}, None)),
        ({"tool_calls": "Infinity"}, (Role.USER, "hi", "Infinity", {}, None)),
        (
            {
                "role": "critic",
                "content": "not json {",
                "tool_calls": "[oops",
                "metadata": "garbage",
                "created_at": "yesterday",
            },
            ("critic", "not json {", "[oops", {}, EPOCH),
        ),
    ]
    ids = [insert_raw_message(store, session.id, **cells) for cells, _ in rows]
    last = repo.append_message(key, Role.ASSISTANT, "after")

    history = repo.get_history(key)
    assert [m.id for m in history] == [first.id, *ids, last.id]
    for message, (cells, (role, content, calls, meta, created)) in zip(
        history[1:-1], rows, strict=True
    ):
        what = f"row {cells}"
        assert message.role == role, what
        if isinstance(role, Role):
            assert message.role is role, what
        else:
            assert type(message.role) is str, what  # a plain str, not a Role
        same_json(message.content, content, what)
        same_json(message.tool_calls, calls, what)
        assert message.meta == meta, what
        assert message.created_at == (created or datetime(2024, 1, 1, tzinfo=UTC)), what
    same_json(history[0].content, {"ok": True})
    assert history[-1].content == "after"

    # Every way of paging reads the same rows the same way.
    assert repo.get_history(key, limit=len(history)) == history
    assert repo.get_history(key, after_id=0, limit=len(history)) == history
    assert [m.id for m in repo.get_history(key, after_id=first.id, before_id=last.id)] == ids


def test_sqlite_cells_of_other_types_are_read_leniently(engine: Engine, key: SessionKey) -> None:
    """SQLite alone lets a TEXT column hold an integer, a real or a blob."""
    store = engine
    repo = SessionRepository(store)
    session = repo.get_or_create(key)
    ids = [
        insert_raw_message(store, session.id, content=42),
        insert_raw_message(store, session.id, content=2.5),
        insert_raw_message(store, session.id, content=b'"blob"'),
        insert_raw_message(store, session.id, content=b"not json \xff"),
        insert_raw_message(store, session.id, tool_calls=7),
    ]
    history = repo.get_history(key)
    assert [m.id for m in history] == ids
    same_json(history[0].content, 42)
    same_json(history[1].content, 2.5)
    same_json(history[2].content, "blob")
    assert type(history[3].content) is str
    assert history[3].content.startswith("not json ")
    same_json(history[4].tool_calls, 7)


# --- 4. timestamps written by others ------------------------------------------------------

STAMPS = {
    "2024-01-01T00:00:00Z": datetime(2024, 1, 1, tzinfo=UTC),
    "2024-01-01T00:00:00.123+00:00": datetime(2024, 1, 1, 0, 0, 0, 123000, tzinfo=UTC),
    "2024-01-01T00:00:00.123456+00:00": datetime(2024, 1, 1, 0, 0, 0, 123456, tzinfo=UTC),
    "2024-01-01T00:00:00.123456789+00:00": datetime(2024, 1, 1, 0, 0, 0, 123456, tzinfo=UTC),
    "2024-01-01T00:00:00.1234567Z": datetime(2024, 1, 1, 0, 0, 0, 123456, tzinfo=UTC),
    "2024-01-01T05:30:00.5+05:30": datetime(2024, 1, 1, 0, 0, 0, 500000, tzinfo=UTC),
    "2023-12-31T19:00:00.999999999-05:00": datetime(2024, 1, 1, 0, 0, 0, 999999, tzinfo=UTC),
    "2024-01-01t00:00:00z": datetime(2024, 1, 1, tzinfo=UTC),
    "2024-01-01t00:00:00.25z": datetime(2024, 1, 1, 0, 0, 0, 250000, tzinfo=UTC),
    "2024-01-01 00:00:00": datetime(2024, 1, 1, tzinfo=UTC),
    GOOD_STAMP: datetime(2024, 1, 1, tzinfo=UTC),
}


def test_rfc3339_timestamps_written_by_others_read_as_utc_to_the_microsecond(
    repo: SessionRepository, key: SessionKey, store: Engine
) -> None:
    session = repo.get_or_create(key)
    ids = [insert_raw_message(store, session.id, created_at=stamp) for stamp in STAMPS]
    history = repo.get_history(key)
    assert [m.id for m in history] == ids
    for message, (stamp, expected) in zip(history, STAMPS.items(), strict=True):
        assert message.created_at == expected, stamp
        assert message.created_at.tzinfo is not None, stamp
        assert message.created_at.utcoffset() == timedelta(0), stamp
        assert message.created_at.tzinfo == UTC, stamp
        assert message.created_at.microsecond == expected.microsecond, stamp


NOWS = [
    datetime(2024, 1, 1, tzinfo=UTC),
    datetime(2024, 1, 1, 0, 0, 0, 5, tzinfo=UTC),
    datetime(2024, 6, 30, 23, 59, 59, 999999, tzinfo=UTC),
]


def test_we_write_the_fixed_width_form(store: Engine) -> None:
    repo = SessionRepository(store)

    def check(key: SessionKey, now: datetime) -> None:
        repo.get_or_create(key)
        with freeze_time(now):
            one = repo.append_message(key, Role.USER, {"a": 1})
            (two,) = repo.append_messages(key, [NewMessage(Role.USER, "b")])
        expected = now.strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
        for message in (one, two):
            assert message.created_at == now
            stamp = raw_message(store, message.id)[4]
            assert stamp == expected
            assert FIXED_WIDTH.fullmatch(stamp)
        assert [m.created_at for m in repo.get_history(key)] == [now, now]

    check_each({now.isoformat(): now for now in NOWS}, check)


# --- 5. tokens ----------------------------------------------------------------------------


def test_input_and_output_tokens_add_up_and_token_usage_is_the_total(
    repo: SessionRepository, key: SessionKey, store: Engine
) -> None:
    session = repo.get_or_create(key)
    assert (session.token_usage, session.input_tokens, session.output_tokens) == (0, 0, 0)
    repo.append_message(key, Role.USER, "q", tokens=5)
    repo.append_message(key, Role.ASSISTANT, "a", input_tokens=10, output_tokens=20)
    repo.append_messages(
        key,
        [NewMessage(Role.USER, "q2"), NewMessage(Role.ASSISTANT, "a2")],
        tokens=1,
        input_tokens=100,
        output_tokens=1000,
    )
    repo.append_message(key, Role.USER, "q3", input_tokens=7)
    repo.append_message(key, Role.USER, "q4", output_tokens=9)
    found = repo.get(key)
    assert found is not None
    assert found.message_count == 6
    assert found.input_tokens == 10 + 100 + 7
    assert found.output_tokens == 20 + 1000 + 9
    assert found.token_usage == 5 + (10 + 20) + (1 + 100 + 1000) + 7 + 9
    assert raw_counters(store, session.id) == (6, 1152, 117, 1029)
    (listed,) = repo.list_sessions({"peer_id": key.peer_id})
    assert (listed.token_usage, listed.input_tokens, listed.output_tokens) == (1152, 117, 1029)


BAD_TOKENS: dict[str, Any] = {
    "negative": -1,
    "True": True,
    "False": False,
    "float": 1.0,
    "str": "3",
    "None": None,
    "past 64 bits": MAX_BIGINT + 1,
    "Decimal": Decimal(3),
}


BAD_TOKEN_INPUT: dict[str, tuple[str, Any]] = {
    f"{case}-{name}": (name, value)
    for case, value in BAD_TOKENS.items()
    for name in ("tokens", "input_tokens", "output_tokens")
}


@before_io
def test_bad_token_counts_are_refused_naming_the_argument(
    repo: SessionRepository, store: Engine
) -> None:
    def check(key: SessionKey, case: tuple[str, Any]) -> None:
        name, value = case
        repo.get_or_create(key)
        repo.append_message(key, Role.USER, "before", tokens=1, input_tokens=1, output_tokens=1)
        counts: dict[str, Any] = {name: value}
        with labelled("append_message"):
            refused(
                store,
                lambda: repo.append_message(key, Role.USER, "x", **counts),
                name,
                exact_start=True,
            )
        with labelled("append_messages"):
            refused(
                store,
                lambda: repo.append_messages(key, [NewMessage(Role.USER, "x")], **counts),
                name,
                exact_start=True,
            )

    check_each(BAD_TOKEN_INPUT, check)


OVERFLOWS: dict[str, tuple[dict[str, int], dict[str, Any]]] = {
    # case: (counters set by plain SQL, what the append adds)
    "token_usage full, tokens": ({"token_usage": MAX_BIGINT}, {"tokens": 1}),
    "token_usage full, input": ({"token_usage": MAX_BIGINT}, {"input_tokens": 1}),
    "token_usage full, output": ({"token_usage": MAX_BIGINT}, {"output_tokens": 1}),
    "token_usage nearly full, all three": (
        {"token_usage": MAX_BIGINT - 2},
        {"tokens": 1, "input_tokens": 1, "output_tokens": 1},
    ),
    "input_tokens full": ({"input_tokens": MAX_BIGINT}, {"input_tokens": 1}),
    "input_tokens nearly full": ({"input_tokens": MAX_BIGINT - 5}, {"input_tokens": 6}),
    "output_tokens full": ({"output_tokens": MAX_BIGINT}, {"output_tokens": 1}),
    "output_tokens nearly full": ({"output_tokens": MAX_BIGINT - 1}, {"output_tokens": 2**40}),
    "the arguments' sum": ({}, {"tokens": MAX_BIGINT, "input_tokens": 1}),
    "the arguments' sum, all maximal": (
        {},
        {"tokens": MAX_BIGINT, "input_tokens": MAX_BIGINT, "output_tokens": MAX_BIGINT},
    ),
}


def test_a_counter_overflow_is_refused_naming_tokens_and_nothing_is_written(
    repo: SessionRepository, store: Engine
) -> None:
    def check(key: SessionKey, case: tuple[dict[str, int], dict[str, Any]]) -> None:
        stored, adding = case
        session = repo.get_or_create(key)
        repo.append_message(key, Role.USER, "before")
        for column, value in stored.items():
            run_sql(store, f"UPDATE sessions SET {column} = ? WHERE id = ?", (value, session.id))
        counters = raw_counters(store, session.id)

        with labelled("append_message"):
            refused(
                store,
                lambda: repo.append_message(key, Role.USER, "x", **adding),
                "tokens",
                exact_start=True,
            )
        with labelled("append_messages"):
            refused(
                store,
                lambda: repo.append_messages(
                    key, [NewMessage(Role.USER, "x"), NewMessage(Role.USER, "y")], **adding
                ),
                "tokens",
                exact_start=True,
            )
        assert raw_counters(store, session.id) == counters
        assert [m.content for m in repo.get_history(key)] == ["before"]

    check_each(OVERFLOWS, check)


def test_counters_fill_exactly_to_the_limit(
    repo: SessionRepository, key: SessionKey, store: Engine
) -> None:
    session = repo.get_or_create(key)
    run_sql(
        store,
        "UPDATE sessions SET token_usage = ?, input_tokens = ?, output_tokens = ? WHERE id = ?",
        (MAX_BIGINT - 6, MAX_BIGINT - 2, MAX_BIGINT - 3, session.id),
    )
    repo.append_message(key, Role.USER, "x", tokens=1, input_tokens=2, output_tokens=3)
    found = repo.get(key)
    assert found is not None
    assert (found.token_usage, found.input_tokens, found.output_tokens) == (MAX_BIGINT,) * 3
    assert raw_counters(store, session.id) == (1, MAX_BIGINT, MAX_BIGINT, MAX_BIGINT)
    # Adding nothing still fits; adding anything does not.
    repo.append_message(key, Role.USER, "y")
    for name in ("tokens", "input_tokens", "output_tokens"):
        extra: dict[str, Any] = {name: 1}
        refused(
            store,
            partial(repo.append_message, key, Role.USER, "z", **extra),
            "tokens",
            exact_start=True,
        )
    assert raw_counters(store, session.id) == (2, MAX_BIGINT, MAX_BIGINT, MAX_BIGINT)


def test_reset_zeroes_input_and_output_tokens_and_compact_keeps_them(
    repo: SessionRepository, key: SessionKey, store: Engine
) -> None:
    session = repo.get_or_create(key)
    for n in range(4):
        repo.append_message(key, Role.USER, f"m{n}", tokens=1, input_tokens=10, output_tokens=100)
    compacted = repo.compact(key, keep_last=1, summary="summary")
    assert compacted.removed == 3
    for found in (compacted.session, repo.get(key)):
        assert found is not None
        assert (found.token_usage, found.input_tokens, found.output_tokens) == (444, 40, 400)
    assert raw_counters(store, session.id) == (2, 444, 40, 400)
    reset = repo.reset(key)
    for found in (reset, repo.get(key)):
        assert found is not None
        assert (found.token_usage, found.input_tokens, found.output_tokens) == (0, 0, 0)
        assert found.message_count == 0
    assert raw_counters(store, session.id) == (0, 0, 0, 0)
    # And they count afresh.
    repo.append_message(key, Role.USER, "again", input_tokens=3, output_tokens=4)
    assert raw_counters(store, session.id) == (1, 7, 3, 4)


THREADS = 4
APPENDS = 15 * STRESS


def thread_appends(repo: SessionRepository, key: SessionKey, label: str) -> None:
    """APPENDS appends of one writer, alternating single messages and batches of two; the
    counts are what `expected_counters` sums."""
    for n in range(APPENDS):
        counts: dict[str, Any] = {
            "tokens": n % 3,
            "input_tokens": n + 1,
            "output_tokens": 2 * n + 1,
        }
        if n % 2:
            repo.append_messages(
                key,
                [
                    NewMessage(Role.USER, {"from": label, "n": n, "part": 0}),
                    {"role": "assistant", "content": [label, n, 1], "meta": {"n": n}},
                ],
                **counts,
            )
        else:
            repo.append_message(key, Role.DEVELOPER, f"{label}-{n}", tool_calls={"n": n}, **counts)


def expected_counters(writers: int) -> tuple[int, int, int, int]:
    """message_count, token_usage, input_tokens, output_tokens after `writers` writers."""
    messages = sum(2 if n % 2 else 1 for n in range(APPENDS))
    tokens = sum(n % 3 for n in range(APPENDS))
    given_in = sum(n + 1 for n in range(APPENDS))
    given_out = sum(2 * n + 1 for n in range(APPENDS))
    return (
        writers * messages,
        writers * (tokens + given_in + given_out),
        writers * given_in,
        writers * given_out,
    )


def test_concurrent_threads_keep_the_token_counters_exact(
    repo: SessionRepository, key: SessionKey, store: Engine
) -> None:
    session = repo.get_or_create(key)
    run_threads(lambda index: thread_appends(repo, key, f"t{index}"), THREADS)
    expected = expected_counters(THREADS)
    assert raw_counters(store, session.id) == expected
    found = repo.get(key)
    assert found is not None
    assert (
        found.message_count,
        found.token_usage,
        found.input_tokens,
        found.output_tokens,
    ) == expected
    history = repo.get_history(key)
    assert len(history) == expected[0]
    developer = sorted(str(m.content) for m in history if m.role is Role.DEVELOPER)
    assert developer == sorted(
        f"t{t}-{n}" for t in range(THREADS) for n in range(APPENDS) if n % 2 == 0
    )


def test_concurrent_processes_keep_the_token_counters_exact(
    store_url: str, key: SessionKey
) -> None:
    processes, threads = 2, 2
    engine = open_database(store_url)
    try:
        session = SessionRepository(engine).get_or_create(key)
    finally:
        engine.dispose()  # no connection of the parent crosses the fork

    def child(process: int) -> None:
        child_engine = open_database(store_url)
        try:
            child_repo = SessionRepository(child_engine)
            run_threads(
                lambda index: thread_appends(child_repo, key, f"p{process}t{index}"), threads
            )
        finally:
            child_engine.dispose()

    pids = [fork(partial(child, process)) for process in range(processes)]
    statuses = [describe(wait(pid, timeout=120.0 * STRESS)) for pid in pids]
    assert statuses == ["exit 0"] * processes

    engine = open_database(store_url)
    try:
        expected = expected_counters(processes * threads)
        assert raw_counters(engine, session.id) == expected
        history = SessionRepository(engine).get_history(key)
        assert len(history) == expected[0]
        assert len({m.id for m in history}) == expected[0]
    finally:
        engine.dispose()


# --- 6. Role.DEVELOPER --------------------------------------------------------------------


DEVELOPER_ROLES: list[Role | str] = [Role.DEVELOPER, "developer", "DEVELOPER", " Developer "]


def test_the_developer_role_appends_and_reads_back(repo: SessionRepository, store: Engine) -> None:
    developer: str = Role.DEVELOPER
    assert developer == "developer"
    assert Role("developer") is Role.DEVELOPER

    def check(key: SessionKey, role: Role | str) -> None:
        repo.get_or_create(key)
        one = repo.append_message(key, role, "be terse")
        (two,) = repo.append_messages(key, [{"role": role, "content": ["be", "terse"]}])
        (three,) = repo.append_messages(key, [NewMessage(role, {"rule": "terse"})])
        history = repo.get_history(key)
        assert [m.id for m in history] == [one.id, two.id, three.id]
        for message in [one, two, three, *history]:
            assert message.role is Role.DEVELOPER
        for message in history:
            assert raw_message(store, message.id)[3] == "developer"

    check_each({repr(role): role for role in DEVELOPER_ROLES}, check)


# --- 7. property: any JSON value round-trips --------------------------------------------


def examples(count: int) -> settings:
    """`count` examples, times AISOPOD_STRESS. The store fixtures are function-scoped, and
    hypothesis runs every example inside the one test call, so all examples of a test share
    one store (made once, not per example); each checks only the messages it wrote (so the
    shared-fixture health check is off on purpose). No example database."""
    return settings(
        max_examples=count * STRESS,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


TEXT_CHAR = st.characters(exclude_categories=["Cs"])  # everything UTF-8 can encode
JSON_CHAR = st.one_of(st.sampled_from('\x00"\\/\n\u2028\ufeffé🦀'), TEXT_CHAR)
JSON_TEXT = st.text(JSON_CHAR, max_size=16)
JSON_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=MAX_BIGINT),
    st.floats(allow_nan=False, allow_infinity=False),
    JSON_TEXT,
)
JSON_VALUE: st.SearchStrategy[Any] = st.recursive(
    JSON_SCALAR,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(JSON_CHAR, max_size=8), children, max_size=4),
    ),
    max_leaves=20,
)
JSON_OBJECT = st.dictionaries(st.text(JSON_CHAR, max_size=8), JSON_VALUE, max_size=4)


@examples(60)
@given(
    content=JSON_VALUE,
    tool_calls=st.one_of(st.none(), JSON_VALUE),
    meta=st.one_of(st.none(), JSON_OBJECT),
    batched=st.booleans(),
)
def test_any_json_value_round_trips_exactly_and_is_stored_as_its_compact_json(
    repo: SessionRepository,
    key: SessionKey,
    store: Engine,
    content: Any,
    tool_calls: Any,
    meta: dict[str, Any] | None,
    batched: bool,
) -> None:
    repo.get_or_create(key)
    fields: dict[str, Any] = {"content": content, "tool_calls": tool_calls, "meta": meta}
    prefix = "messages[1]." if batched else ""

    def append() -> Message:
        if batched:
            return repo.append_messages(
                key, [NewMessage(Role.USER, "first"), {"role": "assistant", **fields}]
            )[1]
        return repo.append_message(key, Role.ASSISTANT, **fields)

    too_deep = [name for name, value in fields.items() if json_depth(value) > MAX_JSON_DEPTH]
    if too_deep:
        refused(store, append, too_deep[0])
        return
    if on_postgresql(store):
        with_nul = [name for name, value in fields.items() if has_nul(value)]
        if with_nul:
            refused(store, append, prefix + with_nul[0], exact_start=True)
            fields = {name: without_nul(value) for name, value in fields.items()}
            content, tool_calls, meta = fields["content"], fields["tool_calls"], fields["meta"]

    message = append()
    assert message.id is not None
    (read,) = repo.get_history(key, after_id=message.id - 1, limit=1)
    assert read.id == message.id
    for found in (message, read):
        assert found.role is Role.ASSISTANT
        same_json(found.content, content, "content")
        same_json(found.tool_calls, tool_calls, "tool_calls")
        same_json(found.meta, meta or {}, "meta")
    stored_content, stored_calls, stored_meta, _, stamp = raw_message(store, message.id)
    assert stored_content == dump(content)
    assert stored_calls == (None if tool_calls is None else dump(tool_calls))
    assert stored_meta == dump(meta or {})
    assert FIXED_WIDTH.fullmatch(stamp)


# --- 8. compaction ------------------------------------------------------------------------


SUMMARIES = ["The user asked about X.", "123", '{"a": 1}', "résumé 🦀"]


def test_a_compaction_summary_is_a_system_message_holding_the_str(
    repo: SessionRepository, store: Engine
) -> None:
    def check(key: SessionKey, summary: str) -> None:
        repo.get_or_create(key)
        for n in range(3):
            repo.append_message(key, Role.USER, {"n": n}, meta={"n": n})
        result = repo.compact(key, keep_last=1, summary=summary)
        assert result.summary is not None
        first, kept = repo.get_history(key)
        assert first.id == result.summary.id
        for message in (result.summary, first):
            assert message.role is Role.SYSTEM
            assert type(message.content) is str
            assert message.content == summary
            assert message.tool_calls is None
            assert message.meta == {}
        content, calls, meta, role, _ = raw_message(store, first.id)
        assert content == dump(summary)
        assert calls is None
        assert meta == "{}"
        assert role == "system"
        same_json(kept.content, {"n": 2})
        same_json(kept.meta, {"n": 2})
        assert result.session.last_compaction_summary == summary

    check_each({repr(summary): summary for summary in SUMMARIES}, check)


# --- the API mirrors one another ------------------------------------------------------------


def test_async_and_sync_appends_of_the_same_values_store_the_same_cells(
    store: Engine, store_url: str, key: SessionKey, other_key: SessionKey
) -> None:
    """What the async API stores is byte for byte what the sync API stores."""
    values: dict[str, Any] = {
        "content": {"parts": [{"type": "text", "text": "héllo"}], "n": -0.0},
        "tool_calls": [{"id": "c", "args": {"x": [1, 2.5, None, True]}}],
        "meta": {"model": "m", "usage": {"in": 1}},
    }
    sync = SessionRepository(store)
    sync.get_or_create(key)
    one = sync.append_message(key, Role.ASSISTANT, **values, input_tokens=1, output_tokens=2)
    stored: list[tuple[Any, ...]] = [raw_message(store, one.id)[:4]]
    with event_loop_thread() as loop:
        engine = run_on(loop, open_async_database(store_url, clock=python_clock))
        try:
            wrapped = AwaitingRepository.over(AsyncSessionRepository(engine), loop)
            wrapped.get_or_create(other_key)
            two = wrapped.append_message(
                other_key, Role.ASSISTANT, **values, input_tokens=1, output_tokens=2
            )
            stored.append(raw_message(store, two.id)[:4])
            same_json(two.content, values["content"])
        finally:
            run_on(loop, engine.dispose())
    assert stored[0] == stored[1]
    found = sync.get(other_key)
    assert found is not None
    assert (found.token_usage, found.input_tokens, found.output_tokens) == (3, 1, 2)
