"""One clock per store: PostgreSQL stamps every write with the server's time, so hosts
with skewed clocks agree; SQLite never stamps a message earlier than the newest one
stored, so `created_at` follows id order whatever the host's clock does; a clock given to
`open_database` replaces either (freezegun-based tests use one)."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from freezegun import freeze_time
from sqlalchemy import Engine

from aisopod_session import Role, SessionKey, SessionRepository, open_database
from tests.dbtools import run_sql

KEY = SessionKey("agent-1", "telegram", "bot", "dm", "u1")
OTHER = SessionKey("agent-1", "telegram", "bot", "dm", "u2")
T = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def server_now(engine: Engine) -> datetime:
    with engine.connect() as conn:
        value = conn.exec_driver_sql("SELECT clock_timestamp()").scalar_one()
    assert isinstance(value, datetime)
    return value.astimezone(UTC)


# --- PostgreSQL: the server's clock -------------------------------------------------------


def test_a_slow_hosts_append_is_not_pruned_as_idle_by_a_correct_host(
    pg_store: Engine,
) -> None:
    """The reported loss: a host 2 h slow appends to a live session; a prune of sessions
    idle for 1 h, run from a correct clock, deleted it."""
    repo = SessionRepository(pg_store)
    repo.get_or_create(KEY)
    before = server_now(pg_store)
    with freeze_time(datetime.now(UTC) - timedelta(hours=2), tick=True):
        appended = repo.append_message(KEY, Role.USER, "from the slow host")
    after = server_now(pg_store)
    assert before <= appended.created_at <= after
    session = repo.get(KEY)
    assert session is not None
    assert before <= session.updated_at <= after
    assert repo.prune(updated_before=datetime.now(UTC) - timedelta(hours=1)) == 0
    assert repo.get(KEY) is not None


def test_a_fast_hosts_mark_idle_uses_the_servers_time(pg_store: Engine) -> None:
    """mark_idle's cutoff is the server's now minus idle_for, not the caller's."""
    repo = SessionRepository(pg_store)
    repo.get_or_create(KEY)
    repo.append_message(KEY, Role.USER, "just now")
    with freeze_time(datetime.now(UTC) + timedelta(hours=2), tick=True):
        assert repo.mark_idle(idle_for=timedelta(hours=1)) == 0
        store_now = repo.now()
    assert abs(store_now - server_now(pg_store)) < timedelta(minutes=1)
    session = repo.get(KEY)
    assert session is not None
    assert session.status.value == "active"


def test_hosts_with_skewed_clocks_keep_created_at_in_id_order(pg_store: Engine) -> None:
    """Appends alternate between a host 2 h slow, a correct one and one 2 h fast: every
    stamp is the server's, so created_at never goes backwards in id order."""
    repo = SessionRepository(pg_store)
    repo.get_or_create(KEY)
    repo.get_or_create(OTHER)
    for i in range(12):
        skew = timedelta(hours=(i % 3 - 1) * 2)
        with freeze_time(datetime.now(UTC) + skew, tick=True):
            repo.append_message(KEY if i % 2 else OTHER, Role.USER, f"m{i}")
    stamps = [m.created_at for m in repo.get_history(KEY) + repo.get_history(OTHER)]
    ordered = [
        m.created_at
        for m in sorted(repo.get_history(KEY) + repo.get_history(OTHER), key=lambda m: m.id or 0)
    ]
    assert ordered == sorted(ordered)
    assert max(stamps) - min(stamps) < timedelta(minutes=1)


def test_a_write_that_waited_for_the_row_lock_is_stamped_after_it(
    pg_store: Engine, pg_url: str
) -> None:
    """The server's time is read after the session's row is locked: an append that waits
    for another transaction's lock is stamped after that transaction ended."""
    repo = SessionRepository(pg_store)
    session = repo.get_or_create(KEY)
    first = repo.append_message(KEY, Role.USER, "first")
    plain = psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql"))
    try:
        plain.execute("SELECT id FROM sessions WHERE id = %s FOR UPDATE", (session.id,))
        result: list[object] = []
        waiter = threading.Thread(
            target=lambda: result.append(repo.append_message(KEY, Role.USER, "waited"))
        )
        waiter.start()
        time.sleep(0.5)
        (released,) = plain.execute("SELECT clock_timestamp()").fetchone()  # type: ignore[misc]
        plain.commit()
        waiter.join(timeout=30)
    finally:
        plain.close()
    (waited,) = result
    assert isinstance(waited, type(first))
    assert waited.created_at >= released.astimezone(UTC)
    assert waited.created_at > first.created_at


