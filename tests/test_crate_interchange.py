"""One store shared with the Rust crate `aisopod-session` (issue 14), both ways.

(a) A store the crate made and wrote (tests/crate_files.py does what it does, in plain
SQL) opens here: its JSON cells read back as the values it stored, its RFC 3339
timestamps as aware UTC datetimes, its one-row `schema_version` counts as migrations 1
and 2, and migration 3 changes none of its cells.
(b) What this library writes there, the crate reads: every content, tool_calls and
created_at cell parses (as JSON, as RFC 3339), and the crate's own open and INSERTs still
work after we migrated.
(c) A store made by plain SQL from the seed, with content that is not JSON, is adopted:
those cells read back as the same strings and are stored as JSON strings; cells other
programs write outside the contract read leniently.

Cases run on SQLite and, with AISOPOD_TEST_POSTGRES_URL, on the same shape built on
PostgreSQL; the repository cases through both the sync and the async API.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from aisopod_session import (
    SCHEMA_VERSION,
    AsyncSessionRepository,
    NewMessage,
    Role,
    SessionKey,
    SessionRepository,
    applied_migrations,
    current_version,
    export_jsonl,
    import_jsonl,
    open_async_database,
    open_database,
)
from aisopod_session.cli import app
from aisopod_session.migrations import MIGRATIONS
from tests.crate_files import (
    CRATE_HISTORY_LIMIT,
    CRATE_SCHEMA_VERSION,
    MESSAGE_COLUMNS,
    SESSION_COLUMNS,
    Turn,
    chrono_stamp,
    column_names,
    crate_append,
    crate_create_session,
    crate_json,
    crate_open,
    crate_read_history,
    crate_version,
    insert_raw_message,
    make_seed_store,
    parse_crate_json,
    parse_rfc3339,
    plain,
    raw_rows,
)
from tests.dbtools import (
    AwaitingRepository,
    event_loop_thread,
    run_on,
    run_sql,
    store_location,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def at(seconds: int = 0, microseconds: int = 0) -> datetime:
    return T0 + timedelta(seconds=seconds, microseconds=microseconds)


CRATE_KEY = SessionKey("agent_001", "discord", "bot_123", "dm", "user_456")
CRATE_KEY_PARTS = ("agent_001", "discord", "bot_123", "dm", "user_456")

# What the crate writes (content and tool_calls through serde_json::to_string, timestamps
# through chrono's to_rfc3339, some with `Z`), and the datetime each stamp names,
# truncated to the microsecond.
CONVERSATION: list[tuple[Turn, datetime]] = [
    (Turn("user", "Hello", "2024-01-01T00:00:00+00:00"), at()),
    (
        Turn(
            "assistant",
            [{"type": "text", "text": "hi"}],
            "2024-01-01T00:00:00.123+00:00",
            tool_calls={"tool": "test", "args": {}},
        ),
        at(0, 123_000),
    ),
    (
        Turn("tool", {"result": 42, "unit": "°C", "ok": True}, "2024-01-01T00:00:00.123456+00:00"),
        at(0, 123_456),
    ),
    (
        Turn(
            "assistant",
            'Ça va? 日本語 "quoted"',
            "2024-01-01T00:00:00.123456789+00:00",
            tool_calls=[
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        ),
        at(0, 123_456),
    ),
    (Turn("system", "Be brief.", "2024-01-01T00:00:01Z"), at(1)),
    (
        Turn(
            "user",
            [{"type": "text", "text": "again"}, {"type": "image", "url": "https://x.test/a.png"}],
            "2024-01-01T00:00:01.987654321Z",
        ),
        at(1, 987_654),
    ),
    (Turn("developer", "Follow the style guide.", "2024-01-01T00:00:02.500Z"), at(2, 500_000)),
    (Turn("user", '{"temp_c": 4}', "2024-01-01T00:00:03.000001+00:00"), at(3, 1)),
    (Turn("assistant", "", "2024-01-01T00:00:04+00:00"), at(4)),
]


def typed(value: Any) -> Any:
    """`value` with the type of every scalar kept, so that `True` differs from `1` and
    `1.0` from `1` when compared."""
    if isinstance(value, dict):
        return {name: typed(item) for name, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return (type(value).__name__, value)


def is_utc(moment: datetime) -> bool:
    return moment.tzinfo is not None and moment.utcoffset() == timedelta(0)


# --- stores -------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store location: a SQLite file path or a PostgreSQL schema's URL."""
    with store_location(request.param, tmp_path) as where:
        yield where


