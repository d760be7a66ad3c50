"""The repository's connections: one leased driver connection per thread, kept between
calls, closed with its thread or the engine, never shared across fork; and objects built
from rows that behave exactly like ORM-loaded ones."""

from __future__ import annotations

import gc
import json
import os
import pickle
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, inspect
from sqlalchemy.exc import InvalidRequestError
from sqlmodel import Session as OrmSession

from aisopod_session import (
    SCHEMA_VERSION,
    Message,
    Role,
    Session,
    SessionKey,
    SessionNotFoundError,
    current_version,
    open_database,
    run_migrations,
)
from aisopod_session import SessionRepository as Repository
from aisopod_session.connections import lease
from tests.dbtools import raw_connect, run_threads

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def is_closed(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return True
    return False


def test_a_thread_reuses_its_connection_and_threads_do_not_share(
    repo: Repository, engine: Engine, key: SessionKey
) -> None:
    repo.get_or_create(key)
    mine = lease(engine)
    repo.append_message(key, Role.USER, "hi")
    assert lease(engine) is mine
    theirs: list[sqlite3.Connection] = []
    thread = threading.Thread(target=lambda: theirs.append(lease(engine)))
    thread.start()
    thread.join()
    assert theirs[0] is not mine


def test_a_connection_is_closed_when_its_thread_ends(repo: Repository, engine: Engine) -> None:
    seen: list[sqlite3.Connection] = []

    def work() -> None:
        repo.count_sessions()
        seen.append(lease(engine))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    gc.collect()
    assert is_closed(seen[0])


def test_disposing_of_the_engine_closes_every_leased_connection(
    repo: Repository, engine: Engine, key: SessionKey
) -> None:
    repo.get_or_create(key)
    held: list[sqlite3.Connection] = [lease(engine)]
    ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.append(lease(engine))
        ready.set()
        release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    ready.wait()
    engine.dispose()
    assert all(is_closed(conn) for conn in held)
    release.set()
    thread.join()
    # The engine stays usable, as after any dispose: a new connection is leased.
    assert repo.get(key) is not None
    assert lease(engine) is not held[0]


def test_threads_beyond_the_pool_size_each_get_a_connection(
    repo: Repository, key: SessionKey
) -> None:
    """Leased connections are detached from the pool, so 40 threads (the pool allows 15)
    never wait for one."""
    repo.get_or_create(key)
    barrier = threading.Barrier(40)

    def work(index: int) -> None:
        repo.append_message(key, Role.USER, f"from {index}")
        barrier.wait(timeout=20)  # all 40 hold their connection at once
        repo.get_history(key, limit=1)

    run_threads(work, 40)
    session = repo.get(key)
    assert session is not None
    assert session.message_count == 40


def test_a_failed_call_leaves_no_transaction_open(
    repo: Repository, engine: Engine, key: SessionKey, db_path: Path
) -> None:
    with pytest.raises(SessionNotFoundError):
        repo.append_message(key, Role.USER, "nobody is there")
    assert not lease(engine).in_transaction
    # Another connection can take the write lock at once: nothing was left holding it.
    other = raw_connect(db_path)
    other.execute("PRAGMA busy_timeout = 0")
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    other.close()


def test_no_connection_crosses_a_fork(repo: Repository, engine: Engine, key: SessionKey) -> None:
    """The parent's connections are closed before the fork (SQLite's lock bookkeeping
    must not reach the child); both processes open new ones afterwards."""
    repo.get_or_create(key)
    parents = lease(engine)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        status = b"ok"
        try:
            repo.append_message(key, Role.USER, "from the child")
            if lease(engine) is parents:
                status = b"the child used the parent's connection"
        except BaseException as exc:
            status = repr(exc).encode()
        os.write(write_end, status)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        status = reader.read()
    os.waitpid(pid, 0)
    assert status == b"ok"
    assert is_closed(parents)
    assert lease(engine) is not parents
    assert [m.content for m in repo.get_history(key)] == ["from the child"]


def test_built_objects_behave_like_orm_loaded_ones(
    repo: Repository, engine: Engine, key: SessionKey
) -> None:
    repo.get_or_create(key)
    repo.update_metadata(key, {"lang": "pt"})
    appended = repo.append_message(key, Role.ASSISTANT, "ok", tool_calls=[{"id": "c1"}])
    (read,) = repo.get_history(key)
    session = repo.get(key)
    assert session is not None
    with OrmSession(engine) as orm:
        orm_session = orm.get(Session, session.id)
        orm_message = orm.get(Message, appended.id)
        assert orm_session is not None
        assert orm_message is not None
        orm.expunge_all()
    for ours, theirs in ((session, orm_session), (appended, orm_message), (read, orm_message)):
        assert ours.model_dump() == theirs.model_dump()
        # One deliberate difference: every column counts as set (the ORM leaves pydantic's
        # fields-set empty on load, so `exclude_unset` would drop every column).
        assert ours.model_fields_set == set(type(ours).model_fields) - {"messages", "session"}
        assert inspect(ours).key == inspect(theirs).key
        assert inspect(ours).detached
    # A detached object can join an ORM session and be changed through it.
    with OrmSession(engine) as orm:
        orm.add(read)
        read.content = "edited through the ORM"
        orm.commit()
    assert [m.content for m in repo.get_history(key)] == ["edited through the ORM"]


def test_built_objects_get_their_orm_state_when_first_asked(
    repo: Repository, engine: Engine, key: SessionKey
) -> None:
    repo.get_or_create(key)
    message = repo.append_message(key, Role.USER, "hi")
    assert "_sa_instance_state" not in message.__dict__  # none made for a plain read
    state = inspect(message)
    assert state.detached
    assert state.key == (Message, (message.id,), None)
    assert inspect(message) is state  # made once, then kept
    with pytest.raises(InvalidRequestError, match="lazy='raise'"):
        _ = message.session
    # Copies and pickles of a built object behave like the original.
    for copy in (message.model_copy(), pickle.loads(pickle.dumps(message))):
        assert copy.model_dump() == message.model_dump()
        assert inspect(copy).key == state.key
    # merge() into an ORM session finds the row by the identity key.
    fresh = repo.get_history(key)[0]
    with OrmSession(engine) as orm:
        merged = orm.merge(fresh)
        assert merged.content == "hi"
        assert inspect(merged).persistent


def test_models_made_the_usual_ways_keep_their_usual_state(
    engine: Engine, repo: Repository, key: SessionKey
) -> None:
    session = repo.get_or_create(key)
    assert session.id is not None
    made = Message(session_id=session.id, role=Role.USER, content="by hand", created_at=T0)
    validated = Message.model_validate(
        {"session_id": session.id, "role": "user", "content": "validated", "created_at": T0}
    )
    for obj in (made, validated):
        assert inspect(obj).transient
    with OrmSession(engine) as orm:
        orm.add(made)
        orm.add(validated)
        orm.commit()
        assert made.id is not None
    assert [m.content for m in repo.get_history(key)] == ["by hand", "validated"]


def test_an_in_memory_engine_of_ones_own_keeps_its_one_connection(key: SessionKey) -> None:
    """`create_engine("sqlite://")` pools one connection per thread, which is the whole
    database: the repository borrows it for each call instead of keeping it."""
    engine = create_engine("sqlite://")
    run_migrations(engine)
    repo = Repository(engine)
    repo.get_or_create(key)
    repo.append_message(key, Role.USER, "kept")
    assert [m.content for m in repo.get_history(key)] == ["kept"]
    assert current_version(engine) == SCHEMA_VERSION  # the pool's connection is the same db
    engine.dispose()


JSON_CELLS = [
    '"plain text"',
    '{"source":"openai-agents","item":{"role":"user","n":[1,2.5,-3e-7,true,null]}}',
    "{}",
    "[]",
    "null",
    "0",
    '"\\u00e9\\ud83d\\ude00 é😀"',
    ' {"a": 1}',
    '{"a": 1}\n',
    "\t[1, 2]  ",
    '{"a": {"b": {"c": {}}}}',
]
BAD_JSON_CELLS = ["", " ", "1 2", '"a"x', "[1,", '{"a"}', "NaN", "1e999", "{} {}", "nul"]


def test_json_cells_are_read_exactly_as_json_loads_reads_them() -> None:
    """Guards the json internal the row readers use (loading.py's docstring): the
    decoder's `scan_once` reads a value at an index and says where it ended, and the
    fast reader built on it reads what `json.loads` reads and refuses what it refuses,
    with the same error."""
    from aisopod_session.models import _strict_json

    scan_once = vars(json.JSONDecoder())["scan_once"]
    assert scan_once('[1, "x"] ', 0) == ([1, "x"], 8)
    with pytest.raises(StopIteration):
        scan_once(" 1", 0)
    for cell in JSON_CELLS:
        assert _strict_json(cell) == json.loads(cell), cell
    for cell in BAD_JSON_CELLS:
        with pytest.raises(ValueError, match=r"Expecting|Extra data|is not|too large") as refused:
            _strict_json(cell)
        if cell not in ("NaN", "1e999"):  # ours refuses these, json.loads does not
            with pytest.raises(json.JSONDecodeError) as theirs:
                json.loads(cell)
            assert str(refused.value) == str(theirs.value), cell
    with pytest.raises(TypeError):
        _strict_json(b"{}")  # type: ignore[arg-type]


def test_a_call_made_inside_another_leaves_the_connection_in_use(db_path: Path) -> None:
    """A `check` callback's own call runs on the thread's connection inside the outer
    call's transaction; when it ends, the connection is still in use: a dispose from
    another thread meanwhile does not close it under the outer call, which commits."""
    engine = open_database(db_path)
    repo = Repository(engine)
    key = SessionKey("agent-1", "telegram", "bot", "dm", "nested")
    repo.get_or_create(key)

    def check(meta: object) -> None:
        assert repo.get(key) is not None  # on this thread's connection, inside the call
        disposing = threading.Thread(target=engine.dispose)
        disposing.start()
        disposing.join()

    repo.apply_changes(key, meta={"v": 1}, messages=[{"role": "user", "content": "x"}], check=check)
    engine.dispose()
    reopened = open_database(db_path)
    try:
        found = Repository(reopened).get(key)
        assert found is not None
        assert (found.meta, found.message_count) == ({"v": 1}, 1)
    finally:
        reopened.dispose()
