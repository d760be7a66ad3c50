"""The store's limits: counters stay 64-bit integers, keys fit every backend's index,
numeric arguments fit what the database takes, and no text value is too big to store.
Past a limit the call raises a `ValueError` naming what was too big, and nothing is
written; just inside it, everything works on both backends."""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from aisopod_session import (
    NewMessage,
    Role,
    SessionKey,
    SessionRepository,
    SessionStoreError,
    export_jsonl,
    import_jsonl,
    open_async_database,
    open_database,
)
from tests.dbtools import raw_connect, run_sql, snapshot

TOP = 2**63 - 1
"""The largest signed 64-bit integer: SQLite's INTEGER and PostgreSQL's BIGINT."""

KEY_BYTES = 2560
"""The announced `aisopod_session.keys.MAX_KEY_BYTES`: UTF-8 bytes of a key's five parts
together (PostgreSQL's btree index refuses rows past about 2 704 bytes)."""

TEXT_BYTES = 256 * 1024 * 1024
"""The announced `aisopod_session.models.MAX_TEXT_BYTES`: UTF-8 bytes of one stored text
value (content, summary, the JSON text of tool calls or metadata)."""


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """Unless a test says otherwise, it runs on both backends through both APIs."""
    return store_repo


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


# --- counters -----------------------------------------------------------------------------


def token_usage_type(store_url: str) -> str:
    """What SQLite holds in `token_usage`, read with plain SQL: 'integer' or 'real'."""
    conn = raw_connect(Path(store_url))
    try:
        (kind,) = conn.execute("SELECT typeof(token_usage) FROM sessions").fetchone()
    finally:
        conn.close()
    return str(kind)


def test_an_append_that_would_overflow_token_usage_is_refused_naming_tokens(
    repo: SessionRepository, store: Engine, store_url: str, key: SessionKey
) -> None:
    """2**62 + 2**62 does not fit in 64 signed bits: the second append is bad input, and
    neither the counters nor the messages move."""
    repo.get_or_create(key)
    repo.append_message(key, Role.USER, "x", tokens=2**62)
    before = snapshot(store)
    with pytest.raises(ValueError, match="tokens"):
        repo.append_message(key, Role.USER, "x", tokens=2**62)
    assert snapshot(store) == before
    session = repo.get(key)
    assert session is not None
    assert session.token_usage == 2**62
    assert type(session.token_usage) is int
    assert session.message_count == 1
    assert [m.content for m in repo.get_history(key)] == ["x"]
    if is_sqlite(store):
        # SQLite turns an integer sum that overflows into a REAL (9.223372036854776e+18).
        assert token_usage_type(store_url) == "integer"


def test_a_batch_append_that_would_overflow_token_usage_is_refused_naming_tokens(
    repo: SessionRepository, store: Engine, store_url: str, key: SessionKey
) -> None:
    """The same rule through `append_messages`: no message of the batch is stored."""
    repo.get_or_create(key)
    repo.append_messages(key, [NewMessage(Role.USER, "a")], tokens=2**62)
    before = snapshot(store)
    batch = [NewMessage(Role.USER, "b"), NewMessage(Role.ASSISTANT, "c")]
    with pytest.raises(ValueError, match="tokens"):
        repo.append_messages(key, batch, tokens=2**62)
    assert snapshot(store) == before
    session = repo.get(key)
    assert session is not None
    assert (session.token_usage, session.message_count) == (2**62, 1)
    if is_sqlite(store):
        assert token_usage_type(store_url) == "integer"


def test_an_append_past_a_token_usage_set_near_the_top_by_plain_sql_is_refused(
    repo: SessionRepository, store: Engine, store_url: str, key: SessionKey
) -> None:
    """A counter written by plain SQL near the top: 20 more tokens would pass 2**63 - 1."""
    session = repo.get_or_create(key)
    run_sql(store, "UPDATE sessions SET token_usage = ? WHERE id = ?", (TOP - 9, session.id))
    before = snapshot(store)
    with pytest.raises(ValueError, match="tokens"):
        repo.append_message(key, Role.USER, "x", tokens=20)
    assert snapshot(store) == before
    after = repo.get(key)
    assert after is not None
    assert after.token_usage == TOP - 9
    assert repo.get_history(key) == []
    if is_sqlite(store):
        assert token_usage_type(store_url) == "integer"