@dataclass(frozen=True)
class CrateStore:
    """A store the crate made and wrote one conversation into, and its cells then."""

    target: str
    session_id: int
    message_ids: list[int]
    messages: list[tuple[Any, ...]]
    sessions: list[tuple[Any, ...]]


def crate_made(target: str) -> CrateStore:
    assert crate_open(target) is True
    session_id = crate_create_session(
        target, *CRATE_KEY_PARTS, created_at=CONVERSATION[0][0].created_at
    )
    ids = crate_append(target, session_id, [turn for turn, _ in CONVERSATION])
    return CrateStore(
        target,
        session_id,
        ids,
        raw_rows(target, "messages", MESSAGE_COLUMNS),
        raw_rows(target, "sessions", SESSION_COLUMNS),
    )


@pytest.fixture
def crate_store(target: str) -> CrateStore:
    return crate_made(target)


@pytest.fixture(params=["sync", "async"])
def crate_repo(
    request: pytest.FixtureRequest, crate_store: CrateStore
) -> Iterator[SessionRepository]:
    """Our repository on the crate's store (opening it migrates it), through either API."""
    if request.param == "sync":
        engine = open_database(crate_store.target)
        try:
            yield SessionRepository(engine)
        finally:
            engine.dispose()
        return
    with event_loop_thread() as loop:
        async_engine = run_on(loop, open_async_database(crate_store.target))
        try:
            yield AwaitingRepository.over(AsyncSessionRepository(async_engine), loop)
        finally:
            run_on(loop, async_engine.dispose())


# --- the command --------------------------------------------------------------------------

RUNNER = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = RUNNER.invoke(app, list(args), env={"AISOPOD_SESSION_DB": None})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def cli_ok(*args: str) -> str:
    code, out, err = cli(*args)
    assert code == 0, err
    return out


def cli_json(*args: str) -> Any:
    return json.loads(cli_ok(*args, "--json"))


# --- the fixtures themselves ----------------------------------------------------------------


