"""Real processes for `test_fork_and_dispose.py`: a parent that holds connections when it
forks, children that append and log what was acknowledged, a reader that looks while
they write, and the check of the file afterwards. Nothing here is mocked: real files,
`os.fork`, real SQLite connections.

Kept free of pytest and of `tests.dbtools` (which imports psycopg), so that the plain
`python -c` script of `exiting_parents` imports it quickly.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from aisopod_session import NewMessage, Role, SessionKey, SessionRepository, open_database

KEYS = [SessionKey("agent-1", "telegram", "bot", "dm", f"peer-{i}") for i in range(3)]

PAUSE = 0.001
"""Seconds a writer waits between appends, as a worker serving requests does. It keeps
the rate realistic (about 1 000 appends a second instead of a tight loop's 10 000), and
so the checkpoints: a tight loop checkpoints so often that the writes a lost `-wal`
takes with it may happen to be none."""


def stored_text(cell: str) -> str:
    """The text of a message as its content cell holds it: compact JSON, a JSON string
    for every message these writers append."""
    text = json.loads(cell)
    if not isinstance(text, str):
        raise ValueError(f"content cell {cell!r} is not a JSON string")
    return text


# --- processes --------------------------------------------------------------------------


def fork(child: Callable[[], object]) -> int:
    """Fork; the child runs `child()` and leaves through `os._exit` (status 0 when it
    returned), so it never runs the rest of its parent's code (pytest's, for a test). An
    exception in the child is printed and ends it with status 70."""
    pid = os.fork()
    if pid != 0:
        return pid
    code = 70  # pragma: no cover - the child's lines run in the child
    try:  # pragma: no cover
        child()
        code = 0
    except BaseException:  # pragma: no cover
        traceback.print_exc()
    finally:  # pragma: no cover
        os._exit(code)


def wait(pid: int, timeout: float) -> int:
    """The wait status of child `pid`; a child still running after `timeout` seconds is
    killed (so a hung child fails the test instead of hanging it), and says so."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} still running after {timeout} s: killed")
        time.sleep(0.01)


def describe(status: int) -> str:
    """A wait status in words: "exit 0", "killed by SIGSEGV (signal 11)"."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return f"killed by {signal.Signals(number).name} (signal {number})"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


# --- a parent that holds connections ----------------------------------------------------


@contextmanager
def holding_connections(engine: Engine) -> Iterator[SessionRepository]:
    """A repository on `engine` whose process holds connections the way a preloaded
    gateway does: the main thread's leased one, another living thread's leased one (the
    repository keeps one per thread), and an idle pooled one that `engine.connect()`
    used. The sessions of `KEYS` exist. The holding thread ends when the block does."""
    repo = SessionRepository(engine)
    for key in KEYS:
        repo.get_or_create(key)
    repo.append_message(KEYS[0], Role.SYSTEM, "parent/main-thread", tokens=1)
    ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        repo.append_message(KEYS[1], Role.SYSTEM, "parent/other-thread", tokens=1)
        repo.get_history(KEYS[1], limit=1)
        ready.set()
        release.wait()

    thread = threading.Thread(target=hold, name="holds-a-connection", daemon=True)
    thread.start()
    try:
        if not ready.wait(timeout=30):
            raise AssertionError("the holding thread never got its connection")
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT count(*) FROM messages").scalar_one()
        yield repo
    finally:
        release.set()
        thread.join()


# --- writers and their logs -------------------------------------------------------------


def append_for(repo: SessionRepository, seconds: float, tag: str, log: Path) -> int:
    """Append batches of one or two messages to `KEYS` in turn for `seconds`, `PAUSE`
    apart, logging each batch's ids and contents to `log` only after `append_messages`
    returned (that is what acknowledged means), then a `done` line; an exception is
    logged instead and re-raised. Each message costs one token, so a session's
    `token_usage` must equal its rows. Returns the number of batches."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sent = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            contents = [f"{tag}/{sent}/{part}" for part in range(1 + sent % 2)]
            stored = repo.append_messages(
                KEYS[sent % len(KEYS)],
                [NewMessage(Role.USER, content) for content in contents],
                tokens=len(contents),
            )
            # One small write with O_APPEND: a line is logged whole, however the writer ends.
            _log(fd, {"acked": [[message.id, message.content] for message in stored]})
            sent += 1
            time.sleep(PAUSE)
        _log(fd, {"done": sent})
    except BaseException as exc:
        _log(fd, {"error": f"{tag}: {type(exc).__name__}: {exc}"})
        raise
    finally:
        os.close(fd)
    return sent


