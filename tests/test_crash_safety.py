"""A writer killed with SIGKILL at random points: after every kill the file opens, passes
`integrity_check`, holds every append acknowledged before the kill, no half-written
message or batch, and counters equal to the rows.

`AISOPOD_STRESS=10` (or `make stress`) kills ten times as often.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

from sqlalchemy import text

from aisopod_session import (
    SCHEMA_VERSION,
    NewMessage,
    Role,
    SessionKey,
    SessionRepository,
    current_version,
    open_database,
)
from aisopod_session.transactions import read_transaction
from aisopod_session.validation import dump_json
from tests.dbtools import raw_connect, stress

KILLS = 15 * stress()
KILLS_PER_FILE = 15
THREADS = 2
KEYS = [SessionKey("agent-1", "telegram", "bot", "dm", f"peer-{i}") for i in range(3)]


@functools.cache
def batch_of(tag: str) -> tuple[int, list[str], int]:
    """Everything about the batch named `tag`, derived from the tag alone so that the
    parent can check what the killed child wrote: its session, contents and tokens.
    Contents are up to a few KB, so one batch spans several database pages. Tags of a
    PostgreSQL run start with "pg": their contents leave out NUL, which it cannot store."""
    rng = random.Random(tag)
    letters = "abcdefé🙂" if tag.startswith("pg") else "abcdefé🙂\x00"
    size = rng.choice((1, 1, 2, 3, 8))
    contents = []
    for index in range(size):
        body = "".join(rng.choices(letters, k=rng.choice((10, 200, 3000))))
        digest = hashlib.sha256(body.encode()).hexdigest()[:16]
        contents.append(f"{tag}/{index}|{digest}|{body}")
    return rng.randrange(len(KEYS)), contents, rng.randrange(100)


def write_until_killed(path: str, prefix: str, acks: int) -> None:
    """The child: append batches from THREADS threads forever, reporting each one on the
    `acks` pipe only after `append_messages` returned (that is what acknowledged means)."""
    engine = open_database(path)
    repo = SessionRepository(engine)
    for key in KEYS:
        repo.get_or_create(key)

    def thread(number: int) -> None:
        sent = 0
        while True:
            tag = f"{prefix}-t{number}-b{sent}"
            session, contents, tokens = batch_of(tag)
            stored = repo.append_messages(
                KEYS[session], [NewMessage(Role.USER, text) for text in contents], tokens=tokens
            )
            # One small write() to a pipe is atomic: a line is reported whole or not at all.
            os.write(acks, (json.dumps([tag, [m.id for m in stored]]) + "\n").encode())
            sent += 1

    for number in range(THREADS):
        threading.Thread(target=thread, args=(number,), daemon=True).start()
    while True:
        time.sleep(1)


def test_a_writer_killed_at_random_points_loses_nothing_acknowledged(store_url: str) -> None:
    rng = random.Random(20261126)
    acknowledged: dict[str, list[int]] = {}
    total = 0
    sqlite = "://" not in store_url
    path = store_url  # PostgreSQL: one fresh schema for every round
    for round_number in range(KILLS):
        if sqlite and round_number % KILLS_PER_FILE == 0:
            # A new file now and then keeps each check's full read of the file short.
            path = str(Path(store_url).with_name(f"crashing-{round_number}.db"))
            total += len(acknowledged)
            acknowledged = {}
        prefix = f"r{round_number}" if sqlite else f"pg{round_number}"
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child only ever dies by SIGKILL
            os.close(read_end)
            try:
                write_until_killed(path, prefix, write_end)
            finally:
                os._exit(1)
        os.close(write_end)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), "the writer died on its own before the kill"
        with os.fdopen(read_end, "rb") as reader:
            lines = reader.read().decode().splitlines()
        acknowledged.update(dict(map(json.loads, lines)))
        check_after_kill(path, acknowledged)
    total += len(acknowledged)
    assert total, "no append was ever acknowledged: the kills came too early"
    print(f"\n{KILLS} kills, {total} acknowledged appends all kept")


def check_after_kill(path: str, acknowledged: dict[str, list[int]]) -> None:
    # The store opens (SQLite: recovering the WAL) and, for a file, the file is sound.
    engine = open_database(path)
    try:
        with read_transaction(engine) as conn:
            rows = conn.execute(
                text("SELECT id, session_id, content FROM messages ORDER BY id")
            ).all()
            session_ids = {
                peer: sid for sid, peer in conn.execute(text("SELECT id, peer_id FROM sessions"))
            }
            counters = {
                sid: (count, tokens)
                for sid, count, tokens in conn.execute(
                    text("SELECT id, message_count, token_usage FROM sessions")
                )
            }
    finally:
        engine.dispose()
    if "://" not in path:
        checks = raw_connect(Path(path))
        assert checks.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        checks.close()

    # Group the stored rows by batch: each batch is there whole, exactly as sent, or not
    # at all (a batch committed but killed before it was reported is there whole too).
    # Content is stored as compact JSON text: each cell is exactly the JSON string of
    # what was sent.
    stored: dict[str, list[tuple[int, int, str]]] = {}
    for message_id, session_id, cell in rows:
        content = json.loads(cell)
        assert isinstance(content, str), cell
        assert cell == dump_json(content)
        stored.setdefault(content.split("/")[0], []).append((message_id, session_id, content))
    rows_per_session = dict.fromkeys(counters, 0)
    tokens_per_session = dict.fromkeys(counters, 0)
    for tag, found in stored.items():
        session, contents, tokens = batch_of(tag)
        session_id = session_ids[KEYS[session].peer_id]
        assert [(sid, text) for _, sid, text in found] == [(session_id, t) for t in contents]
        rows_per_session[session_id] += len(found)
        tokens_per_session[session_id] += tokens
    for tag, ids in acknowledged.items():
        assert tag in stored, f"acknowledged append {tag} was lost"
        assert [message_id for message_id, _, _ in stored[tag]] == ids
    assert counters == {sid: (rows_per_session[sid], tokens_per_session[sid]) for sid in counters}


def test_a_process_killed_while_creating_a_fresh_file_leaves_it_openable(
    tmp_path: Path,
) -> None:
    """Kills within the first milliseconds land while the file is created, switched to
    WAL or migrated; the next open must finish the job (or find it done)."""
    rng = random.Random(7)
    for attempt in range(10 * stress()):
        path = tmp_path / f"fresh-{attempt}.db"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - killed, or exits at once after opening
            try:
                open_database(path).dispose()
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.02))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        engine = open_database(path)
        try:
            assert current_version(engine) == SCHEMA_VERSION
            repo = SessionRepository(engine)
            repo.append_message(repo.get_or_create(KEYS[0]).key, Role.USER, "works")
        finally:
            engine.dispose()
        conn = raw_connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (SCHEMA_VERSION,)
        conn.close()
