"""Hostile and bad input, field by field: every value is either stored and read back exactly
(through the API and, byte for byte, with plain SQL) or refused with a `ValueError`
naming the field, with the database left exactly as it was. The rejection catalogue of
`test_validation.py` is not repeated here.

Every test that touches a store runs on SQLite and on PostgreSQL (see conftest). One
difference is by design: PostgreSQL cannot hold NUL (U+0000) in text, nor its `jsonb` the
escape `\u0000`, so there a message whose content or tool calls hold one in any string
(keys too) is refused with a `ValueError` naming the field, nothing written (session
metadata stores it JSON-escaped, and key parts never allow it); every other value is
stored exactly as on SQLite. A message's content is stored as compact JSON text (a
string as its JSON string), so its raw cell is compared with that text.

The property tests (Hypothesis) run a quick number of examples by default; set
`AISOPOD_STRESS=<n>` to run n times as many.
"""

from __future__ import annotations

import json
import math
import re
import struct
import unicodedata
from collections.abc import Callable, Iterator
from datetime import date
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import Engine

from aisopod_session import (
    Message,
    NewMessage,
    PeerKind,
    Role,
    SessionKey,
    SessionRepository,
    SessionStatus,
    open_database,
)
from aisopod_session.keys import MAX_KEY_PART_LENGTH
from aisopod_session.validation import MAX_JSON_DEPTH, dump_json
from tests.dbtools import (
    before_io,
    no_statements,
    raw_connect,
    snapshot,
    store_location,
    stress,
)

PARTS = ("agent_id", "channel", "account_id", "peer_kind", "peer_id")
LOWERED = frozenset({"agent_id", "channel", "peer_kind"})
BASE_PARTS = {
    "agent_id": "agent-1",
    "channel": "telegram",
    "account_id": "bot-A",
    "peer_kind": "dm",
    "peer_id": "User-42",
}
EVIL = "'; DROP TABLE sessions; --"
FIVE_MB = 5 * 1024 * 1024

Call = Callable[[SessionRepository, SessionKey], object]


def make_key(**overrides: Any) -> SessionKey:
    return SessionKey(**{**BASE_PARTS, **overrides})


def deep_lists(levels: int, leaf: Any = "leaf\x00🦀") -> Any:
    """`leaf` inside `levels` lists: JSON depth `levels + 1` (a scalar is depth 1)."""
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


def deep_mixed(levels: int) -> Any:
    """Dicts and lists in turn around an emoji, `levels` of them: depth `levels + 1`."""
    value: Any = "🦀"
    for level in range(levels):
        value = [value] if level % 2 else {"k\x00🔑": value}
    return value


def holds_nul(value: Any) -> bool:
    """Whether a string anywhere in a JSON value (keys too) holds NUL."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_nul(name) or holds_nul(item) for name, item in value.items())
    if isinstance(value, list | tuple):
        return any(holds_nul(item) for item in value)
    return False


def without_nul(value: Any) -> Any:
    """A JSON value with every NUL taken out of its strings and keys."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {without_nul(name): without_nul(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_nul(item) for item in value]
    return value


def json_depth(value: Any) -> int:
    """Depth as the store counts it: a scalar or an empty container is 1."""
    if isinstance(value, dict):
        return 1 + max(map(json_depth, value.values()), default=0)
    if isinstance(value, list | tuple):
        return 1 + max(map(json_depth, value), default=0)
    return 1


# --- exact comparisons ------------------------------------------------------------------


def show(value: Any) -> str:
    """A short repr, also for values whose repr fails (ints past CPython's digit limit)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<{type(value).__name__} of {value.bit_length()} bits>"
    return text if len(text) <= 80 else f"{text[:60]}… ({len(text)} chars)"


def assert_same_text(actual: object, expected: str, what: str) -> None:
    """`actual` is a str equal to `expected`, code point for code point and in UTF-8.

    Raises a short message instead of letting pytest diff megabytes of text."""
    if type(actual) is not str:
        raise AssertionError(f"{what}: got {type(actual).__name__} {show(actual)}, not str")
    if actual == expected and actual.encode("utf-8") == expected.encode("utf-8"):
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b),
        min(len(actual), len(expected)),
    )
    raise AssertionError(
        f"{what}: differs at index {at}: got {actual[at : at + 12]!r} (length {len(actual)}), "
        f"expected {expected[at : at + 12]!r} (length {len(expected)})"
    )


def assert_same_json(actual: Any, expected: Any, path: str = "$") -> None:
    """Equal as JSON and of the same JSON type all the way down: `True` is not `1`, `1` is
    not `1.0`, `-0.0` is not `0.0` (floats are compared bit for bit); tuples read back as
    lists."""
    if expected is None or isinstance(expected, bool):
        ok = actual is expected
    elif isinstance(expected, int):
        ok = type(actual) is int and actual == expected
    elif isinstance(expected, float):
        ok = type(actual) is float and struct.pack("<d", actual) == struct.pack("<d", expected)
    elif isinstance(expected, str):
        assert_same_text(actual, expected, path)
        return
    elif isinstance(expected, list | tuple):
        if type(actual) is not list or len(actual) != len(expected):
            raise AssertionError(f"{path}: got {show(actual)}, expected {show(expected)}")
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            assert_same_json(got, want, f"{path}[{index}]")
        return
    elif isinstance(expected, dict):
        if type(actual) is not dict or set(actual) != set(expected):
            raise AssertionError(f"{path}: got {show(actual)}, expected {show(expected)}")
        for name, want in expected.items():
            assert_same_json(actual[name], want, f"{path}.{name!r}")
        return
    else:
        raise TypeError(f"{path}: {type(expected).__name__} is not a JSON type")
    if not ok:
        raise AssertionError(f"{path}: got {show(actual)}, expected {show(expected)}")


def on_sqlite(store: Engine) -> bool:
    return store.dialect.name == "sqlite"


def sqlite_file(store: Engine) -> Path:
    """The file of a SQLite store."""
    assert store.url.database, store.url
    return Path(store.url.database)


def snap(store: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table: on SQLite read from the file with plain sqlite3 (the schema
    too), on PostgreSQL through the engine."""
    return snapshot(sqlite_file(store) if on_sqlite(store) else store)


def raw_row(store: Engine, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...]:
    """One row read with plain SQL, as a user writing SQL against the store would: with
    plain sqlite3 on the SQLite file, or through the PostgreSQL driver (`?` becomes `%s`)."""
    if on_sqlite(store):
        conn = raw_connect(sqlite_file(store))
        try:
            row = conn.execute(sql, params).fetchone()
        finally:
            conn.close()
    else:
        with store.connect() as connection:
            found = connection.exec_driver_sql(sql.replace("?", "%s"), params).fetchone()
        row = None if found is None else tuple(found)
    assert row is not None, f"no row for {sql} {params}"
    return tuple(row)


