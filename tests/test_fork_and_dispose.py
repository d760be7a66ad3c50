"""Forked workers, `engine.dispose()` under load, and engines dropped without dispose, with
real processes and real files.

1. A gateway preloaded and then forked (gunicorn/uvicorn workers, multiprocessing) must
   not lose a single acknowledged append, whether the child writes through the
   repository it inherited or through an engine of its own, and whatever the parent
   does meanwhile: dispose of its engine, exit, or keep writing. SQLite keeps per-process
   lock bookkeeping that a child inherits without the locks themselves; if the parent
   then closes what it believes is the file's last connection, SQLite checkpoints and
   deletes the `-wal` the child is still writing into.
2. `engine.dispose()` while other threads are in the middle of calls must neither crash
   the process nor lose or corrupt anything: each call succeeds or raises a
   `SessionStoreError`, and the engine keeps working afterwards.
3. An engine dropped without `dispose()` must be garbage-collected with its connections
   and their file descriptors.

Whatever can crash runs in a child process, so a crash fails its test instead of
killing pytest. `AISOPOD_STRESS=10` (or `make stress`) writes ten times as long.
"""

from __future__ import annotations

import gc
import io
import json
import multiprocessing
import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

from aisopod_session import (
    Role,
    SessionRepository,
    SessionStoreError,
    export_jsonl,
    open_database,
)
from tests.dbtools import stress
from tests.forking import (
    ENDINGS,
    KEYS,
    LONER,
    Acks,
    Reader,
    append_for,
    append_with_own_engine,
    check_store,
    describe,
    fork,
    holding_connections,
    open_fds,
    wait,
    watch_child,
)

SECONDS = 1.0 * stress()
"""How long each writer appends."""
DISPOSE_AFTER = 0.3 * SECONDS
"""When the parent disposes of its engine (or exits): while its children are writing."""
TIMEOUT = 60.0 * stress()
ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# Forking a process that runs threads is the very case under test (a preloaded gateway
# has them); Python 3.12+ warns about it, which this suite otherwise turns into errors.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")


def assert_exited(status: int, what: str) -> None:
    """The child process ended with status 0, not an error status or a signal."""
    assert status == 0, f"{what}: {describe(status)}"


def assert_all_kept(path: Path, acks: Acks, writers: int, reader: Reader | None = None) -> None:
    """Every writer finished without error, `reader` saw every message acknowledged
    before each of its looks, and the file holds every acknowledged message exactly
    once, with counters equal to its rows and integrity ok."""
    problems = check_store(path, acks) + (reader.problems() if reader else [])
    if acks.done != writers:
        problems.append(f"{acks.done} of {writers} writers finished")
    problems += acks.errors
    assert acks.acked, "no append was acknowledged"
    assert not problems, "\n".join(problems)
    print(f"\n{writers} writer(s): {len(acks.acked)} acknowledged messages, all kept")


# --- 1. fork ----------------------------------------------------------------------------


def test_a_child_on_the_inherited_repository_keeps_every_write_when_the_parent_disposes(
    db_path: Path, tmp_path: Path
) -> None:
    """A preloaded app's worker writes through the repository it inherited; the parent
    disposes of the engine (a shutdown or reload) while it does."""
    engine = open_database(db_path)
    log = tmp_path / "child.jsonl"
    reader = Reader(db_path, [log])
    with holding_connections(engine) as repo:
        pid = fork(lambda: append_for(repo, SECONDS, "child", log))
        time.sleep(DISPOSE_AFTER)
        engine.dispose()
        status = watch_child(pid, reader, TIMEOUT)
    assert_exited(status, "the child")
    assert_all_kept(db_path, Acks().read(log), writers=1, reader=reader)


def test_a_child_with_its_own_engine_keeps_every_write_when_the_parent_disposes(
    db_path: Path, tmp_path: Path
) -> None:
    """The documented way: the worker opens its own engine after fork. The parent's
    connections, held when it forked, must not matter once it disposes of them."""
    engine = open_database(db_path)
    log = tmp_path / "child.jsonl"
    reader = Reader(db_path, [log])
    with holding_connections(engine):
        pid = fork(lambda: append_with_own_engine(db_path, SECONDS, "child", log))
        time.sleep(DISPOSE_AFTER)
        engine.dispose()
        status = watch_child(pid, reader, TIMEOUT)
    assert_exited(status, "the child")
    assert_all_kept(db_path, Acks().read(log), writers=1, reader=reader)