def test_an_append_that_exactly_reaches_the_top_is_stored(
    repo: SessionRepository, store: Engine, key: SessionKey
) -> None:
    """The limit is the range, not a margin below it: 2**63 - 1 itself is a valid total."""
    session = repo.get_or_create(key)
    run_sql(store, "UPDATE sessions SET token_usage = ? WHERE id = ?", (TOP - 9, session.id))
    repo.append_message(key, Role.USER, "x", tokens=9)
    after = repo.get(key)
    assert after is not None
    assert after.token_usage == TOP
    assert type(after.token_usage) is int


def test_an_append_past_a_message_count_at_the_top_is_refused_and_writes_nothing(
    repo: SessionRepository, store: Engine, store_url: str, key: SessionKey
) -> None:
    """`message_count` is a counter too (only plain SQL can bring it to its top: 2**63 - 1
    on SQLite, 2**31 - 1 in PostgreSQL's INTEGER column): one more message would leave
    the range. Which error is not specified, so either kind of refusal passes; what
    matters is that nothing is written and the value stays an integer."""
    session = repo.get_or_create(key)
    top = TOP if is_sqlite(store) else 2**31 - 1
    run_sql(store, "UPDATE sessions SET message_count = ? WHERE id = ?", (top, session.id))
    before = snapshot(store)
    with pytest.raises((ValueError, SessionStoreError)):
        repo.append_message(key, Role.USER, "x")
    assert snapshot(store) == before
    if is_sqlite(store):
        conn = raw_connect(Path(store_url))
        try:
            (kind,) = conn.execute("SELECT typeof(message_count) FROM sessions").fetchone()
        finally:
            conn.close()
        assert kind == "integer"


def test_a_store_whose_overflowing_append_was_refused_still_exports_and_imports(
    repo: SessionRepository, store: Engine, tmp_path: Path, key: SessionKey
) -> None:
    """After the refused call the export is a valid one: every line imports into a fresh
    store, the counter intact (on SQLite a float total used to make the export unreadable:
    `token_usage: Input should be a valid integer`)."""
    session = repo.get_or_create(key)
    repo.append_message(key, Role.USER, "before")
    run_sql(store, "UPDATE sessions SET token_usage = ? WHERE id = ?", (TOP - 9, session.id))
    # The refusal itself is asserted above; here only what the store holds matters.
    with contextlib.suppress(ValueError, SessionStoreError):
        repo.append_message(key, Role.USER, "x", tokens=20)
    out = io.StringIO()
    export_jsonl(store, out)
    restored = open_database(tmp_path / "restored.db")
    try:
        result = import_jsonl(restored, out.getvalue().splitlines())
        assert result.errors == []
        copy = SessionRepository(restored).get(key)
        assert copy is not None
        assert copy.token_usage == TOP - 9
        assert type(copy.token_usage) is int
    finally:
        restored.dispose()


# --- keys ---------------------------------------------------------------------------------