def test_a_clock_given_to_open_database_stamps_every_write(pg_url: str) -> None:
    engine = open_database(pg_url, clock=lambda: T)
    try:
        repo = SessionRepository(engine)
        created = repo.get_or_create(KEY)
        appended = repo.append_message(KEY, Role.USER, "hi")
        assert created.created_at == appended.created_at == T
        assert repo.now() == T
    finally:
        engine.dispose()


@pytest.mark.parametrize("bad", [42, "now"])
def test_a_clock_must_be_callable(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="clock"):
        open_database(tmp_path / "s.db", clock=bad)  # type: ignore[arg-type]


def test_a_clock_returning_a_naive_time_is_refused_before_writing(tmp_path: Path) -> None:
    engine = open_database(tmp_path / "s.db", clock=lambda: datetime(2026, 1, 1))
    try:
        with pytest.raises(TypeError, match="aware"):
            SessionRepository(engine).get_or_create(KEY)
    finally:
        engine.dispose()


# --- SQLite: never backwards ----------------------------------------------------------------


def test_created_at_never_goes_backwards_when_the_clock_is_set_back(
    engine: Engine, tmp_path: Path
) -> None:
    repo = SessionRepository(engine)
    with freeze_time(T):
        repo.get_or_create(KEY)
        first = repo.append_message(KEY, Role.USER, "at T")
    with freeze_time(T - timedelta(hours=2)):
        repo.get_or_create(OTHER)
        other = repo.append_message(OTHER, Role.USER, "clock set back 2 h")
        again = repo.append_message(KEY, Role.USER, "still set back")
        assert repo.now() == T
    assert first.id is not None
    assert other.id is not None
    assert again.id is not None
    assert first.id < other.id < again.id
    assert first.created_at <= other.created_at <= again.created_at
    assert other.created_at == again.created_at == T
    session = repo.get(KEY)
    assert session is not None
    assert session.updated_at == T  # the append's stamp, never before its own messages
    with freeze_time(T + timedelta(minutes=1)):
        later = repo.append_message(KEY, Role.USER, "clock right again")
    assert later.created_at == T + timedelta(minutes=1)


def test_text_that_is_not_a_time_does_not_pin_the_clock(engine: Engine, db_path: Path) -> None:
    """A last message whose created_at plain SQL left as text that is no time is passed
    over (read leniently), not copied into new rows."""
    repo = SessionRepository(engine)
    repo.get_or_create(KEY)
    with freeze_time(T):
        repo.append_message(KEY, Role.USER, "first")
    run_sql(db_path, "UPDATE messages SET created_at = 'zzz not a time'")
    with freeze_time(T + timedelta(seconds=5)):
        appended = repo.append_message(KEY, Role.USER, "next")
    assert appended.created_at == T + timedelta(seconds=5)


def test_the_commands_prune_asks_the_store_what_is_old(pg_store: Engine, pg_url: str) -> None:
    """`prune --older-than 1h` from a host 2 h fast must not delete a live session."""
    from tests.test_cli import cli

    repo = SessionRepository(pg_store)
    repo.get_or_create(KEY)
    repo.append_message(KEY, Role.USER, "just now")
    with freeze_time(datetime.now(UTC) + timedelta(hours=2), tick=True):
        outcome = cli("--db", pg_url, "prune", "--older-than", "1h", "--yes", "--json")
    assert outcome.returncode == 0, outcome.stderr
    assert json.loads(outcome.stdout)["sessions"] == 0
    assert repo.get(KEY) is not None


def test_one_moment_of_a_clock_far_ahead_does_not_pin_the_store(engine: Engine) -> None:
    """A write made while the host's clock read 2030 for a moment: the next writes, the
    clock right again, are stamped with the right time (not 2030), and a prune measured
    on the store's clock does not take live sessions for years old."""
    repo = SessionRepository(engine)
    repo.get_or_create(KEY)
    with freeze_time(datetime(2030, 1, 1, tzinfo=UTC)):
        repo.get_or_create(OTHER)
        repo.append_message(OTHER, Role.USER, "written while the clock was wrong")
    with freeze_time(T):
        appended = repo.append_message(KEY, Role.USER, "the clock is right again")
        assert appended.created_at == T
        assert repo.now() == T
        assert repo.prune(updated_before=repo.now() - timedelta(days=30), dry_run=True) == 0


def test_the_clock_is_held_back_for_up_to_a_day(engine: Engine) -> None:
    from aisopod_session.clock import MAX_HOLD

    repo = SessionRepository(engine)
    repo.get_or_create(KEY)
    with freeze_time(T):
        repo.append_message(KEY, Role.USER, "at T")
    with freeze_time(T - MAX_HOLD):
        assert repo.append_message(KEY, Role.USER, "a day back").created_at == T
    with freeze_time(T - MAX_HOLD - timedelta(seconds=1)):
        later = repo.append_message(KEY, Role.USER, "more than a day back")
    assert later.created_at == T - MAX_HOLD - timedelta(seconds=1)