def test_the_fixtures_write_and_read_as_the_crate_does(tmp_path: Path) -> None:
    moment = datetime(2024, 1, 1, 12, 30, 5, tzinfo=UTC)
    assert chrono_stamp(moment) == "2024-01-01T12:30:05+00:00"
    assert chrono_stamp(moment.replace(microsecond=123_000)) == "2024-01-01T12:30:05.123+00:00"
    assert chrono_stamp(moment.replace(microsecond=123_456)) == "2024-01-01T12:30:05.123456+00:00"
    assert chrono_stamp(moment.replace(microsecond=123_456), nanos=789, z=True) == (
        "2024-01-01T12:30:05.123456789Z"
    )
    assert crate_json("Hello") == '"Hello"'
    assert crate_json({"tool": "test", "args": {}}) == '{"tool":"test","args":{}}'
    assert crate_json([{"type": "text", "text": "hé"}]) == '[{"type":"text","text":"hé"}]'
    for bad, why in [
        ("Hello", "Expecting value"),
        ("", "Expecting value"),
        ("NaN", "NaN is not JSON"),
        ("{a: 1}", "Expecting property name"),
        ("1e400", "out of range"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_crate_json(bad)
    for bad in (
        "2024-01-01T00:00:00",
        "2024-01-01 00:00:00+00:00",
        "2024-01-01T00:00:00.1234567890Z",
    ):
        with pytest.raises(ValueError, match="not an RFC 3339 timestamp"):
            parse_rfc3339(bad)

    path = str(tmp_path / "crate.db")
    store = crate_made(path)
    assert crate_open(path) is False  # at version 2: the crate runs nothing
    assert crate_version(path) == CRATE_SCHEMA_VERSION
    assert column_names(path, "schema_version") == ["version"]
    assert raw_rows(path, "schema_version", ["version"]) == [(2,)]
    assert column_names(path, "sessions") == list(SESSION_COLUMNS)
    history = crate_read_history(path, store.session_id)
    # The crate orders by created_at text, which is not time order once `Z` and `+00:00`
    # stamps mix ("…:01Z" sorts after "…:01.987654321Z").
    stamps = [turn.created_at for turn, _ in CONVERSATION]
    assert [m.id for m in history] == [
        i for _, i in sorted(zip(stamps, store.message_ids, strict=True))
    ]
    assert [m.id for m in history] != store.message_ids
    by_id = {m.id: m for m in history}
    assert [typed(by_id[i].content) for i in store.message_ids] == [
        typed(t.content) for t, _ in CONVERSATION
    ]
    assert [by_id[i].created_at for i in store.message_ids] == [w for _, w in CONVERSATION]
    assert store.messages[0][3] == '"Hello"'
    assert store.messages[1][4] == '{"tool":"test","args":{}}'

    seed = tmp_path / "seed.db"
    make_seed_store(seed)
    with plain(seed) as conn:
        assert conn.all("SELECT name FROM sqlite_master WHERE name = 'schema_version'") == []


# --- (a) the crate's store, read here ---------------------------------------------------------


def test_our_history_reads_the_values_the_crate_stored(
    crate_store: CrateStore, crate_repo: SessionRepository
) -> None:
    history = crate_repo.get_history(CRATE_KEY)
    assert [m.id for m in history] == crate_store.message_ids
    for message, (turn, when) in zip(history, CONVERSATION, strict=True):
        assert isinstance(message.role, Role)
        assert message.role == Role(turn.role)
        assert typed(message.content) == typed(turn.content), message.id
        assert typed(message.tool_calls) == typed(turn.tool_calls), message.id
        assert message.created_at == when, turn.created_at
        assert is_utc(message.created_at)
        assert message.meta == {}
    hello, blocks = history[0], history[1]
    assert hello.content == "Hello"
    assert isinstance(hello.content, str)
    assert blocks.content == [{"type": "text", "text": "hi"}]
    assert blocks.tool_calls == {"tool": "test", "args": {}}
    assert Role.DEVELOPER.value == "developer"
    assert history[6].role is Role.DEVELOPER
    assert history[7].content == '{"temp_c": 4}'  # a string holding JSON stays a string

    session = crate_repo.get(CRATE_KEY)
    assert session is not None
    assert session.id == crate_store.session_id
    assert session.message_count == len(CONVERSATION)
    assert session.token_usage == 0
    assert session.created_at == at()
    assert session.updated_at == CONVERSATION[-1][1]


def test_migration_3_changes_no_cell_the_crate_wrote(crate_store: CrateStore) -> None:
    target = crate_store.target
    engine = open_database(target)
    try:
        assert [m.version for m in applied_migrations(engine)] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        engine.dispose()

    assert raw_rows(target, "messages", MESSAGE_COLUMNS) == crate_store.messages
    assert raw_rows(target, "sessions", SESSION_COLUMNS) == crate_store.sessions
    assert set(column_names(target, "messages")) == {*MESSAGE_COLUMNS, "metadata"}
    assert set(column_names(target, "sessions")) == {
        *SESSION_COLUMNS,
        "input_tokens",
        "output_tokens",
        "parent_id",
        "forked_from_message_id",
    }
    assert raw_rows(target, "messages", ["metadata"]) == [("{}",)] * len(CONVERSATION)
    assert raw_rows(target, "sessions", ["input_tokens", "output_tokens"]) == [(0, 0)]
    if "://" not in target:
        with plain(target) as conn:
            info = {row[1]: row[2:5] for row in conn.all("PRAGMA table_info(messages)")}
            assert info["metadata"] == ("TEXT", 1, "'{}'")
            info = {row[1]: row[2:5] for row in conn.all("PRAGMA table_info(sessions)")}
            assert info["input_tokens"] == ("INTEGER", 1, "0")
            assert info["output_tokens"] == ("INTEGER", 1, "0")

    # The crate still reads every row it wrote, the same.
    assert sorted(m.id for m in crate_read_history(target, crate_store.session_id)) == (
        crate_store.message_ids
    )
    assert crate_version(target) == SCHEMA_VERSION


def test_a_crate_store_counts_as_migrations_1_and_2(crate_store: CrateStore) -> None:
    target = crate_store.target
    engine = open_database(target, migrate=False)
    try:
        assert [m.version for m in applied_migrations(engine)] == [1, 2]
        assert current_version(engine) == 2
    finally:
        engine.dispose()
    # Looking changed nothing: same cells, same bare one-row version table.
    assert raw_rows(target, "messages", MESSAGE_COLUMNS) == crate_store.messages
    assert raw_rows(target, "sessions", SESSION_COLUMNS) == crate_store.sessions
    assert column_names(target, "schema_version") == ["version"]
    assert raw_rows(target, "schema_version", ["version"]) == [(2,)]

    engine = open_database(target)
    try:
        applied = applied_migrations(engine)
    finally:
        engine.dispose()
    assert [m.version for m in applied] == list(range(1, SCHEMA_VERSION + 1))
    for row in applied[2:]:  # applied here: recorded with their name and checksum
        migration = MIGRATIONS[row.version - 1]
        assert (row.name, row.checksum) == (
            migration.name,
            migration.checksum_for("postgresql" if "://" in target else "sqlite"),
        )
        assert row.applied_at is not None


def test_migrate_status_on_a_crate_store_before_and_after(crate_store: CrateStore) -> None:
    assert SCHEMA_VERSION >= 3
    target = crate_store.target
    newer = SCHEMA_VERSION - 2  # migrations 3 and later: what is genuinely newer

    before = cli_json("--db", target, "migrate", "--status")
    assert (before["schema_version"], before["code_version"]) == (2, SCHEMA_VERSION)
    assert [(m["version"], m["status"]) for m in before["migrations"]] == [
        (version, "applied" if version <= 2 else "pending")
        for version in range(1, SCHEMA_VERSION + 1)
    ]
    text = cli_ok("--db", target, "migrate", "--status")
    assert f"schema version 2; {newer} pending" in text
    code, out, err = cli("--db", target, "status", "--json")
    if code == 0:
        assert json.loads(out)["schema_version"] == 2
    else:  # reading commands ask for the migration, naming the store's version
        assert "schema version 2" in " ".join(err.split())
    # None of it wrote to the store.
    assert raw_rows(target, "messages", MESSAGE_COLUMNS) == crate_store.messages
    assert raw_rows(target, "schema_version", ["version"]) == [(2,)]

    migrated = cli_ok("--db", target, "migrate")
    assert "applied 3" in migrated
    assert "applied 1" not in migrated
    assert "applied 2" not in migrated

    after = cli_json("--db", target, "migrate", "--status")
    assert after["schema_version"] == after["code_version"] == SCHEMA_VERSION
    assert {m["status"] for m in after["migrations"]} == {"applied"}
    assert len(after["migrations"]) == SCHEMA_VERSION
    text = cli_ok("--db", target, "migrate", "--status")
    assert f"schema version {SCHEMA_VERSION}; up to date" in text
    assert "pending" not in text
    report = cli_json("--db", target, "status")
    assert report["schema_version"] == SCHEMA_VERSION
    assert (report["sessions"], report["messages"]) == (1, len(CONVERSATION))
    assert report["damaged_sessions"] == 0


# RFC 3339 text other programs write, and the instant it names, truncated to the microsecond.
STAMPS = [
    ("2024-01-01T00:00:00+00:00", at()),
    ("2024-01-01T00:00:00Z", at()),
    ("2024-01-01T00:00:00.1Z", at(0, 100_000)),
    ("2024-01-01T00:00:00.12+00:00", at(0, 120_000)),
    ("2024-01-01T00:00:00.123+00:00", at(0, 123_000)),
    ("2024-01-01T00:00:00.1234Z", at(0, 123_400)),
    ("2024-01-01T00:00:00.12345+00:00", at(0, 123_450)),
    ("2024-01-01T00:00:00.123456Z", at(0, 123_456)),
    ("2024-01-01T00:00:00.1234567+00:00", at(0, 123_456)),
    ("2024-01-01T00:00:00.12345678Z", at(0, 123_456)),
    ("2024-01-01T00:00:00.999999999Z", at(0, 999_999)),  # truncated, not rounded up
    ("2024-01-01T02:30:00.5+02:30", at(0, 500_000)),
    ("2023-12-31T19:00:00.000000001-05:00", at()),
    ("2024-02-29T23:59:59.123456789-00:00", datetime(2024, 2, 29, 23, 59, 59, 123_456, UTC)),
]


def test_timestamps_others_write_read_as_utc_to_the_microsecond(tmp_path: Path) -> None:
    path = str(tmp_path / "crate.db")
    crate_open(path)
    session_id = crate_create_session(
        path, *CRATE_KEY_PARTS, created_at="2024-01-01T00:00:00.123456789Z"
    )
    crate_append(path, session_id, [Turn("user", text, text) for text, _ in STAMPS])
    engine = open_database(path)
    try:
        repo = SessionRepository(engine)
        history = repo.get_history(CRATE_KEY)
        session = repo.get(CRATE_KEY)
    finally:
        engine.dispose()
    assert [(m.content, m.created_at) for m in history] == STAMPS
    assert all(is_utc(m.created_at) for m in history)
    assert session is not None
    assert session.created_at == at(0, 123_456)
    assert session.updated_at == STAMPS[-1][1]
    assert is_utc(session.created_at)
    assert is_utc(session.updated_at)


# --- (b) what we write, read by the crate ------------------------------------------------------


def our_messages() -> list[NewMessage]:
    """Content of every JSON type, tool calls as an object and as an array, metadata."""
    return [
        NewMessage(Role.USER, "Hello"),
        NewMessage(Role.USER, '{"temp_c": 4}'),
        NewMessage(Role.ASSISTANT, [{"type": "text", "text": "hi"}], {"tool": "test", "args": {}}),
        NewMessage(Role.TOOL, {"temp_c": 4, "city": "Oslo"}, meta={"tool_call_id": "call_1"}),
        NewMessage(Role.ASSISTANT, 42),
        NewMessage(Role.ASSISTANT, -7.25),
        NewMessage(Role.ASSISTANT, True),
        NewMessage(Role.ASSISTANT, False),
        NewMessage(Role.ASSISTANT, None),
        NewMessage(Role.ASSISTANT, ""),
        NewMessage(Role.ASSISTANT, 'héllo ✓ 日本\n"quoted" \\ tab\t'),
        NewMessage(
            Role.ASSISTANT,
            None,
            [{"id": "call_2", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        ),
        NewMessage(Role.DEVELOPER, "Be terse.", meta={"source": "config", "n": [1, 2.5, None]}),
    ]


def assert_the_crate_parses_every_cell(target: str) -> None:
    """Every content, tool_calls and created_at cell of the store parses as the crate
    parses it (JSON; RFC 3339), and so do the sessions' timestamps."""
    for row_id, content, tool_calls, created_at in raw_rows(
        target, "messages", ("id", "content", "tool_calls", "created_at")
    ):
        parse_crate_json(content)
        if tool_calls is not None:
            parse_crate_json(tool_calls)
        assert is_utc(parse_rfc3339(created_at)), (row_id, created_at)
    for row in raw_rows(target, "sessions", ("created_at", "updated_at", "last_compacted_at")):
        for stamp in row:
            if stamp is not None:
                parse_rfc3339(stamp)


def test_the_crate_reads_every_message_we_write(
    crate_store: CrateStore, crate_repo: SessionRepository
) -> None:
    target = crate_store.target
    new = our_messages()
    written = crate_repo.append_messages(
        CRATE_KEY, new, tokens=3, input_tokens=10, output_tokens=20
    )
    one = crate_repo.append_message(
        CRATE_KEY,
        Role.ASSISTANT,
        {"answer": 1},
        tool_calls={"tool": "done"},
        tokens=1,
        input_tokens=2,
        output_tokens=3,
    )
    ours = [*written, one]
    sent: list[tuple[Any, Any, dict[str, Any]]] = [
        *((m.content, m.tool_calls, m.meta or {}) for m in new),
        ({"answer": 1}, {"tool": "done"}, {}),
    ]

    # The cells, exactly as the contract stores them.
    cells = {
        row[0]: row[1:]
        for row in raw_rows(
            target, "messages", ("id", "content", "tool_calls", "metadata", "created_at")
        )
    }
    for message, (content, tool_calls, meta) in zip(ours, sent, strict=True):
        assert message.id is not None
        stored_content, stored_calls, stored_meta, stored_at = cells[message.id]
        assert stored_content == crate_json(content)
        assert stored_calls == (None if tool_calls is None else crate_json(tool_calls))
        assert json.loads(stored_meta) == meta
        assert parse_rfc3339(stored_at) == message.created_at
    assert_the_crate_parses_every_cell(target)

    # The crate sees every row, ours and its own, with the values we gave.
    seen = {m.id: m for m in crate_read_history(target, crate_store.session_id)}
    assert sorted(seen) == sorted([*crate_store.message_ids, *(m.id or 0 for m in ours)])
    for message, (content, tool_calls, _) in zip(ours, sent, strict=True):
        assert message.id is not None
        crate = seen[message.id]
        assert typed(crate.content) == typed(content)
        assert typed(crate.tool_calls) == typed(tool_calls)
        assert crate.created_at == message.created_at
        assert crate.role == message.role

    # And we read the same back, types kept.
    back = crate_repo.get_history(CRATE_KEY)[-len(ours) :]
    assert [m.id for m in back] == [m.id for m in ours]
    for message, (content, tool_calls, meta) in zip(back, sent, strict=True):
        assert typed(message.content) == typed(content)
        assert typed(message.tool_calls) == typed(tool_calls)
        assert message.meta == meta
        assert is_utc(message.created_at)

    session = crate_repo.get(CRATE_KEY)
    assert session is not None
    assert session.token_usage == 3 + 10 + 20 + 1 + 2 + 3
    assert session.message_count == len(CONVERSATION) + len(ours)
    assert raw_rows(target, "sessions", ("input_tokens", "output_tokens")) == [(12, 23)]


def test_the_crate_keeps_working_on_a_store_we_migrated(crate_store: CrateStore) -> None:
    target = crate_store.target
    engine = open_database(target)
    repo = SessionRepository(engine)
    try:
        mine = repo.append_message(CRATE_KEY, Role.USER, "from python", tokens=2)

        assert crate_open(target) is False  # it finds version >= 2 and migrates nothing
        assert crate_version(target) >= CRATE_SCHEMA_VERSION
        later = datetime.now(UTC)
        other = crate_create_session(
            target, "agent_002", "slack", "T01", "channel", "C99", created_at=chrono_stamp(later)
        )
        turns = [
            Turn("user", "Hi from Rust", chrono_stamp(later, nanos=1)),
            Turn(
                "assistant",
                [{"type": "text", "text": "hello"}],
                chrono_stamp(later + timedelta(milliseconds=1), z=True),
                tool_calls={"tool": "lookup", "args": {"q": 1}},
            ),
        ]
        rust_ids = crate_append(target, other, turns)
        again = crate_append(
            target, crate_store.session_id, [Turn("user", "again", chrono_stamp(later))]
        )

        key = SessionKey("agent_002", "slack", "T01", "channel", "C99")
        session = repo.get(key)
        assert session is not None
        assert (session.message_count, session.token_usage, session.meta) == (2, 0, {})
        history = repo.get_history(key)
        assert [m.id for m in history] == rust_ids
        assert [(m.role, m.content, m.tool_calls, m.meta) for m in history] == [
            (Role.USER, "Hi from Rust", None, {}),
            (
                Role.ASSISTANT,
                [{"type": "text", "text": "hello"}],
                {"tool": "lookup", "args": {"q": 1}},
                {},
            ),
        ]
        assert history[0].created_at == later  # nine digits, truncated back
        assert [m.content for m in repo.get_history(CRATE_KEY)][-2:] == ["from python", "again"]
        repo.append_message(key, Role.ASSISTANT, {"ok": True}, input_tokens=1, output_tokens=1)
    finally:
        engine.dispose()

    assert raw_rows(target, "sessions", ("id", "input_tokens", "output_tokens")) == [
        (crate_store.session_id, 0, 0),
        (other, 1, 1),
    ]
    seen = [m.id for m in crate_read_history(target, crate_store.session_id)]
    assert mine.id is not None
    assert sorted(seen) == sorted([*crate_store.message_ids, mine.id, *again])
    assert len(crate_read_history(target, other)) == 3
    assert_the_crate_parses_every_cell(target)


def test_a_store_we_create_is_one_the_crate_opens_and_writes(target: str) -> None:
    engine = open_database(target)
    repo = SessionRepository(engine)
    try:
        repo.get_or_create(CRATE_KEY)
        repo.append_messages(CRATE_KEY, our_messages(), input_tokens=5, output_tokens=6)
        session = repo.get(CRATE_KEY)
        assert session is not None
        assert session.id is not None
    finally:
        engine.dispose()
    assert crate_open(target) is False
    assert crate_version(target) == SCHEMA_VERSION
    stamp = chrono_stamp(datetime.now(UTC) + timedelta(seconds=1))
    rust = crate_append(target, session.id, [Turn("user", "from Rust", stamp)])
    crate_create_session(target, "agent_003", "irc", "net", "dm", "bob", created_at=stamp)
    seen = crate_read_history(target, session.id)
    assert len(seen) == len(our_messages()) + 1
    assert seen[-1].id == rust[0]
    assert_the_crate_parses_every_cell(target)


def test_summaries_and_imports_are_stored_as_json_too(
    crate_store: CrateStore, tmp_path: Path
) -> None:
    target = crate_store.target
    engine = open_database(target)
    repo = SessionRepository(engine)
    try:
        repo.append_messages(
            CRATE_KEY, [NewMessage(Role.USER, "q"), NewMessage(Role.ASSISTANT, {"a": 1})]
        )
        result = repo.compact(CRATE_KEY, keep_last=2, summary="The user said hello.")
        history = repo.get_history(CRATE_KEY)
        assert history[0].content == "The user said hello."
        assert [m.content for m in history[1:]] == ["q", {"a": 1}]
        assert result.summary is not None
        out = io.StringIO()
        export_jsonl(engine, out)
    finally:
        engine.dispose()
    assert_the_crate_parses_every_cell(target)
    crate_view = crate_read_history(target, crate_store.session_id)
    assert len(crate_view) == 3
    assert [m.content for m in crate_view if m.id == history[0].id] == ["The user said hello."]

    # The export, imported into another crate file, is JSON there too.
    other = str(tmp_path / "other-crate.db")
    assert crate_open(other) is True
    imported_engine = open_database(other)
    try:
        imported = import_jsonl(imported_engine, io.StringIO(out.getvalue()))
        assert imported.errors == []
        again = SessionRepository(imported_engine).get_history(CRATE_KEY)
    finally:
        imported_engine.dispose()
    assert [typed(m.content) for m in again] == [typed(m.content) for m in history]
    assert_the_crate_parses_every_cell(other)
    [(other_id,)] = raw_rows(other, "sessions", ["id"])
    assert [typed(m.content) for m in crate_read_history(other, other_id)] == [
        typed(m.content) for m in history
    ]


def test_the_crate_returns_the_oldest_1000_by_default_where_we_return_all(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "crate.db")
    crate_open(path)
    session_id = crate_create_session(path, *CRATE_KEY_PARTS, created_at="2024-01-01T00:00:00Z")
    now = [datetime(2025, 1, 1, tzinfo=UTC)]
    engine = open_database(path, clock=lambda: now[0])
    try:
        repo = SessionRepository(engine)
        first = repo.append_messages(
            CRATE_KEY, [NewMessage(Role.USER, f"m{i}") for i in range(CRATE_HISTORY_LIMIT)]
        )
        now[0] += timedelta(seconds=1)
        last = repo.append_message(CRATE_KEY, Role.USER, "the newest")
        assert len(repo.get_history(CRATE_KEY)) == CRATE_HISTORY_LIMIT + 1
        newest = repo.get_history(CRATE_KEY, limit=CRATE_HISTORY_LIMIT)
    finally:
        engine.dispose()
    assert newest[-1].id == last.id  # ours: the newest `limit`, by id
    seen = crate_read_history(path, session_id)  # the crate's: the oldest 1 000, by time
    assert sorted(m.id for m in seen) == [m.id for m in first]
    assert len(crate_read_history(path, session_id, limit=CRATE_HISTORY_LIMIT + 1)) == (
        CRATE_HISTORY_LIMIT + 1
    )


# --- (c) a seed store with text content, and cells outside the contract ------------------------

# Content cells plain SQL wrote as text, none of them JSON.
TEXT_CELLS = [
    "plain text",
    "",
    'Hello "world"',
    "{not json",
    "{a: 1}",
    "NaN",
    "Infinity",
    "true story",
    "'single quotes'",
    "héllo ✓ 日本",
    "line 1\nline 2",
]
# Content cells that are JSON already, and the values they hold.
JSON_CELLS: list[tuple[str, Any]] = [
    ('"quoted"', "quoted"),
    ("[1,2]", [1, 2]),
    ('{"a":1}', {"a": 1}),
    ("null", None),
]


def adopted_seed_store(target: str, cells: list[str]) -> tuple[int, list[int], list[Any]]:
    """A seed store (plain SQL, no schema_version) holding one message per content cell,
    opened here: its session id, the message ids, and the contents our history returns."""
    make_seed_store(target)
    session_id = crate_create_session(target, *CRATE_KEY_PARTS, created_at="2024-01-01 00:00:00")
    stamp = "2024-01-01T00:00:00.000000+00:00"
    ids = [insert_raw_message(target, session_id, "user", cell, stamp) for cell in cells]
    engine = open_database(target)
    try:
        assert [m.version for m in applied_migrations(engine)] == list(range(1, SCHEMA_VERSION + 1))
        history = SessionRepository(engine).get_history(CRATE_KEY)
    finally:
        engine.dispose()
    assert [m.id for m in history] == ids
    return session_id, ids, [m.content for m in history]


def test_a_seed_store_with_text_content_is_adopted_and_its_text_kept(target: str) -> None:
    session_id, ids, contents = adopted_seed_store(target, TEXT_CELLS)
    assert [typed(content) for content in contents] == [typed(text) for text in TEXT_CELLS]
    stored = [content for (content,) in raw_rows(target, "messages", ["content"])]
    assert stored == [crate_json(text) for text in TEXT_CELLS]  # now JSON strings
    # The crate, which dropped every one of these rows, now reads them as the same text.
    seen = crate_read_history(target, session_id)
    assert sorted(m.id for m in seen) == ids
    by_id = {m.id: m.content for m in seen}
    assert [by_id[i] for i in ids] == TEXT_CELLS


def test_a_seed_store_keeps_its_content_cells_that_are_json(target: str) -> None:
    cells = [cell for cell, _ in JSON_CELLS]
    session_id, ids, contents = adopted_seed_store(target, [*cells, "not JSON"])
    assert [typed(content) for content in contents] == [
        *(typed(value) for _, value in JSON_CELLS),
        typed("not JSON"),
    ]
    stored = [content for (content,) in raw_rows(target, "messages", ["content"])]
    assert stored == [*cells, '"not JSON"']  # only the cell that is not JSON is quoted
    by_id = {m.id: m.content for m in crate_read_history(target, session_id)}
    assert [typed(by_id[i]) for i in ids] == [*(typed(v) for _, v in JSON_CELLS), typed("not JSON")]


# (role, content, tool_calls) cells other programs may write after we migrated.
OUTSIDE_CELLS: list[tuple[str, str, str | None]] = [
    ("critic", '"A fine answer."', None),
    ("USER", '"shouting"', None),
    ("assistant", "raw, not JSON", None),
    ("assistant", '"calling"', "{broken"),
    ("tool", "NaN", "not json either"),
    ("Critic", "{a: 1}", "[1, 2"),
]


def test_cells_outside_the_contract_read_leniently(
    store: Engine, store_repo: SessionRepository, key: SessionKey
) -> None:
    store_repo.get_or_create(key)
    first = store_repo.append_message(key, Role.USER, "ours")
    for role, content, tool_calls in OUTSIDE_CELLS:
        run_sql(
            store,
            "INSERT INTO messages (session_id, role, content, tool_calls, created_at) "
            "VALUES (?, ?, ?, ?, '2026-01-01T00:00:00.000000+00:00')",
            (first.session_id, role, content, tool_calls),
        )

    history = store_repo.get_history(key)  # no row fails it, none is dropped
    assert len(history) == 1 + len(OUTSIDE_CELLS)
    assert history[0].content == "ours"
    critic, shouting, raw, calling, nan, other = history[1:]

    assert critic.role == "critic"
    assert type(critic.role) is str  # the stored text, not a Role
    assert critic.content == "A fine answer."
    assert shouting.role is Role.USER  # roles are read case-insensitively
    assert shouting.content == "shouting"
    assert raw.content == "raw, not JSON"
    assert (calling.content, calling.tool_calls) == ("calling", "{broken")
    assert (nan.role, nan.content, nan.tool_calls) == (Role.TOOL, "NaN", "not json either")
    assert isinstance(nan.content, str)
    assert (other.role, other.content, other.tool_calls) == ("Critic", "{a: 1}", "[1, 2")
    assert not isinstance(other.role, Role)
    for message in history:
        assert message.meta == {}

    # Paging reads past them too.
    assert [m.id for m in store_repo.get_history(key, limit=2)] == [m.id for m in history[-2:]]
    assert [m.id for m in store_repo.get_history(key, after_id=first.id, limit=3)] == [
        m.id for m in history[1:4]
    ]


def test_a_non_json_tool_calls_cell_in_a_seed_store_reads_as_its_text(target: str) -> None:
    make_seed_store(target)
    session_id = crate_create_session(target, *CRATE_KEY_PARTS, created_at="2024-01-01T00:00:00Z")
    insert_raw_message(
        target,
        session_id,
        "assistant",
        "calling a tool",
        "2024-01-01T00:00:01Z",
        "get_weather(Oslo)",
    )
    engine = open_database(target)
    try:
        [message] = SessionRepository(engine).get_history(CRATE_KEY)
    finally:
        engine.dispose()
    assert (message.role, message.content, message.tool_calls) == (
        Role.ASSISTANT,
        "calling a tool",
        "get_weather(Oslo)",
    )
    assert message.created_at == at(1)