def utf8_equals(store: Engine, column: str) -> str:
    """SQL true when `column` holds exactly the UTF-8 bytes given as a parameter."""
    if on_sqlite(store):
        return f'CAST("{column}" AS BLOB) = ?'
    return f"convert_to(\"{column}\", 'UTF8') = ?"


def as_int(store: Engine, condition: str) -> str:
    """`condition` read as 1 or 0 (PostgreSQL's booleans are not integers)."""
    return condition if on_sqlite(store) else f"({condition})::int"


def assert_raw_text(store: Engine, table: str, column: str, row_id: int, expected: str) -> None:
    """The column holds text whose bytes are exactly the UTF-8 of `expected`."""
    kind = f'typeof("{column}")' if on_sqlite(store) else f'pg_typeof("{column}")::text'
    value, stored_as, same_bytes = raw_row(
        store,
        f'SELECT "{column}", {kind}, {as_int(store, utf8_equals(store, column))} '
        f'FROM "{table}" WHERE id = ?',
        (expected.encode("utf-8"), row_id),
    )
    assert stored_as == "text", f"{table}.{column} is stored as {stored_as}"
    assert_same_text(value, expected, f"raw {table}.{column}")
    assert same_bytes == 1, f"raw {table}.{column}: stored bytes differ from the UTF-8 text"


def assert_raw_json(store: Engine, table: str, column: str, row_id: int, expected: Any) -> None:
    """The column holds valid JSON text (for SQLite's json functions, or PostgreSQL's json
    type) decoding to exactly `expected`, or SQL NULL when `expected` is None."""
    if on_sqlite(store):
        sql = (
            f'SELECT "{column}", typeof("{column}"), json_valid("{column}") '
            f'FROM "{table}" WHERE id = ?'
        )
    else:  # a cast to json raises on invalid JSON text
        sql = (
            f'SELECT "{column}", CASE WHEN "{column}" IS NULL THEN \'null\' '
            f'ELSE pg_typeof("{column}")::text END, ("{column}"::json IS NOT NULL)::int '
            f'FROM "{table}" WHERE id = ?'
        )
    text, kind, valid = raw_row(store, sql, (row_id,))
    if expected is None:
        assert kind == "null", f"{table}.{column} is {kind}, not NULL"
        return
    assert kind == "text", f"{table}.{column} is stored as {kind}"
    assert valid == 1, f"{table}.{column} is not valid JSON for {store.dialect.name}"
    assert_same_json(json.loads(text), expected, f"raw {table}.{column}")


def assert_raw_key(store: Engine, session_id: int, key: SessionKey) -> None:
    """The five key columns hold exactly the key's parts, byte for byte."""
    blobs = tuple(part.encode("utf-8") for part in key.parts())
    same = as_int(store, " AND ".join(utf8_equals(store, name) for name in PARTS))
    row = raw_row(
        store,
        f"SELECT agent_id, channel, account_id, peer_kind, peer_id, {same} "
        "FROM sessions WHERE id = ?",
        (*blobs, session_id),
    )
    for name, part, value in zip(PARTS, key.parts(), row[:5], strict=True):
        assert_same_text(value, part, f"raw sessions.{name}")
    assert row[5] == 1, "raw key columns: stored bytes differ from the UTF-8 text"


def assert_nul_refused(store: Engine, call: Callable[[], object], field: str) -> None:
    """PostgreSQL cannot hold NUL: `call` raises a `ValueError` naming `field` (and, for a
    string inside a JSON value, its place) and saying so, and writes nothing."""
    before = snap(store)
    name = re.escape(field)
    with pytest.raises(
        ValueError, match=rf"^{name}: (the string at {name}.* )?holds a NUL character"
    ):
        call()
    assert snap(store) == before


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """Every test of this module runs on SQLite and on PostgreSQL (see conftest), but
    refusals made before any I/O, on SQLite alone (`dbtools.before_io`)."""
    return store_repo


# --- accepted: stored and read back exactly -----------------------------------------------