def append_with_own_engine(path: Path, seconds: float, tag: str, log: Path) -> int:
    """`append_for` on an engine this process opens itself (what a worker is told to do
    after fork), disposed of when done, as a worker does at a graceful shutdown."""
    engine = open_database(path)
    try:
        return append_for(SessionRepository(engine), seconds, tag, log)
    finally:
        engine.dispose()


def _log(fd: int, entry: object) -> None:
    os.write(fd, (json.dumps(entry) + "\n").encode())


@dataclass
class Acks:
    """What the writers logged: each acknowledged content with its id, the writers that
    finished, and the errors they reported."""

    acked: dict[str, int] = field(default_factory=dict)
    done: int = 0
    errors: list[str] = field(default_factory=list)

    def read(self, log: Path, *, running: bool = False) -> Acks:
        """Add one writer's log (a missing log is a writer that never started). With
        `running`, the writer may still be writing: a log not there yet is skipped, and
        so is a last line not yet complete."""
        if not log.exists():
            if not running:
                self.errors.append(f"{log.name}: the writer never started")
            return self
        text = log.read_text()
        if running:
            text = text[: text.rfind("\n") + 1]
        for line in text.splitlines():
            entry = json.loads(line)
            for message_id, content in entry.get("acked", []):
                self.acked[content] = message_id
            self.done += "done" in entry
            if "error" in entry:
                self.errors.append(entry["error"])
        return self


class Reader:
    """Another process's view while writers run (an operator's `aisopod-session status`,
    the next master after a reload): it reads what the writers logged so far, then opens
    the file afresh, and keeps the worst look, when it missed acknowledged messages.
    Reading the log first makes the check sound: each logged append had committed
    before the reader's snapshot began, so a sound store shows every one of them."""

    def __init__(self, path: Path, logs: list[Path]) -> None:
        self.path = path
        self.logs = logs
        self.looks = 0
        self.worst: str | None = None
        self._worst_missing = 0

    def look(self) -> None:
        """One look: the logs so far, then the file's messages."""
        acks = Acks()
        for log in self.logs:
            acks.read(log, running=True)
        conn = sqlite3.connect(self.path)
        try:
            cells = [cell for (cell,) in conn.execute("SELECT content FROM messages")]
        except sqlite3.DatabaseError as exc:
            self.worst = self.worst or f"a reader could not read the file while it ran: {exc}"
            return
        finally:
            conn.close()
        stored = {stored_text(cell) for cell in cells}
        self.looks += 1
        missing = [content for content in acks.acked if content not in stored]
        if len(missing) > self._worst_missing:
            self._worst_missing = len(missing)
            self.worst = (
                f"a fresh reader missed {len(missing)} of the {len(acks.acked)} messages "
                f"acknowledged so far (e.g. {missing[:3]})"
            )

    def watch(self, running: Callable[[], bool], timeout: float) -> None:
        """Look every 0.1 s while `running()` says the writers are."""
        deadline = time.monotonic() + timeout
        while running() and time.monotonic() < deadline:
            self.look()
            time.sleep(0.1)

    def problems(self) -> list[str]:
        """The worst look, if any missed something."""
        return [] if self.worst is None else [f"{self.worst}; worst of {self.looks} looks"]