def part_of(size: int) -> str:
    """A key part of exactly `size` UTF-8 bytes in at most 255 characters: as many
    four-byte emoji as needed, topped up with ASCII."""
    emoji = max(0, -(-(size - 255) // 3))  # each emoji is 3 bytes more than an ASCII char
    text = "😀" * emoji + "a" * (size - 4 * emoji)
    assert len(text.encode()) == size
    assert len(text) <= 255
    return text


def key_of(total: int) -> SessionKey:
    """A key whose five parts take exactly `total` bytes (peer_kind 'dm' takes 2), each
    part at most 255 characters, so only the byte total can be what is refused."""
    rest = total - 2
    sizes = [rest // 4 + (1 if i < rest % 4 else 0) for i in range(4)]
    agent, channel, account, peer = (part_of(size) for size in sizes)
    return SessionKey(agent, channel, account, "dm", peer)


def test_the_key_byte_limit_is_announced_as_2560() -> None:
    """The constant the rule uses is public, so callers can check before calling."""
    from aisopod_session.keys import MAX_KEY_BYTES

    assert MAX_KEY_BYTES == KEY_BYTES


def test_a_key_of_255_four_byte_characters_per_part_is_refused_naming_the_key() -> None:
    """Every part is within 255 characters, but the five take 5 100 bytes: PostgreSQL's
    index cannot hold that (SQLite could), so the key itself is refused on both."""
    wide = "😀" * 255
    with pytest.raises(ValueError, match=r"key|2560|2 560"):
        SessionKey(wide, wide, wide, "dm", wide)


def test_a_key_one_byte_over_the_limit_is_refused_naming_the_key() -> None:
    """The rule is about bytes, exactly: 2 561 bytes in 255-character parts is refused."""
    with pytest.raises(ValueError, match=r"key|2560|2 560"):
        key_of(KEY_BYTES + 1)


def test_an_oversized_key_given_as_text_is_refused_by_every_backend_alike(
    repo: SessionRepository, store: Engine
) -> None:
    """The repository refuses it as bad input (not as a store error from PostgreSQL's
    index), and nothing is written."""
    wide = "😀" * 255
    before = snapshot(store)
    with pytest.raises(ValueError, match=r"key|2560|2 560"):
        repo.get_or_create(f"{wide}:{wide}:{wide}:dm:{wide}")
    assert snapshot(store) == before


def test_a_key_of_exactly_the_byte_limit_is_stored_and_read_back(repo: SessionRepository) -> None:
    """2 560 bytes of emoji and ASCII, each part at most 255 characters: created,
    appended to, read back and listed on both backends."""
    key = key_of(KEY_BYTES)
    assert sum(len(part.encode()) for part in key.parts()) == KEY_BYTES
    session = repo.get_or_create(key)
    assert session.key == key
    repo.append_message(key, Role.USER, "at the limit")
    assert [m.content for m in repo.get_history(key)] == ["at the limit"]
    assert repo.get_or_create(key).id == session.id
    assert repo.get_or_create(str(key)).id == session.id
    listed = repo.list_sessions({"agent_id": key.agent_id})
    assert [s.key for s in listed] == [key]


# --- numeric arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("busy_timeout", [3e6, 2_147_484, math.inf, math.nan])
def test_a_busy_timeout_sqlite_cannot_take_is_refused_naming_it(
    store_url: str, busy_timeout: float
) -> None:
    """SQLite's busy timeout is a 32-bit count of milliseconds (at most about 2 147 483 s):
    3e6 s used to become no wait at all, infinity an OverflowError. Both backends check
    the same argument."""
    with pytest.raises(ValueError, match="busy_timeout"):
        open_database(store_url, busy_timeout=busy_timeout).dispose()


def test_asyncio_opening_refuses_the_same_busy_timeouts(tmp_path: Path) -> None:
    """`open_async_database` takes the same arguments and applies the same rule."""

    async def open_and_close(busy_timeout: float) -> None:
        engine = await open_async_database(tmp_path / "a.db", busy_timeout=busy_timeout)
        await engine.dispose()

    for busy_timeout in (3e6, math.inf):
        with pytest.raises(ValueError, match="busy_timeout"):
            asyncio.run(open_and_close(busy_timeout))


def test_the_longest_busy_timeout_sqlite_takes_is_kept_not_truncated(db_path: Path) -> None:
    """2 000 000 s fits SQLite's 32-bit milliseconds: it is accepted and is what the
    connections get (not a wrapped-around value)."""
    engine = open_database(db_path, busy_timeout=2_000_000)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 2_000_000_000
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "idle_for", [timedelta(days=999_999_999), timedelta.max], ids=["999999999d", "max"]
)
def test_an_idle_for_reaching_before_year_one_is_refused_naming_it(
    repo: SessionRepository, store: Engine, key: SessionKey, idle_for: timedelta
) -> None:
    """now - idle_for has no datetime: a ValueError naming `idle_for` (it used to be an
    OverflowError from datetime arithmetic), and no session changes."""
    repo.get_or_create(key)
    before = snapshot(store)
    with pytest.raises(ValueError, match="idle_for"):
        repo.mark_idle(idle_for=idle_for)
    assert snapshot(store) == before


# --- text values --------------------------------------------------------------------------


def test_the_text_byte_limit_is_announced_as_256_mib() -> None:
    """The constant the rule uses is public."""
    from aisopod_session.validation import MAX_TEXT_BYTES

    assert MAX_TEXT_BYTES == TEXT_BYTES


@pytest.fixture(scope="module")
def over_limit() -> str:
    """One ASCII text of 256 MiB + 1 byte, built once for the module (ASCII is the
    cheapest for the store to validate)."""
    return "a" * (TEXT_BYTES + 1)


@pytest.fixture(scope="module")
def over_limit_in_fewer_characters() -> str:
    """256 MiB + 1 byte of UTF-8 in 128 Mi + 1 characters (two-byte 'é's and one ASCII
    byte): a limit counted in characters would let it through."""
    return "é" * (TEXT_BYTES // 2) + "a"


@pytest.fixture
def sync_repo(store: Engine, key: SessionKey) -> SessionRepository:
    """The huge values go through the sync API only (one copy of the work per backend),
    on a session with one message already in it."""
    repo = SessionRepository(store)
    repo.get_or_create(key)
    repo.append_message(key, Role.USER, "first")
    return repo


HugeCall = Callable[[SessionRepository, SessionKey, str], object]

HUGE_CALLS: dict[str, tuple[str, HugeCall]] = {
    "content": ("content", lambda r, k, big: r.append_message(k, Role.USER, big)),
    "content in a batch": (
        "content",
        lambda r, k, big: r.append_messages(
            k, [NewMessage(Role.USER, "small"), NewMessage(Role.USER, big)]
        ),
    ),
    "summary": ("summary", lambda r, k, big: r.compact(k, keep_last=0, summary=big)),
    "tool_calls": (
        "tool_calls",
        lambda r, k, big: r.append_message(k, Role.ASSISTANT, "", tool_calls=[{"args": big}]),
    ),
    "metadata": ("changes|metadata", lambda r, k, big: r.update_metadata(k, {"note": big})),
    "metadata replaced": (
        "changes|metadata",
        lambda r, k, big: r.update_metadata(k, {"note": big}, replace=True),
    ),
}


@pytest.mark.parametrize("case", list(HUGE_CALLS))
def test_a_text_value_over_256_mib_is_refused_naming_the_field_before_writing(
    sync_repo: SessionRepository, store: Engine, key: SessionKey, over_limit: str, case: str
) -> None:
    """256 MiB + 1 byte is over the store's limit for one text value: a ValueError naming
    the field, raised before anything is written (SQLite alone would have stored it, and
    past 1e9 bytes failed with a store error)."""
    field, call = HUGE_CALLS[case]
    before = snapshot(store)
    with pytest.raises(ValueError, match=field):
        call(sync_repo, key, over_limit)
    assert snapshot(store) == before


def test_the_text_limit_counts_utf8_bytes_not_characters(
    engine: Engine, key: SessionKey, over_limit_in_fewer_characters: str
) -> None:
    """128 Mi characters are within 256 Mi, but their 256 MiB + 1 byte of UTF-8 is what
    the database stores: refused naming `content`, nothing written. (How the size is
    counted does not depend on the backend: SQLite only, to keep the module quick.)"""
    repo = SessionRepository(engine)
    repo.get_or_create(key)
    before = snapshot(engine)
    with pytest.raises(ValueError, match="content"):
        repo.append_message(key, Role.USER, over_limit_in_fewer_characters)
    assert snapshot(engine) == before


def test_multi_megabyte_values_are_still_stored_exactly(
    sync_repo: SessionRepository, key: SessionKey
) -> None:
    """Well under the limit, big values are kept exactly: 8 MiB of content, of tool
    calls, of metadata and of a compaction summary."""
    big = "é" * (4 * 1024 * 1024)  # 8 MiB of UTF-8
    message = sync_repo.append_message(key, Role.ASSISTANT, big, tool_calls=[{"args": big}])
    assert message.id is not None
    sync_repo.update_metadata(key, {"note": big})
    stored = sync_repo.get_history(key, after_id=message.id - 1)
    assert [(m.content, m.tool_calls) for m in stored] == [(big, [{"args": big}])]
    sync_repo.append_message(key, Role.USER, "last")
    result = sync_repo.compact(key, keep_last=1, summary=big)
    assert result.summary is not None
    assert [m.content == big for m in sync_repo.get_history(key)] == [True, False]
    session = sync_repo.get(key)
    assert session is not None
    assert session.meta == {"note": big}
    assert session.last_compaction_summary == big


def test_ids_past_32_bits_work_in_every_call_that_takes_one(
    repo: SessionRepository, store: Engine
) -> None:
    """PostgreSQL's ids are BIGINT: a store whose ids have passed 2**31 (SQLite's are
    64-bit from the start) appends, reads, pages, searches, forks, pops, compacts, resets
    and prunes, exports and imports like any other (each id parameter was cast to 32 bits
    there before)."""
    start = 3_000_000_000
    if is_sqlite(store):
        run_sql(store, "INSERT INTO sqlite_sequence (name, seq) VALUES ('sessions', ?)", (start,))
        run_sql(store, "INSERT INTO sqlite_sequence (name, seq) VALUES ('messages', ?)", (start,))
    else:
        run_sql(store, f"ALTER TABLE sessions ALTER COLUMN id RESTART WITH {start}")
        run_sql(store, f"ALTER TABLE messages ALTER COLUMN id RESTART WITH {start}")
    key = SessionKey("agent-1", "telegram", "bot-A", "dm", "big")
    session = repo.create(key)
    assert session.id is not None
    assert session.id >= start
    assert repo.get_by_id(session.id) == session
    written = repo.append_messages(key, [NewMessage(Role.USER, f"m{i}") for i in range(4)])
    assert all((m.id or 0) >= start for m in written)
    ids = [m.id or 0 for m in written]
    assert repo.get_history(key, limit=2, before_id=ids[3]) == written[1:3]
    assert repo.get_history(key, limit=2, after_id=ids[0]) == written[1:3]
    assert [hit.message for hit in repo.search_messages("m1")] == [written[1]]
    branch = repo.fork(key, key.model_copy(update={"peer_id": "branch"}), up_to_id=ids[1])
    assert (branch.parent_id, branch.forked_from_message_id) == (session.id, ids[1])
    first = repo.page_sessions(limit=1)
    assert first.next_cursor is not None
    second = repo.page_sessions(limit=1, cursor=first.next_cursor)
    assert {s.key.peer_id for s in first.sessions + second.sessions} == {"big", "branch"}
    out = io.StringIO()
    export_jsonl(store, out)
    again = import_jsonl(store, out.getvalue().splitlines())  # ids already there: kept
    assert (again.errors, again.messages_imported) == ([], 0)
    assert repo.pop_message(key) == written[3]
    result = repo.compact(key, keep_last=1, summary="earlier turns")
    assert result.removed == 2
    assert [m.content for m in repo.get_history(key)] == ["earlier turns", "m2"]
    assert repo.reset(key).message_count == 0
    assert repo.get_history(key) == []
    assert repo.prune(updated_before=repo.now() + timedelta(days=1)) == 2