ACCEPTED_CONTENT: dict[str, str] = {
    "NUL inside": "a\x00b",
    "NUL alone": "\x00",
    "NUL at both ends": "\x00x\x00",
    "a thousand NULs": "\x00" * 1000,
    "emoji": "🦀🐍😀",
    "ZWJ family": "👩\u200d👩\u200d👧\u200d👦",
    "flags, skin tone, keycap": "🇫🇷🇯🇵👍🏽1\ufe0f\u20e3",
    "combining and precomposed stay distinct": "e\u0301 \u00e9 \u212b \u00c5",
    "RTL": "مرحبا بالعالم",
    "mixed direction": "abc שלום 123",
    "bidi override": "\u202eevil\u202c",
    "empty": "",
    "spaces only": "   ",
    "unicode whitespace only": " \t\r\n\x0b\x0c\u00a0\u3000\u2028\u2029\x85",
    "line endings": "one\r\ntwo\rthree\n",
    "every C0 and C1 control and DEL": "".join(map(chr, [*range(32), *range(0x7F, 0xA0)])),
    "BOM, zero-width, noncharacters, private use": "\ufeff\u200b\ufffe\uffff\ue000\U0010ffff",
    "astral plane": "\U0001d54f\U00020000\U0010fffd",
    "SQL": EVIL,
    "quotes, backslashes, wildcards": 'it\'s "quoted" `tick` \\ \\\\ %_ %% ?1 :name $1',
    "JSON-looking": '{"role": "system", "content": "\\u0000"}',
    "5 MB ASCII": ("0123456789abcdef" * (FIVE_MB // 16 + 1))[:FIVE_MB],
    "5 MB of 2-, 3- and 4-byte characters": "é€🦀" * (FIVE_MB // 9),
}


@pytest.mark.parametrize("case", list(ACCEPTED_CONTENT))
def test_accepted_content_is_read_back_byte_for_byte(
    repo: SessionRepository, key: SessionKey, store: Engine, case: str
) -> None:
    content = ACCEPTED_CONTENT[case]
    repo.get_or_create(key)

    def append_batch() -> list[Message]:
        return repo.append_messages(
            key.canonical(),
            [NewMessage(Role.ASSISTANT, content), {"role": "tool", "content": content}],
        )

    if not on_sqlite(store) and "\x00" in content:
        assert_nul_refused(store, lambda: repo.append_message(key, Role.USER, content), "content")
        assert_nul_refused(store, append_batch, "messages[0].content")
        content = content.replace("\x00", "")  # the rest of it is still stored exactly
    one = repo.append_message(key, Role.USER, content)
    batch = append_batch()
    history = repo.get_history(key)
    assert [m.id for m in history] == [one.id, *(m.id for m in batch)]
    assert [m.role for m in history] == [Role.USER, Role.ASSISTANT, Role.TOOL]
    for message in [one, *batch, *history]:
        assert_same_text(message.content, content, f"message {message.id}")
    for message in history:
        assert message.id is not None
        assert_raw_text(store, "messages", "content", message.id, dump_json(content))
        assert_raw_json(store, "messages", "content", message.id, content)
    session = repo.get(key)
    assert session is not None
    assert session.message_count == 3


ACCEPTED_KEY_PARTS: dict[str, tuple[str, str, str]] = {
    # case: (field, given, stored)
    "SQL in agent_id": ("agent_id", EVIL, EVIL.lower()),
    "SQL in channel": ("channel", EVIL, EVIL.lower()),
    "SQL in account_id": ("account_id", EVIL, EVIL),
    "SQL in peer_id": ("peer_id", EVIL, EVIL),
    "quotes and backslashes": (
        "account_id",
        'O\'Brien "x" `y` \\ \\\\',
        'O\'Brien "x" `y` \\ \\\\',
    ),
    "LIKE wildcards": ("peer_id", "%_%", "%_%"),
    "escape lookalikes": ("peer_id", "%25%3A%3a%2%", "%25%3A%3a%2%"),
    "colons": ("account_id", "::a::", "::a::"),
    "matrix id": ("peer_id", "@alice:matrix.org", "@alice:matrix.org"),
    "windows path": ("agent_id", "C:\\Agents\\One", "c:\\agents\\one"),
    "url": ("channel", "HTTPS://x.example/a?b=1&c=%20", "https://x.example/a?b=1&c=%20"),
    "unicode letters": ("peer_id", "Ünïcødé-日本語-Ελληνικά", "Ünïcødé-日本語-Ελληνικά"),
    "final sigma lower-cased": ("agent_id", "ΣΊΣΥΦΟΣ", "σίσυφος"),
    "emoji": ("channel", "🦀", "🦀"),
    "ZWJ family": ("peer_id", "👩\u200d👩\u200d👧\u200d👦", "👩\u200d👩\u200d👧\u200d👦"),
    "flag and skin tone": ("account_id", "🇫🇷👍🏽", "🇫🇷👍🏽"),
    "combining accent kept decomposed": ("peer_id", "e\u0301", "e\u0301"),
    "RTL": ("account_id", "مرحبا", "مرحبا"),
    "bidi override": ("peer_id", "\u202eevil\u202c", "\u202eevil\u202c"),
    "BOM and zero-width space": ("peer_id", "\ufeff\u200b", "\ufeff\u200b"),
    "noncharacters and private use": (
        "account_id",
        "\uffff\ue000\U0010fffd",
        "\uffff\ue000\U0010fffd",
    ),
    "unicode spaces at the ends stripped": ("peer_id", "\u3000\u00a0peer\u2003\u2028", "peer"),
    "spaces inside kept": ("account_id", "a  b", "a  b"),
    "255 ASCII": ("account_id", "x" * MAX_KEY_PART_LENGTH, "x" * MAX_KEY_PART_LENGTH),
    "255 colons": ("peer_id", ":" * MAX_KEY_PART_LENGTH, ":" * MAX_KEY_PART_LENGTH),
    "255 percent signs": ("agent_id", "%" * MAX_KEY_PART_LENGTH, "%" * MAX_KEY_PART_LENGTH),
    "255 emoji": ("channel", "🦀" * MAX_KEY_PART_LENGTH, "🦀" * MAX_KEY_PART_LENGTH),
    "255 after stripping": ("peer_id", " " + "y" * MAX_KEY_PART_LENGTH + "\n", "y" * 255),
    "peer kind upper-case and padded": ("peer_kind", " THREAD\n", "thread"),
    "peer kind mixed case": ("peer_kind", "GrOuP", "group"),
}


@pytest.mark.parametrize("case", list(ACCEPTED_KEY_PARTS))
def test_accepted_key_parts_are_stored_and_found_exactly(
    repo: SessionRepository, store: Engine, case: str
) -> None:
    field, given, stored = ACCEPTED_KEY_PARTS[case]
    key = make_key(**{field: given})
    assert_same_text(key.parts()[PARTS.index(field)], stored, field)
    text = key.canonical()
    assert text.count(":") == 4  # colons inside parts are escaped
    assert SessionKey.parse(text) == key
    assert SessionKey.parse(text).canonical() == text

    session = repo.get_or_create(text)
    assert session.id is not None
    assert session.key == key
    for lookup in (key, text):
        found = repo.get(lookup)
        assert found is not None
        assert found.id == session.id
        assert found.key == key
    assert [s.id for s in repo.list_sessions({field: given})] == [session.id]
    assert repo.count_sessions(dict(zip(PARTS, key.parts(), strict=True))) == 1
    message = repo.append_message(text, Role.USER, text)
    assert [m.id for m in repo.get_history(key)] == [message.id]
    assert_raw_key(store, session.id, key)


ACCEPTED_JSON: dict[str, Any] = {
    "NUL in keys and strings": {"a\x00b": "c\x00d", "": "\x00", "\x00": ""},
    "emoji keys": {"🦀": "👩\u200d👩\u200d👧\u200d👦", "🇫🇷": ["e\u0301", "\u00e9"]},
    "SQL keys and values": {EVIL: EVIL, "x": [EVIL, {EVIL: None}]},
    "JSON-looking and escape-looking text": {'{"a": 1}': '"\\"', "\\u0000": "\\", "/": "</script>"},
    "controls, separators and noncharacters": {"\x1b[31m": "\x7f\x85\u2028\u2029\ufffe\uffff"},
    "whitespace keys": {" ": " ", "\u3000": "\t", "\n": "\r\n"},
    "empty containers": {"list": [], "dict": {}, "text": ""},
    "booleans stay booleans, not ints": [True, False, None, 0, 1, 0.0, 1.0],
    "64-bit bounds": [2**63 - 1, -(2**63), 2**53 + 1, -(2**53) - 1],
    "extreme floats": [
        1e308,
        -1e308,
        5e-324,
        -5e-324,
        2.2250738585072014e-308,
        1.7976931348623157e308,
    ],
    "signed zero and awkward decimals": [-0.0, 0.1, 1 / 3, 1e-7, 1e16, 123456789.12345678],
    "depth limit through lists": deep_lists(MAX_JSON_DEPTH - 2),
    "depth limit through dicts and lists": deep_mixed(MAX_JSON_DEPTH - 2),
    "depth limit with an empty list": deep_lists(MAX_JSON_DEPTH - 2, leaf=[]),
    "a thousand keys": {str(i): i for i in range(1000)},
    "5 MB string": "x" * FIVE_MB,
}


@pytest.mark.parametrize("case", list(ACCEPTED_JSON))
def test_accepted_json_is_read_back_exactly_as_metadata_and_tool_calls(
    repo: SessionRepository, key: SessionKey, store: Engine, case: str
) -> None:
    """The value sits one level down (`{"v": value}`, `[value]`), so a value of depth
    `MAX_JSON_DEPTH - 1` puts both at the depth limit exactly."""
    value = ACCEPTED_JSON[case]
    session = repo.get_or_create(key)
    assert session.id is not None
    meta = {"v": value}
    assert_same_json(repo.update_metadata(key, meta, replace=True).meta, meta)
    found = repo.get(key.canonical())
    assert found is not None
    assert_same_json(found.meta, meta)
    (listed,) = repo.list_sessions({"peer_id": key.peer_id})
    assert_same_json(listed.meta, meta)
    assert_raw_json(store, "sessions", "metadata", session.id, meta)
    merged = repo.update_metadata(key, {"w": value})
    assert_same_json(merged.meta, {"v": value, "w": value})

    if not on_sqlite(store) and holds_nul(value):
        assert_nul_refused(
            store,
            lambda: repo.append_message(key, Role.ASSISTANT, "", tool_calls=[value]),
            "tool_calls",
        )
        value = without_nul(value)  # the rest of it is still stored exactly
    message = repo.append_message(key, Role.ASSISTANT, "", tool_calls=[value])
    assert message.id is not None
    assert_same_json(message.tool_calls, [value])
    (read,) = repo.get_history(key)
    assert_same_json(read.tool_calls, [value])
    assert_raw_json(store, "messages", "tool_calls", message.id, [value])


# --- integers wider than 64 bits ------------------------------------------------------

WIDE_INTEGERS = [2**63, -(2**63) - 1, 2**64, 10**100, 10**4300]  # 10**4300: past CPython's
# int/str limit, so json.dumps could not even write it.


@before_io
@pytest.mark.parametrize(
    "value", WIDE_INTEGERS, ids=["2**63", "-2**63-1", "2**64", "1e100", "1e4300"]
)
@pytest.mark.parametrize("field", ["changes", "tool_calls"])
def test_integers_wider_than_64_bits_are_rejected_naming_the_field(
    repo: SessionRepository, key: SessionKey, store: Engine, field: str, value: int
) -> None:
    """SQLite's JSON functions read wider integers back as floats: refused, not stored."""
    repo.get_or_create(key)
    before = snap(store)
    nested = [1, {"n": value}]
    call: Callable[[], object] = (
        (lambda: repo.update_metadata(key, {"n": nested}))
        if field == "changes"
        else (lambda: repo.append_message(key, Role.TOOL, "", tool_calls=nested))
    )
    with (
        pytest.raises(ValueError, match=rf"{field}: the integer at .* does not fit in 64 bits"),
        no_statements(),
    ):
        call()
    assert snap(store) == before


# --- rejected: a ValueError naming the field, and nothing written --------------------------


KEY = make_key()
EVIL_KEY = SessionKey(EVIL, EVIL, EVIL, "group", EVIL)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stocked_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SessionRepository, Engine]]:
    """One store per backend for the rejection tests, holding something hostile already so
    that "unchanged" means something. The module shares it: a rejected call writes nothing,
    and each test compares the store with its own snapshot from just before."""
    with store_location(request.param, tmp_path_factory.mktemp("hostile")) as url:
        engine = open_database(url)
        try:
            repo = SessionRepository(engine)
            # PostgreSQL refuses NUL in content (by design): a zero-width joiner there.
            first = "before\x00🦀" if on_sqlite(engine) else "before\u200d🦀"
            repo.get_or_create(KEY)
            repo.append_message(KEY, Role.USER, first, tool_calls=[{EVIL: [1.5, None]}])
            repo.update_metadata(KEY, {"kept": True, EVIL: "\x00"})
            repo.get_or_create(EVIL_KEY)
            repo.append_message(EVIL_KEY, Role.ASSISTANT, EVIL, tokens=7)
            yield repo, engine
        finally:
            engine.dispose()


@pytest.fixture
def stocked(stocked_store: tuple[SessionRepository, Engine]) -> SessionRepository:
    return stocked_store[0]


@pytest.fixture
def stocked_db(stocked_store: tuple[SessionRepository, Engine]) -> Engine:
    return stocked_store[1]


BAD_KEY_PARTS: dict[str, str] = {
    "unicode whitespace only": "\u00a0\u3000\u2003 \u2028",
    "over-long by one (2-byte characters)": "é" * (MAX_KEY_PART_LENGTH + 1),
    "over-long by one (4-byte characters)": "🦀" * (MAX_KEY_PART_LENGTH + 1),
    "over-long by one zero-width space": "x" * MAX_KEY_PART_LENGTH + "\u200b",
    "NUL alone": "\x00",
    "NUL after SQL": EVIL + "\x00",
    "NUL then a space": "x\x00 ",
    "lone low surrogate": "a\udfffb",
    "surrogate pair as two code units": "\ud83d\ude00",
    "C1 control": "a\x9fb",
    "escape sequence": "\x1b[2J",
}

TEXT_KEY_CALLS: dict[str, Callable[[SessionRepository, str], object]] = {
    "get_or_create": lambda r, k: r.get_or_create(k),
    "get": lambda r, k: r.get(k),
    "append_message": lambda r, k: r.append_message(k, Role.USER, "x", tokens=1),
    "append_messages": lambda r, k: r.append_messages(k, [NewMessage(Role.USER, "x")]),
    "get_history": lambda r, k: r.get_history(k),
    "update_metadata": lambda r, k: r.update_metadata(k, {"a": 1}),
    "set_status": lambda r, k: r.set_status(k, SessionStatus.IDLE),
    "delete": lambda r, k: r.delete(k),
}


@pytest.mark.parametrize("case", list(BAD_KEY_PARTS))
def test_bad_key_parts_are_rejected_naming_the_part_everywhere(
    stocked: SessionRepository, stocked_db: Engine, case: str
) -> None:
    """In each of the five parts: building a `SessionKey`, a canonical text key given to
    every keyed method, and a filter given to `list_sessions` / `count_sessions`."""
    value = BAD_KEY_PARTS[case]
    before = snap(stocked_db)
    for field in PARTS:
        with pytest.raises(ValidationError) as caught:
            make_key(**{field: value})
        assert [error["loc"] for error in caught.value.errors()] == [(field,)]
        assert field in str(caught.value)

        text = ":".join(value if name == field else BASE_PARTS[name] for name in PARTS)
        for method, call in TEXT_KEY_CALLS.items():
            with pytest.raises(ValueError, match=re.escape(field)):
                call(stocked, text)
            assert snap(stocked_db) == before, f"{method} with a bad {field} wrote something"
        with pytest.raises(ValueError, match=re.escape(field)):
            stocked.list_sessions({field: value})
        with pytest.raises(ValueError, match=re.escape(field)):
            stocked.count_sessions({field: value})
    assert snap(stocked_db) == before


NAN = math.nan
INF = math.inf

MORE_BAD_CALLS: dict[str, tuple[str, Call]] = {
    # enum values
    "role with NUL": ("role", lambda r, k: r.append_message(k, "user\x00", "x")),
    "role in fullwidth letters": (
        "role",
        lambda r, k: r.append_message(k, "\uff35\uff33\uff25\uff32", "x"),
    ),
    "role with zero-width space": ("role", lambda r, k: r.append_message(k, "user\u200b", "x")),
    "role empty": ("role", lambda r, k: r.append_message(k, "", "x")),
    "role None": ("role", lambda r, k: r.append_message(k, None, "x")),  # type: ignore[arg-type]
    "role of another enum": ("role", lambda r, k: r.append_message(k, SessionStatus.ACTIVE, "x")),
    "role bytes": ("role", lambda r, k: r.append_message(k, b"user", "x")),  # type: ignore[arg-type]
    "role SQL": ("role", lambda r, k: r.append_message(k, "user'; DROP TABLE messages; --", "")),
    "role in a mapping": (
        "role",
        lambda r, k: r.append_messages(k, [{"role": "admin", "content": "x"}]),
    ),
    "status empty": ("status", lambda r, k: r.set_status(k, "")),
    "status with NUL": ("status", lambda r, k: r.set_status(k, "idle\x00")),
    "status SQL": ("status", lambda r, k: r.set_status(k, "idle'; --")),
    "status None": ("status", lambda r, k: r.set_status(k, None)),  # type: ignore[arg-type]
    "status of another enum": ("status", lambda r, k: r.set_status(k, Role.USER)),
    "status in fullwidth letters in a filter": (
        "status",
        lambda r, k: r.count_sessions({"status": "\uff29\uff24\uff2c\uff25"}),
    ),
    "peer kind plural in a text key": ("peer_kind", lambda r, k: r.get_or_create("a:c:x:dms:p")),
    "peer kind in fullwidth letters": (
        "peer_kind",
        lambda r, k: r.get_or_create("a:c:x:\uff44\uff4d:p"),
    ),
    "peer kind SQL": ("peer_kind", lambda r, k: r.delete(f"a:c:x:{EVIL}:p")),
    "peer kind of another enum": (
        "peer_kind",
        lambda r, k: r.get_or_create(SessionKey("a", "c", "x", Role.USER, "p")),
    ),
    "peer kind in a filter": ("peer_kind", lambda r, k: r.list_sessions({"peer_kind": "email"})),
    # tokens
    "tokens most negative": (
        "tokens",
        lambda r, k: r.append_message(k, "user", "x", tokens=-(2**63)),
    ),
    "tokens integral float": ("tokens", lambda r, k: r.append_message(k, "user", "x", tokens=1.0)),  # type: ignore[arg-type]
    "tokens NaN": ("tokens", lambda r, k: r.append_message(k, "user", "x", tokens=NAN)),  # type: ignore[arg-type]
    "tokens Decimal": ("tokens", lambda r, k: r.append_message(k, "user", "x", tokens=Decimal(1))),  # type: ignore[arg-type]
    "tokens Fraction": (
        "tokens",
        lambda r, k: r.append_message(k, "user", "x", tokens=Fraction(1)),  # type: ignore[arg-type]
    ),
    "tokens None": ("tokens", lambda r, k: r.append_message(k, "user", "x", tokens=None)),  # type: ignore[arg-type]
    "tokens complex": ("tokens", lambda r, k: r.append_message(k, "user", "x", tokens=1j)),  # type: ignore[arg-type]
    "tokens bytes": ("tokens", lambda r, k: r.append_message(k, "user", "x", tokens=b"1")),  # type: ignore[arg-type]
    "tokens negative in a batch": (
        "tokens",
        lambda r, k: r.append_messages(k, [NewMessage("user", "x")], tokens=-1),
    ),
    # content
    "content a lone high surrogate": (
        "content",
        lambda r, k: r.append_message(k, "user", "\ud800"),
    ),
    "content a surrogate pair as two code units": (
        "content",
        lambda r, k: r.append_message(k, "user", "ok \ud83d\ude00"),
    ),
    "content surrogate in a mapping": (
        "content",
        lambda r, k: r.append_messages(
            k, [NewMessage("user", "fine"), {"role": "user", "content": "\x00\udfff"}]
        ),
    ),
    # metadata
    "changes Infinity": ("changes", lambda r, k: r.update_metadata(k, {"a": INF})),
    "changes -Infinity": ("changes", lambda r, k: r.update_metadata(k, {"a": -INF})),
    "changes NaN in a list": ("changes", lambda r, k: r.update_metadata(k, {"a": [1, NAN]})),
    "changes NaN deep down": (
        "changes",
        lambda r, k: r.update_metadata(k, {"a": {"b": [{"c": NAN}]}}),
    ),
    "changes NaN with replace": (
        "changes",
        lambda r, k: r.update_metadata(k, {"a": NAN}, replace=True),
    ),
    "changes set": ("changes", lambda r, k: r.update_metadata(k, {"a": {1, 2}})),
    "changes frozenset": ("changes", lambda r, k: r.update_metadata(k, {"a": frozenset("ab")})),
    "changes bytes": ("changes", lambda r, k: r.update_metadata(k, {"a": b"\x00"})),
    "changes bytearray": ("changes", lambda r, k: r.update_metadata(k, {"a": bytearray(2)})),
    "changes Decimal": ("changes", lambda r, k: r.update_metadata(k, {"a": Decimal("1.5")})),
    "changes complex": ("changes", lambda r, k: r.update_metadata(k, {"a": 1j})),
    "changes date": ("changes", lambda r, k: r.update_metadata(k, {"a": date(2026, 1, 1)})),
    "changes too deep through lists": (
        "changes",
        lambda r, k: r.update_metadata(k, {"v": deep_lists(MAX_JSON_DEPTH - 1)}),
    ),
    "changes too deep with an empty list": (
        "changes",
        lambda r, k: r.update_metadata(k, {"v": deep_lists(MAX_JSON_DEPTH - 1, leaf=[])}),
    ),
    "changes None key": ("changes", lambda r, k: r.update_metadata(k, {None: 1})),  # type: ignore[dict-item]
    "changes bool key": ("changes", lambda r, k: r.update_metadata(k, {True: 1})),  # type: ignore[dict-item]
    "changes float key": ("changes", lambda r, k: r.update_metadata(k, {1.5: 1})),  # type: ignore[dict-item]
    "changes tuple key nested": (
        "changes",
        lambda r, k: r.update_metadata(k, {"a": {("x",): 1}}),
    ),
    "changes surrogate key": ("changes", lambda r, k: r.update_metadata(k, {"\ud800": 1})),
    "changes surrogate key nested": (
        "changes",
        lambda r, k: r.update_metadata(k, {"a": [{"b\udfff": 1}]}),
    ),
    "changes surrogate value": ("changes", lambda r, k: r.update_metadata(k, {"a": "\udc80"})),
    "changes surrogate value in a list": (
        "changes",
        lambda r, k: r.update_metadata(k, {"a": ["ok", "x\ud83d"]}),
    ),
    "changes None": ("changes", lambda r, k: r.update_metadata(k, None)),  # type: ignore[arg-type]
    "changes JSON text": ("changes", lambda r, k: r.update_metadata(k, '{"a": 1}')),  # type: ignore[arg-type]
    # tool calls
    "tool_calls -Infinity": (
        "tool_calls",
        lambda r, k: r.append_message(k, "tool", "", tool_calls=[{"x": -INF}]),
    ),
    "tool_calls bytes": (
        "tool_calls",
        lambda r, k: r.append_message(k, "tool", "", tool_calls=[b"x"]),
    ),
    "tool_calls Decimal": (
        "tool_calls",
        lambda r, k: r.append_message(k, "tool", "", tool_calls=[Decimal(1)]),
    ),
    "tool_calls surrogate key": (
        "tool_calls",
        lambda r, k: r.append_message(k, "tool", "", tool_calls=[{"\ud800": 1}]),
    ),
    "tool_calls too deep through lists": (
        "tool_calls",
        lambda r, k: r.append_message(k, "tool", "", tool_calls=[deep_lists(MAX_JSON_DEPTH - 1)]),
    ),
    "tool_calls JSON text as bytes": (
        "tool_calls",
        lambda r, k: r.append_message(k, "tool", "", tool_calls=b"[]"),  # type: ignore[arg-type]
    ),
    "tool_calls a set": (
        "tool_calls",
        lambda r, k: r.append_message(k, "tool", "", tool_calls={1}),  # type: ignore[arg-type]
    ),
    "tool_calls an iterator": (
        "tool_calls",
        lambda r, k: r.append_message(k, "tool", "", tool_calls=iter([])),  # type: ignore[arg-type]
    ),
    "tool_calls NaN in a mapping": (
        "tool_calls",
        lambda r, k: r.append_messages(k, [{"role": "tool", "content": "", "tool_calls": [NAN]}]),
    ),
}


@pytest.mark.parametrize("case", list(MORE_BAD_CALLS))
def test_more_bad_input_is_rejected_naming_the_field_and_nothing_is_written(
    stocked: SessionRepository, stocked_db: Engine, case: str
) -> None:
    field, call = MORE_BAD_CALLS[case]
    before = snap(stocked_db)
    with pytest.raises(ValueError, match=re.escape(field)):
        call(stocked, KEY)
    assert snap(stocked_db) == before


def test_tool_calls_given_as_json_text_are_stored_as_a_json_string(
    repo: SessionRepository, key: SessionKey, store: Engine
) -> None:
    """Tool calls are any JSON value: text that looks like JSON is a string, kept as one
    (not parsed), so it reads back as the same text."""
    repo.get_or_create(key)
    message = repo.append_message(key, Role.TOOL, "", tool_calls="[]")
    assert message.id is not None
    (read,) = repo.get_history(key)
    for got in (message, read):
        assert_same_json(got.tool_calls, "[]")
    assert_raw_text(store, "messages", "tool_calls", message.id, dump_json("[]"))
    assert_raw_json(store, "messages", "tool_calls", message.id, "[]")


# --- properties ------------------------------------------------------------------------------

STRESS = stress()


def examples(count: int) -> settings:
    """`count` examples, times AISOPOD_STRESS.

    The `repo`, `key` and `store` fixtures are function-scoped, so every example of a
    test shares one store: that keeps the run fast, and each property checks only
    what its own example wrote (its own key, or messages after its own first id), so the
    health check that warns about shared fixtures is switched off on purpose. No example
    database: failures print their reproduction (Hypothesis still keeps caches in its
    self-ignored `.hypothesis/` folder)."""
    return settings(
        max_examples=count * STRESS,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


TEXT_CHAR = st.characters(exclude_categories=["Cs"])  # everything UTF-8 can encode
SURROGATE = st.characters(categories=["Cs"])
HOSTILE_CHAR = st.one_of(st.sampled_from(f"\x00:%3Aa25 '\";-\\_İΣ\u200d{EVIL}"), TEXT_CHAR)
END_SPACE = st.text(st.sampled_from(" \t\r\n\x0b\x0c\u00a0\u3000\u2028"), max_size=3)
WEIRD_END_SPACE = st.text(st.sampled_from(" \t\n\x1c\x1f\x85\u2028"), max_size=2)


def padded(
    inner: st.SearchStrategy[str], ends: st.SearchStrategy[str] = END_SPACE
) -> st.SearchStrategy[str]:
    """`inner` with whitespace at the ends, which key parts strip."""
    return st.tuples(ends, inner, ends).map("".join)


def any_case(word: str) -> st.SearchStrategy[str]:
    flags = st.lists(st.booleans(), min_size=len(word), max_size=len(word))
    return flags.map(
        lambda upper: "".join(c.upper() if u else c for c, u in zip(word, upper, strict=True))
    )


LIKELY_PART = padded(st.text(HOSTILE_CHAR.filter(lambda c: c != "\x00"), min_size=1, max_size=40))
ANY_PART = st.one_of(
    LIKELY_PART,
    padded(st.text(HOSTILE_CHAR, max_size=20), WEIRD_END_SPACE),
    st.text(st.characters(), max_size=300),  # anything at all, surrogates and controls too
    st.text(
        st.characters(exclude_categories=["Cc", "Cs"]),
        min_size=MAX_KEY_PART_LENGTH - 5,
        max_size=MAX_KEY_PART_LENGTH + 5,
    ),
)
KIND_WORD = st.sampled_from([kind.value for kind in PeerKind]).flatmap(any_case)
LIKELY_KIND = st.one_of(st.sampled_from(list(PeerKind)), padded(KIND_WORD))
ANY_KIND = st.one_of(LIKELY_KIND, padded(KIND_WORD, WEIRD_END_SPACE), ANY_PART)


def documented_rule_broken(field: str, value: str) -> bool:
    """docs/api.md, Keys: stripped, non-empty, at most 255 characters, no control
    characters (Cc) and no lone surrogates; spaces, tabs and line breaks at the ends are
    stripped, any other control character, or one inside, is refused."""
    categories = [unicodedata.category(char) for char in value]
    if "Cs" in categories:
        return True
    if any(
        cat == "Cc" and char not in "\t\n\r\x0b\x0c"
        for char, cat in zip(value, categories, strict=True)
    ):
        return True
    text = normalised(field, value)
    if not text or len(text) > MAX_KEY_PART_LENGTH:
        return True
    if any(unicodedata.category(char) == "Cc" for char in text):
        return True
    return field == "peer_kind" and text not in {kind.value for kind in PeerKind}


def normalised(field: str, value: str) -> str:
    text = str(value).strip()
    return text.lower() if field in LOWERED else text


def escape(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


def check_rejection(exc: ValidationError, given: dict[str, str]) -> None:
    """Every error is about one of the parts, names it, and that part breaks a documented
    rule; every part that breaks one is reported."""
    fields = {error["loc"][0] for error in exc.errors()}
    assert fields <= set(PARTS)
    assert fields == {name for name in PARTS if documented_rule_broken(name, given[name])}
    for field in fields:
        assert isinstance(field, str)
        assert field in str(exc)


@examples(100)
@given(parts=st.tuples(ANY_PART, ANY_PART, ANY_PART, ANY_KIND, ANY_PART))
def test_any_key_parts_are_normalised_and_round_trip_or_are_rejected_naming_the_part(
    parts: tuple[str, str, str, str, str],
) -> None:
    given_parts = dict(zip(PARTS, parts, strict=True))
    try:
        key = SessionKey(*parts)
    except ValidationError as exc:
        check_rejection(exc, given_parts)
        return
    assert not any(documented_rule_broken(name, part) for name, part in given_parts.items())
    assert key.parts() == tuple(normalised(name, part) for name, part in given_parts.items())
    text = key.canonical()
    assert text == ":".join(escape(part) for part in key.parts())
    assert SessionKey.parse(text) == key
    assert SessionKey.parse(text).canonical() == text
    assert hash(SessionKey.parse(text)) == hash(key)


@examples(60)
@given(
    parts=st.tuples(LIKELY_PART, LIKELY_PART, ANY_PART, LIKELY_KIND, LIKELY_PART),
    by_text=st.booleans(),
)
def test_any_valid_key_is_stored_and_found_and_any_invalid_one_writes_nothing(
    repo: SessionRepository, store: Engine, parts: tuple[str, str, str, str, str], by_text: bool
) -> None:
    given_parts = dict(zip(PARTS, parts, strict=True))
    text = ":".join(escape(str(part)) for part in parts)
    try:
        key = SessionKey(*parts)
    except ValidationError as exc:
        check_rejection(exc, given_parts)
        before = snap(store)
        with pytest.raises(ValueError, match="|".join(PARTS)):
            repo.get_or_create(text)
        assert snap(store) == before
        return
    assert SessionKey.parse(text) == key
    session = repo.get_or_create(text if by_text else key)
    assert session.id is not None
    assert session.key == key
    for lookup in (key, key.canonical(), text):
        found = repo.get(lookup)
        assert found is not None
        assert found.id == session.id
    assert [s.id for s in repo.list_sessions(given_parts)] == [session.id]
    assert repo.count_sessions(given_parts) == 1
    assert_raw_key(store, session.id, key)


CONTENT = st.text(st.one_of(st.sampled_from("\x00\ufeff\u200d\u202e🦀\r\n"), TEXT_CHAR))


@examples(100)
@given(content=CONTENT, role=st.sampled_from(list(Role)))
def test_any_text_content_is_read_back_byte_for_byte(
    repo: SessionRepository, key: SessionKey, store: Engine, content: str, role: Role
) -> None:
    repo.get_or_create(key)
    if not on_sqlite(store) and "\x00" in content:
        assert_nul_refused(store, lambda: repo.append_message(key, role, content), "content")
        content = content.replace("\x00", "")  # the rest of it is still stored exactly
    message = repo.append_message(key, role, content)
    assert message.id is not None
    (read,) = repo.get_history(key, after_id=message.id - 1, limit=1)
    assert read.id == message.id
    assert read.role is role
    assert_same_text(message.content, content, "returned content")
    assert_same_text(read.content, content, "history content")
    assert_raw_text(store, "messages", "content", message.id, dump_json(content))
    assert_raw_json(store, "messages", "content", message.id, content)


@examples(30)
@given(
    content=st.tuples(st.text(TEXT_CHAR), SURROGATE, st.text(st.characters())).map("".join),
    in_a_batch=st.booleans(),
)
def test_text_with_a_lone_surrogate_is_rejected_naming_content(
    stocked: SessionRepository, stocked_db: Engine, content: str, in_a_batch: bool
) -> None:
    before = snap(stocked_db)
    batch: list[NewMessage | dict[str, Any]] = [NewMessage(Role.USER, "fine")]
    batch.append({"role": "user", "content": content})

    def append() -> object:
        if in_a_batch:
            return stocked.append_messages(KEY, batch)
        return stocked.append_message(KEY, Role.USER, content)

    with pytest.raises(ValueError, match="content"):
        append()
    assert snap(stocked_db) == before


JSON_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(HOSTILE_CHAR, max_size=20),
)


def json_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Lists and string-keyed dicts of `children`."""
    return st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(HOSTILE_CHAR, max_size=8), children, max_size=4),
    )


JSON_VALUE: st.SearchStrategy[Any] = st.recursive(JSON_SCALAR, json_containers, max_leaves=25)
METADATA = st.dictionaries(st.text(HOSTILE_CHAR, max_size=12), JSON_VALUE, max_size=6)
TOOL_CALLS = st.one_of(st.none(), st.lists(JSON_VALUE, max_size=4), JSON_VALUE)
"""Tool calls: a list, as models write them, or any other JSON value."""


@examples(60)
@given(meta=METADATA, by_text=st.booleans())
def test_any_json_metadata_is_read_back_exactly(
    repo: SessionRepository, key: SessionKey, store: Engine, meta: dict[str, Any], by_text: bool
) -> None:
    session = repo.get_or_create(key)
    assert session.id is not None
    if json_depth(meta) > MAX_JSON_DEPTH:
        with pytest.raises(ValueError, match="changes"):
            repo.update_metadata(key, meta, replace=True)
        return
    updated = repo.update_metadata(key.canonical() if by_text else key, meta, replace=True)
    assert_same_json(updated.meta, meta)
    found = repo.get(key)
    assert found is not None
    assert_same_json(found.meta, meta)
    (listed,) = repo.list_sessions(dict(zip(PARTS, key.parts(), strict=True)))
    assert_same_json(listed.meta, meta)
    assert_raw_json(store, "sessions", "metadata", session.id, meta)


@examples(40)
@given(first=METADATA, changes=METADATA)
def test_metadata_merge_replaces_top_level_keys_only(
    repo: SessionRepository, key: SessionKey, first: dict[str, Any], changes: dict[str, Any]
) -> None:
    repo.get_or_create(key)
    repo.update_metadata(key, first, replace=True)
    merged = repo.update_metadata(key, changes)
    assert_same_json(merged.meta, {**first, **changes})
    found = repo.get(key)
    assert found is not None
    assert_same_json(found.meta, {**first, **changes})


@examples(60)
@given(tool_calls=TOOL_CALLS, content=st.text(TEXT_CHAR, max_size=20))
def test_any_tool_calls_are_read_back_exactly(
    repo: SessionRepository,
    key: SessionKey,
    store: Engine,
    tool_calls: Any,
    content: str,
) -> None:
    repo.get_or_create(key)
    if not on_sqlite(store) and (holds_nul(content) or holds_nul(tool_calls)):
        assert_nul_refused(
            store,
            lambda: repo.append_message(key, Role.ASSISTANT, content, tool_calls=tool_calls),
            "content" if holds_nul(content) else "tool_calls",
        )
        # the rest of it is still stored exactly
        content, tool_calls = without_nul(content), without_nul(tool_calls)
    message = repo.append_message(key, Role.ASSISTANT, content, tool_calls=tool_calls)
    assert message.id is not None
    (read,) = repo.get_history(key, after_id=message.id - 1)
    for got in (message, read):
        if tool_calls is None:
            assert got.tool_calls is None
        else:
            assert_same_json(got.tool_calls, tool_calls)
    assert_raw_json(store, "messages", "tool_calls", message.id, tool_calls)


@examples(50)
@given(
    batch=st.lists(
        st.tuples(st.sampled_from(list(Role)), CONTENT, TOOL_CALLS), min_size=1, max_size=5
    ),
    tokens=st.integers(min_value=0, max_value=2**32),
    as_mappings=st.booleans(),
)
@example(batch=[(Role.USER, "", None)], tokens=2**31, as_mappings=False)  # tokens past 32 bits
def test_any_batch_of_messages_is_read_back_in_order_and_counted(
    repo: SessionRepository,
    key: SessionKey,
    store: Engine,
    batch: list[tuple[Role, str, Any]],
    tokens: int,
    as_mappings: bool,
) -> None:
    before = repo.get_or_create(key)

    def append() -> list[Message]:
        messages = [
            {"role": role, "content": content, "tool_calls": calls}
            if as_mappings
            else NewMessage(role, content, calls)
            for role, content, calls in batch
        ]
        return repo.append_messages(key.canonical(), messages, tokens=tokens)

    # The first field holding NUL, message by message, content before tool calls.
    with_nul = [
        (index, field)
        for index, (_, content, calls) in enumerate(batch)
        for field, value in (("content", content), ("tool_calls", calls))
        if holds_nul(value)
    ]
    if not on_sqlite(store) and with_nul:
        index, field = with_nul[0]
        assert_nul_refused(store, append, f"messages[{index}].{field}" if len(batch) > 1 else field)
        # the rest of it is still stored exactly
        batch = [(role, without_nul(content), without_nul(calls)) for role, content, calls in batch]
    stored = append()
    first = stored[0].id
    assert first is not None
    history = repo.get_history(key, after_id=first - 1)
    assert [m.id for m in history] == [m.id for m in stored]
    assert [m.id for m in stored] == sorted({m.id for m in stored if m.id is not None})
    for (role, content, calls), got, read in zip(batch, stored, history, strict=True):
        for message in (got, read):
            assert message.role is role
            assert_same_text(message.content, content, f"message {message.id}")
            if calls is None:
                assert message.tool_calls is None
            else:
                assert_same_json(message.tool_calls, calls)
    after = repo.get(key)
    assert after is not None
    assert after.message_count == before.message_count + len(batch)
    assert after.token_usage == before.token_usage + tokens
    assert after.status is SessionStatus.ACTIVE


SURROGATE_TEXT = st.tuples(st.text(TEXT_CHAR, max_size=3), SURROGATE).map("".join)
POISON = st.one_of(
    st.sampled_from([NAN, INF, -INF]),
    st.sets(st.integers(), max_size=2),
    st.frozensets(st.text(TEXT_CHAR, max_size=2), max_size=2),
    st.binary(max_size=4),
    st.binary(max_size=4).map(bytearray),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.complex_numbers(),
    st.dates(),
    SURROGATE_TEXT,
)
BAD_JSON_KEY = st.one_of(
    st.integers(),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.tuples(st.text(TEXT_CHAR, max_size=2)),
    SURROGATE_TEXT,
)
PATH = st.lists(st.one_of(st.none(), st.text(HOSTILE_CHAR, max_size=4)), max_size=6)


def bury(value: Any, path: list[str | None]) -> Any:
    """`value` inside containers: a list for each None in `path`, else a dict with that key."""
    for step in reversed(path):
        value = [value] if step is None else {step: value}
    return value


@examples(50)
@given(
    poison=st.one_of(POISON, BAD_JSON_KEY.map(lambda bad_key: {bad_key: 1})),
    path=PATH,
    meta=METADATA,
    tool_calls=st.lists(JSON_VALUE, max_size=3),
)
def test_json_with_anything_unstorable_anywhere_is_rejected_naming_the_field(
    stocked: SessionRepository,
    stocked_db: Engine,
    poison: Any,
    path: list[str | None],
    meta: dict[str, Any],
    tool_calls: list[Any],
) -> None:
    buried = bury(poison, path)
    before = snap(stocked_db)
    with pytest.raises(ValueError, match="changes"):
        stocked.update_metadata(KEY, {**meta, "poisoned": buried})
    with pytest.raises(ValueError, match="tool_calls"):
        stocked.append_message(KEY, Role.TOOL, "", tool_calls=[*tool_calls, buried])
    assert snap(stocked_db) == before