def watch_child(pid: int, reader: Reader, timeout: float) -> int:
    """`reader` looks every 0.1 s while child `pid` runs; then its wait status (a child
    still running after `timeout` seconds is killed, and says so)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            return wait(pid, 0)
        reader.look()
        time.sleep(0.1)


def check_store(path: Path, acks: Acks) -> list[str]:
    """Open the file afresh and list what is wrong with it: acknowledged messages missing,
    doubled or under another id; counters that disagree with the rows; integrity."""
    conn = sqlite3.connect(path)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchall()
        stored: dict[str, list[int]] = {}
        for message_id, cell in conn.execute("SELECT id, content FROM messages"):
            stored.setdefault(stored_text(cell), []).append(message_id)
        counters = conn.execute(
            "SELECT s.id, s.message_count, s.token_usage,"
            " (SELECT count(*) FROM messages AS m WHERE m.session_id = s.id)"
            " FROM sessions AS s ORDER BY s.id"
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        return [f"the file cannot be read ({exc}): {len(acks.acked)} acknowledged messages"]
    finally:
        conn.close()
    problems = []
    missing = [content for content in acks.acked if content not in stored]
    if missing:
        problems.append(
            f"{len(missing)} of {len(acks.acked)} acknowledged messages are missing "
            f"(e.g. {missing[:3]}); the file holds {sum(map(len, stored.values()))} messages"
        )
    doubled = [content for content in acks.acked if len(stored.get(content, [])) > 1]
    if doubled:
        problems.append(f"{len(doubled)} acknowledged messages stored twice: {doubled[:3]}")
    moved = [
        content
        for content, message_id in acks.acked.items()
        if len(stored.get(content, [])) == 1 and stored[content] != [message_id]
    ]
    if moved:
        problems.append(f"{len(moved)} acknowledged messages under another id: {moved[:3]}")
    wrong = [row for row in counters if not row[1] == row[2] == row[3]]
    if wrong:
        problems.append(
            f"counters disagree with the rows (session, message_count, token_usage, rows): {wrong}"
        )
    if integrity != [("ok",)]:
        problems.append(f"integrity_check: {integrity}")
    return problems


# --- parent processes that exit while their children write ------------------------------

ENDINGS = ("exit", "atexit-dispose")
"""How `preforked_parent` ends: "exit" returns, so its interpreter exits normally with the
engine as it is; "atexit-dispose" has registered `engine.dispose` with `atexit` (an app's
shutdown hook) and calls `sys.exit(0)`."""

LONER = 0.2
"""Seconds the last of several writers goes on alone. While several processes write,
none can restart the `-wal` under the others' readers, so SQLite checkpoints after
nearly every commit, and the writes a deleted `-wal` takes with it may be none; a
writer alone checkpoints every thousand pages, as any single worker does."""


def exiting_parents(folder: str, seconds: str) -> None:
    """The body of a `python -c` script: fork one gateway master per `ENDINGS` (each in
    `folder`/<ending>, each a plain interpreter that then ends the normal way, see
    `preforked_parent`), wait for both, and fail if either failed. Forking here costs one
    interpreter start instead of two."""
    pids = {}
    for ending in ENDINGS:
        pid = os.fork()
        if pid == 0:
            # The master: return from here, so the script ends as any script does.
            preforked_parent(Path(folder) / ending, float(seconds), ending)
            return
        pids[ending] = pid
    failed = {
        ending: describe(status)
        for ending, pid in pids.items()
        if (status := os.waitpid(pid, 0)[1]) != 0
    }
    if failed:
        sys.exit(f"parents failed: {failed}")


def preforked_parent(folder: Path, seconds: float, ending: str) -> None:
    """A gateway's master process: open the store in `folder`, hold connections, fork two
    writers (one on the inherited repository, one on an engine of its own, which goes on
    `LONER` seconds longer), then end while they write, as `ending` says. The writers log
    to `folder`/inherited.jsonl and own.jsonl."""
    path = folder / "sessions.db"
    engine = open_database(path)
    if ending == "atexit-dispose":
        atexit.register(engine.dispose)
    with holding_connections(engine) as repo:
        fork(lambda: append_for(repo, seconds, "inherited", folder / "inherited.jsonl"))
        fork(lambda: append_with_own_engine(path, seconds + LONER, "own", folder / "own.jsonl"))
        time.sleep(seconds * 0.3)  # the children are writing now
    if ending == "atexit-dispose":
        sys.exit(0)
