"""Many writer processes on one file: nothing lost, nothing doubled, no "database is
locked", counters exact, and readers beside them never see counters that disagree with
the messages.

Sized to run in a few seconds; `AISOPOD_STRESS=10` (or `make stress`) runs ten times as
long. Run with `-s` to see the figures.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import threading
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import text

from aisopod_session import NewMessage, Role, SessionKey, SessionRepository, open_database
from aisopod_session.transactions import read_transaction
from aisopod_session.validation import dump_json
from tests.dbtools import raw_connect, stress

PROCESSES = 8
THREADS = 4
SESSIONS = 20
SECONDS = 2.5 * stress()
RACE_WINDOW = 0.05  # seconds during which every writer races to create the same new key


def shared_key(index: int) -> SessionKey:
    # Three agents, so the sessions are spread over several key prefixes.
    return SessionKey(f"agent-{index % 3}", "telegram", "bot", "dm", f"peer-{index}")


def race_key(window: int) -> SessionKey:
    return SessionKey("agent-race", "slack", "T01", "channel", f"race-{window}")


def write_for(path: str, process: int, deadline: float, out: Path) -> None:
    """One worker process: THREADS threads append until `deadline` (time.monotonic, which
    all processes share), then the acknowledged writes go to `out` as JSON."""
    engine = open_database(path)  # default busy timeout: the guarantee under test
    repo = SessionRepository(engine)
    acked: list[dict[str, Any]] = []  # appends that returned, in the order they returned
    races: list[tuple[str, int]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def thread(number: int) -> None:
        rng = random.Random(process * 100 + number)
        sent = 0
        try:
            while time.monotonic() < deadline:
                index = rng.randrange(SESSIONS)
                key = shared_key(index)
                repo.get_or_create(key)  # every thread races to create the 20 sessions
                size = rng.choice((1, 1, 1, 2, 5))
                contents = [f"p{process}-t{number}-n{sent + j}" for j in range(size)]
                tool_calls = [{"id": contents[0], "args": {"n": sent}}] if sent % 7 == 0 else None
                tokens = rng.randrange(0, 100)
                given_in, given_out = rng.randrange(0, 50), rng.randrange(0, 50)
                batch = [NewMessage(Role.USER, text, tool_calls) for text in contents]
                stored = repo.append_messages(
                    key, batch, tokens=tokens, input_tokens=given_in, output_tokens=given_out
                )
                sent += size
                with lock:
                    acked.append(
                        {
                            "session": index,
                            "contents": contents,
                            "ids": [m.id for m in stored],
                            "tokens": tokens,
                            "input_tokens": given_in,
                            "output_tokens": given_out,
                            "tool_calls": tool_calls,
                        }
                    )
                if sent % 10 < size:
                    window = int(time.monotonic() / RACE_WINDOW)
                    created = repo.get_or_create(race_key(window))
                    assert created.id is not None
                    with lock:
                        races.append((race_key(window).canonical(), created.id))
        except BaseException:
            with lock:
                errors.append(traceback.format_exc())

    threads = [threading.Thread(target=thread, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    out.write_text(json.dumps({"acked": acked, "races": races, "errors": errors}))


def read_beside(path: str, stop: threading.Event, problems: list[str], reads: list[int]) -> None:
    """Readers while the writers run: the counters of every session, read in one
    snapshot with plain SQL, must equal its rows; and through the repository, the history
    read between two reads of the session lies between their counters."""
    engine = open_database(path)
    repo = SessionRepository(engine)
    try:
        while not stop.is_set():
            with read_transaction(engine) as conn:  # one snapshot, on either backend
                rows = conn.execute(
                    text(
                        "SELECT s.id, s.message_count, (SELECT count(*) FROM messages m "
                        "WHERE m.session_id = s.id) FROM sessions s"
                    )
                ).all()
            problems.extend(f"snapshot {row}" for row in rows if row[1] != row[2])
            for index in range(SESSIONS):
                before = repo.get(shared_key(index))
                if before is None:
                    continue
                history = repo.get_history(shared_key(index))
                after = repo.get(shared_key(index))
                assert after is not None
                if not before.message_count <= len(history) <= after.message_count:
                    problems.append(
                        f"session {index}: {before.message_count} <= {len(history)} <= "
                        f"{after.message_count} does not hold"
                    )
            reads.append(len(rows))
    except BaseException:
        problems.append(traceback.format_exc())
    finally:
        engine.dispose()


def test_many_writer_processes_lose_nothing_and_keep_counters_exact(
    store_url: str, tmp_path: Path
) -> None:
    path = store_url
    open_database(path).dispose()
    context = multiprocessing.get_context("fork")
    deadline = time.monotonic() + SECONDS
    outs = [tmp_path / f"worker-{p}.json" for p in range(PROCESSES)]
    workers = [
        context.Process(target=write_for, args=(path, p, deadline, outs[p]))
        for p in range(PROCESSES)
    ]
    stop = threading.Event()
    problems: list[str] = []
    reads: list[int] = []
    readers = [
        threading.Thread(target=read_beside, args=(path, stop, problems, reads)) for _ in range(2)
    ]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for reader in readers:
        reader.start()
    for worker in workers:
        worker.join(timeout=SECONDS + 120)
    elapsed = time.monotonic() - started
    stop.set()
    for reader in readers:
        reader.join()

    assert [w.exitcode for w in workers] == [0] * PROCESSES
    results = [json.loads(out.read_text()) for out in outs]
    errors = [error for result in results for error in result["errors"]]
    assert errors == [], errors[0]
    assert problems == [], problems[:3]
    assert reads, "the readers never completed a pass"

    acked = [append for result in results for append in result["acked"]]
    engine = open_database(path)
    try:
        with read_transaction(engine) as conn:
            message_rows = conn.execute(
                text(
                    "SELECT m.id, s.peer_id, m.content, m.tool_calls, m.created_at "
                    "FROM messages m JOIN sessions s ON s.id = m.session_id ORDER BY m.id"
                )
            ).all()
            counted = conn.execute(
                text(
                    "SELECT s.peer_id, s.message_count, s.token_usage, s.input_tokens, "
                    "s.output_tokens, "
                    "(SELECT count(*) FROM messages m WHERE m.session_id = s.id) "
                    "FROM sessions s WHERE s.agent_id != 'agent-race'"
                )
            ).all()
            race_rows = conn.execute(
                text("SELECT count(*) FROM sessions WHERE agent_id = 'agent-race'")
            ).scalar_one()
        # Content is stored as compact JSON text: each cell is the JSON string of its text.
        assert [cell for _, _, cell, _, _ in message_rows] == [
            dump_json(json.loads(cell)) for _, _, cell, _, _ in message_rows
        ]
        stored = [
            (mid, peer, json.loads(cell), calls, at) for mid, peer, cell, calls, at in message_rows
        ]
        assert all(isinstance(content, str) for _, _, content, _, _ in stored)
        # Every acknowledged message is there exactly once, with its id, in its session.
        by_content = Counter(content for _, _, content, _, _ in stored)
        assert [c for c, n in by_content.items() if n > 1] == []
        where = {content: (mid, peer, calls) for mid, peer, content, calls, _ in stored}
        sent_tokens: dict[int, int] = defaultdict(int)
        sent_in: dict[int, int] = defaultdict(int)
        sent_out: dict[int, int] = defaultdict(int)
        sent_messages: dict[int, int] = defaultdict(int)
        for append in acked:
            # token_usage is the total: the unsplit tokens plus the input and output ones.
            sent_tokens[append["session"]] += (
                append["tokens"] + append["input_tokens"] + append["output_tokens"]
            )
            sent_in[append["session"]] += append["input_tokens"]
            sent_out[append["session"]] += append["output_tokens"]
            sent_messages[append["session"]] += len(append["contents"])
            for content, mid in zip(append["contents"], append["ids"], strict=True):
                stored_id, peer, calls = where[content]
                assert (stored_id, peer) == (mid, f"peer-{append['session']}")
                assert (None if calls is None else json.loads(calls)) == append["tool_calls"]
        # Nothing that was not acknowledged was stored: no worker failed, so all returned.
        assert len(stored) == sum(sent_messages.values())
        # Within a session time follows id order, whichever process wrote; SQLite, with
        # one writer at a time, keeps it across sessions too.
        times_by_peer: dict[str, list[str]] = defaultdict(list)
        for _, peer, _, _, created in stored:
            times_by_peer[peer].append(created)
        assert all(times == sorted(times) for times in times_by_peer.values())
        if engine.dialect.name == "sqlite":
            times = [created for *_, created in stored]
            assert times == sorted(times)

        counters = {peer: tuple(values) for peer, *values in counted}
        assert counters == {
            f"peer-{i}": (
                sent_messages[i],
                sent_tokens[i],
                sent_in[i],
                sent_out[i],
                sent_messages[i],
            )
            for i in range(SESSIONS)
            if sent_messages[i]
        }

        # Racing get_or_create on new keys: one row per key, the same id for everyone.
        ids_by_key: dict[str, set[int]] = defaultdict(set)
        for result in results:
            for key_text, session_id in result["races"]:
                ids_by_key[key_text].add(session_id)
        assert all(len(ids) == 1 for ids in ids_by_key.values())
        assert race_rows == len(ids_by_key)

        if engine.dialect.name == "sqlite":
            checks = raw_connect(Path(path))
            assert checks.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert checks.execute("PRAGMA foreign_key_check").fetchall() == []
            checks.close()
    finally:
        engine.dispose()

    appends = len(acked)
    print(
        f"\n{engine.dialect.name}: {PROCESSES} processes x {THREADS} threads for "
        f"{elapsed:.1f} s: {appends} appends "
        f"({len(stored)} messages, {appends / elapsed:.0f} appends/s), "
        f"{sum(len(r['races']) for r in results)} racing get_or_create on "
        f"{len(ids_by_key)} new keys, {len(reads)} reader passes"
    )