def test_children_keep_every_write_when_their_parent_process_exits(tmp_path: Path) -> None:
    """A gateway's master process (a plain interpreter, not pytest) forks two writers, one
    on the inherited repository and one on its own engine, then exits while they write:
    once the normal way with its engine as it is, once through `sys.exit` with an
    `atexit` hook that disposes of the engine."""
    # The masters must end as an interpreter does (finalisers, atexit hooks), which a
    # fork of pytest cannot, so a `python -c` script forks them (one import for both).
    # The writers keep its stdout open: communicate() returns once they have finished.
    script = "import sys; from tests.forking import exiting_parents; exiting_parents(*sys.argv[1:])"
    for ending in ENDINGS:
        (tmp_path / ending).mkdir()
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(SECONDS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    problems, acknowledged = [], 0
    for ending in ENDINGS:
        folder = tmp_path / ending
        acks = Acks().read(folder / "inherited.jsonl").read(folder / "own.jsonl")
        assert acks.acked, f"{ending}: no append was acknowledged"
        found = check_store(folder / "sessions.db", acks) + acks.errors
        if acks.done != 2:
            found.append(f"{acks.done} of 2 writers finished")
        problems += [f"parent ending by {ending}: {problem}" for problem in found]
        acknowledged += len(acks.acked)
    assert not problems, "\n".join(problems)
    print(f"\n2 exited parents, 4 writers: {acknowledged} acknowledged messages, all kept")


@pytest.mark.parametrize("child_engine", ["inherited", "own"])
def test_a_parent_and_its_child_writing_together_keep_every_write(
    db_path: Path, tmp_path: Path, child_engine: str
) -> None:
    """The parent keeps its engine and keeps writing while its child writes, through the
    inherited repository or its own engine: both processes' acknowledged writes stay."""
    engine = open_database(db_path)
    child_log, parent_log = tmp_path / "child.jsonl", tmp_path / "parent.jsonl"
    with holding_connections(engine) as repo:
        if child_engine == "inherited":
            pid = fork(lambda: append_for(repo, SECONDS, "child", child_log))
        else:
            pid = fork(lambda: append_with_own_engine(db_path, SECONDS, "child", child_log))
        append_for(repo, SECONDS, "parent", parent_log)
        status = wait(pid, TIMEOUT)
    engine.dispose()
    assert_exited(status, "the child")
    assert_all_kept(db_path, Acks().read(child_log).read(parent_log), writers=2)


def pool_worker(
    repo: SessionRepository, path: Path, own: bool, seconds: float, tag: str, log: Path
) -> None:
    """A pre-fork pool's worker: on the inherited repository, or on its own engine."""
    if own:
        append_with_own_engine(path, seconds, tag, log)
    else:
        append_for(repo, seconds, tag, log)


def test_a_fork_worker_pool_keeps_every_write_when_the_parent_disposes(
    db_path: Path, tmp_path: Path
) -> None:
    """Four `multiprocessing` workers (fork context), two on the inherited repository and
    two on engines of their own; the parent disposes of its engine while they write."""
    context = multiprocessing.get_context("fork")
    engine = open_database(db_path)
    logs = [tmp_path / f"worker-{number}.jsonl" for number in range(4)]
    with holding_connections(engine) as repo:
        # The last worker goes on alone a little longer (see `LONER`).
        workers = [
            context.Process(
                target=pool_worker,
                args=(
                    repo,
                    db_path,
                    number % 2 == 1,
                    SECONDS + LONER * (number == 3),
                    f"w{number}",
                    log,
                ),
            )
            for number, log in enumerate(logs)
        ]
        for worker in workers:
            worker.start()
        time.sleep(DISPOSE_AFTER)
        engine.dispose()
        reader = Reader(db_path, logs)
        reader.watch(lambda: any(worker.is_alive() for worker in workers), TIMEOUT)
        for worker in workers:
            worker.join(TIMEOUT)
            if worker.is_alive():
                worker.kill()
    assert [worker.exitcode for worker in workers] == [0] * len(workers)
    acks = Acks()
    for log in logs:
        acks.read(log)
    assert_all_kept(db_path, acks, writers=len(workers), reader=reader)


# --- 2. dispose while threads are mid-call ----------------------------------------------

THREADS = 8


def dispose_under_load(path: Path, log: Path, report: Path) -> None:
    """The child's scenario: THREADS threads append and read in a loop while the main
    thread disposes of the engine every few milliseconds; then the engine must still
    work. Appends are logged as acknowledged; the outcome goes to `report`."""
    engine = open_database(path)
    repo = SessionRepository(engine)
    for key in KEYS:
        repo.get_or_create(key)
    unexpected: list[str] = []
    counts = {"calls": 0, "store_errors": 0}
    lock = threading.Lock()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    deadline = time.monotonic() + SECONDS

    def attempt(call: Callable[[], T]) -> T | None:
        """`call()`, or None if it raised; a non-store error is kept to fail the test."""
        try:
            return call()
        except SessionStoreError:
            with lock:
                counts["store_errors"] += 1
        except Exception:
            with lock:
                unexpected.append(traceback.format_exc())
        finally:
            with lock:
                counts["calls"] += 1
        return None

    def work(number: int) -> None:
        sent = 0
        while time.monotonic() < deadline:
            key = KEYS[sent % len(KEYS)]
            content = f"t{number}/{sent}"
            message = attempt(partial(repo.append_message, key, Role.USER, content, tokens=1))
            if message is not None:  # acknowledged: logged only after the call returned
                os.write(fd, (json.dumps({"acked": [[message.id, content]]}) + "\n").encode())
            attempt(partial(repo.get_history, key, limit=3))
            sent += 1

    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    disposals = 0
    while time.monotonic() < deadline:
        engine.dispose()
        disposals += 1
        time.sleep(0.003)
    for thread in threads:
        thread.join(timeout=30)
    hung = sum(thread.is_alive() for thread in threads)
    # The engine keeps working after all that: a new append is read back.
    after = "ok"
    try:
        last = repo.append_message(KEYS[0], Role.USER, "after/0", tokens=1)
        if [m.id for m in repo.get_history(KEYS[0], limit=1)] != [last.id]:
            after = "the append made after the disposals is not read back"
        os.write(fd, (json.dumps({"acked": [[last.id, last.content]]}) + "\n").encode())
        engine.dispose()
    except Exception:
        after = traceback.format_exc()
    os.write(fd, b'{"done": 1}\n')
    os.close(fd)
    report.write_text(
        json.dumps({**counts, "disposals": disposals, "hung": hung, "after": after})
        + "\n"
        + "\n".join(unexpected)
    )


def test_dispose_while_threads_are_mid_call_fails_calls_cleanly_and_loses_nothing(
    db_path: Path, tmp_path: Path
) -> None:
    """8 threads append and read while the main thread disposes of the engine every 3 ms:
    the process survives, each call succeeds or raises a `SessionStoreError`, no thread
    hangs, every acknowledged append is stored, and the engine works afterwards."""
    log, report = tmp_path / "acks.jsonl", tmp_path / "report.txt"
    # In a child process: today dispose closes connections under running calls and
    # SQLite crashes the whole process.
    status = wait(fork(lambda: dispose_under_load(db_path, log, report)), TIMEOUT)
    acks = Acks().read(log)
    assert_exited(status, f"the process, after {len(acks.acked)} acknowledged appends")
    summary, *unexpected = report.read_text().split("\n", 1)
    outcome = json.loads(summary)
    assert not unexpected or not unexpected[0], "calls raised other errors:\n" + unexpected[0]
    assert outcome["hung"] == 0, f"{outcome['hung']} threads never finished their call"
    assert outcome["after"] == "ok", outcome["after"]
    assert_all_kept(db_path, acks, writers=1)
    print(outcome)


# --- 3. engines dropped without dispose -------------------------------------------------

ENGINES = 100
FD_SLACK = 5


def drop_engines(path: Path, report: Path, *, from_thread: bool) -> None:
    """Open ENGINES engines on one file, use each through a repository (from this thread,
    and with `from_thread` also from a second thread that stays alive), drop them without
    dispose, collect garbage, and report the open fds and how many engines live on."""
    jobs: queue.Queue[Callable[[], object] | None] = queue.Queue()
    finished: queue.Queue[BaseException | None] = queue.Queue()

    def serve() -> None:  # the second thread: runs each job, keeps no reference after
        while (job := jobs.get()) is not None:
            try:
                job()
                finished.put(None)
            except BaseException as exc:
                finished.put(exc)
            del job

    helper = threading.Thread(target=serve, daemon=True)
    helper.start()
    open_database(path).dispose()  # the file exists and is migrated before counting
    gc.collect()
    before = open_fds()
    refs = []
    for number in range(ENGINES):
        engine = open_database(path)
        repo = SessionRepository(engine)
        key = KEYS[number % len(KEYS)]
        repo.get_or_create(key)
        repo.append_message(key, Role.USER, f"engine {number}", tokens=1)
        repo.get_history(key, limit=5)
        if from_thread:
            jobs.put(partial(repo.get_history, key, limit=1))
            error = finished.get()
            if error is not None:
                raise error
        refs.append(weakref.ref(engine))
        del engine, repo
    gc.collect()
    after = open_fds()
    alive = sum(ref() is not None for ref in refs)
    jobs.put(None)  # only now: the second thread stayed alive through the count
    helper.join()
    report.write_text(json.dumps({"before": before, "after": after, "alive": alive}))


@pytest.mark.parametrize("from_thread", [False, True], ids=["one-thread", "second-thread"])
def test_an_engine_dropped_without_dispose_is_collected_with_its_connections(
    db_path: Path, tmp_path: Path, from_thread: bool
) -> None:
    """100 engines used and dropped without `dispose()`: each is garbage-collected and
    the process's open file descriptors return to where they were, also when a thread
    that used them is still alive."""
    report = tmp_path / "report.json"
    # In a child, so that leaked connections do not pile up in pytest's process.
    status = wait(fork(lambda: drop_engines(db_path, report, from_thread=from_thread)), TIMEOUT)
    assert_exited(status, "the process")
    counts = json.loads(report.read_text())
    leaked = counts["after"] - counts["before"]
    summary = (
        f"{ENGINES} engines dropped: {counts['alive']} still alive, {leaked} fds leaked "
        f"({counts['before']} open before, {counts['after']} after)"
    )
    assert counts["alive"] == 0, summary
    assert leaked <= FD_SLACK, summary


# --- 1b. connections held in other ways when the process forks ----------------------------


class _SlowStream(io.StringIO):
    """An export's output that takes its time (a slow disk or pipe)."""

    def write(self, text: str) -> int:
        time.sleep(0.01)
        return super().write(text)


def test_a_fork_waits_for_an_export_in_another_thread(db_path: Path, tmp_path: Path) -> None:
    """An export holds a pooled connection for as long as it runs: the fork waits for it
    to end (it would otherwise cross the fork), and the child's writes then survive the
    parent's dispose."""
    engine = open_database(db_path)
    log = tmp_path / "child.jsonl"
    with holding_connections(engine) as repo:
        for i in range(40):
            repo.append_message(KEYS[2], Role.USER, f"to export {i}", tokens=1)
        export = threading.Thread(target=lambda: export_jsonl(engine, _SlowStream()))
        export.start()
        time.sleep(0.2)  # the export is under way
        pid = fork(lambda: append_for(repo, SECONDS, "child", log))
        forked_after_export = not export.is_alive()
        export.join()
        time.sleep(DISPOSE_AFTER)
        engine.dispose()
        status = wait(pid, TIMEOUT)
    assert forked_after_export, "the fork went ahead while the export held its connection"
    assert_exited(status, "the child")
    assert_all_kept(db_path, Acks().read(log), writers=1)


def _refusals(path: Path, repo: SessionRepository, report: Path) -> None:
    """In a child: every way of using the store's file, each expected to be refused."""
    outcomes = []
    for attempt in (
        lambda: repo.append_message(KEYS[0], Role.USER, "from the child"),
        lambda: repo.get(KEYS[0]),
        lambda: open_database(path),
    ):
        try:
            attempt()
            outcomes.append("went ahead")
        except SessionStoreError as exc:
            outcomes.append("refused: forked" if "forked" in str(exc) else f"other: {exc}")
    report.write_text(json.dumps(outcomes))


def test_a_child_forked_while_its_parent_held_the_file_open_refuses_to_use_it(
    db_path: Path, tmp_path: Path
) -> None:
    """A connection the fork cannot close (held open by the forking code itself) carries
    SQLite's lock bookkeeping into the child: the child refuses the file, saying why,
    instead of writing what the parent's last close would delete. The parent goes on."""
    engine = open_database(db_path)
    report = tmp_path / "report.json"
    with holding_connections(engine) as repo, engine.connect() as held:
        held.exec_driver_sql("SELECT count(*) FROM sessions").scalar_one()
        pid = fork(lambda: _refusals(db_path, repo, report))
        status = wait(pid, TIMEOUT)
    assert_exited(status, "the child")
    assert json.loads(report.read_text()) == ["refused: forked"] * 3
    assert repo.append_message(KEYS[0], Role.USER, "the parent goes on").id is not None
    engine.dispose()


def _forks_beside_ending_threads(path: Path, report: Path, children: int) -> None:
    """In a child of pytest: two threads keep starting threads that make one append and
    end (each thread's connection is closed as it ends), while the main thread forks
    `children` writers on the inherited repository; then the verdict, as JSON."""
    engine = open_database(path)
    repo = SessionRepository(engine)
    for key in KEYS:
        repo.get_or_create(key)
    stop = threading.Event()
    acked: list[int] = []
    errors: list[str] = []

    def one_call() -> None:
        try:
            message = repo.append_message(KEYS[0], Role.USER, "from a short thread", tokens=1)
            assert message.id is not None
            acked.append(message.id)
        except Exception as exc:
            errors.append(repr(exc))

    def spawner() -> None:
        while not stop.is_set():
            threads = [threading.Thread(target=one_call) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    spawners = [threading.Thread(target=spawner) for _ in range(2)]
    for thread in spawners:
        thread.start()
    log = path.with_name("children.jsonl")
    pids = []
    for number in range(children):
        pids.append(fork(partial(append_for, repo, 0.05, f"child-{number}", log)))
        time.sleep(0.005)
    statuses = [describe(wait(pid, TIMEOUT)) for pid in pids]
    stop.set()
    for thread in spawners:
        thread.join()
    engine.dispose()
    problems = check_store(path, Acks().read(log))
    with sqlite3.connect(path) as check:
        stored = {row[0] for row in check.execute("SELECT id FROM messages")}
    check.close()
    lost = [message_id for message_id in acked if message_id not in stored]
    report.write_text(
        json.dumps(
            {
                "statuses": statuses,
                "errors": errors[:3],
                "problems": problems[:3],
                "lost": len(lost),
                "acked": len(acked),
            }
        )
    )


def test_threads_ending_while_the_process_forks_leave_no_damage(tmp_path: Path) -> None:
    """A thread's connection is closed as the thread ends, from that thread or the
    garbage collector: such a close must not overlap a fork either (it left SQLite's lock
    bookkeeping half-updated in the child: children hung, the file was damaged and the
    parent's own acknowledged writes were lost)."""
    path = tmp_path / "sessions.db"
    report = tmp_path / "report.json"
    children = 15 * stress()
    status = wait(fork(lambda: _forks_beside_ending_threads(path, report, children)), TIMEOUT)
    assert_exited(status, "the forking process")
    verdict = json.loads(report.read_text())
    assert verdict["statuses"] == ["exit 0"] * children, verdict
    assert (verdict["errors"], verdict["problems"], verdict["lost"]) == ([], [], 0), verdict
    assert verdict["acked"] > 0, verdict
