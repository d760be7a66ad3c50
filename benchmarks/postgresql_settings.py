"""Pool and server settings on PostgreSQL, measured: `python -m benchmarks.postgresql_settings`.

Takes the server from `AISOPOD_BENCH_POSTGRES_URL` (default
`postgresql://postgres@127.0.0.1:5432/test`, a role that may `CREATE DATABASE`) and
PgBouncer from `AISOPOD_BENCH_PGBOUNCER_URL` (default: the same URL on port 6432; see
`.ci/start-pgbouncer`). Every figure runs in a database of its own, made here and dropped
at the end (a database, not a schema: PgBouncer drops a URL's `options`, so a search path
could not reach the server through it), and is taken with the public API only:
`open_database`, `SessionRepository`, and for pool sizes an engine built as
docs/postgresql.md says (`create_engine(..., pool_size=...)` on a store `open_database`
migrated).

Each configuration runs T threads in this process: first each thread appends one message
per call to a session of its own for `--seconds`, then each reads the newest 20 messages
(`get_history(limit=20)`) of a session of 50 of its own for as long; `--rounds` times, the
configurations in turns (the machine may be shared: a burst of load from elsewhere then
hits every configuration alike), medians printed with the range of the rates. Printed:
appends/s, the median and 95th-percentile append, reads/s, the median and
95th-percentile read, and how many server connections the engine opened once warm (a
pool too small for its threads opens and closes overflow connections
all the time). Measured are:

- (a) pool size per process: 1, 2, 4 and 8 threads on pools of 1, 2, 4 and 8
  connections with no overflow, plus the overflow churn of a pool of 1 + 10 under 8
  threads and SQLAlchemy's default of 5 + 10;
- (b) `synchronous_commit` on and off (the URL's `options=-csynchronous_commit=off`);
- (c) direct with prepared statements as the store sets them (psycopg prepares after 5
  runs on a direct connection) and with `?prepare_threshold=none`, and through PgBouncer
  in transaction pooling (where the store prepares nothing);
- (d) 1, 2 and 4 worker processes of 2 threads each, every one opening the store with
  `open_database` as a gateway worker does, direct and through PgBouncer, with the server
  backends serving them counted in mid-append.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import signal
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url

from aisopod_session import SCHEMA_VERSION, SessionRepository, open_database

URL_ENV = "AISOPOD_BENCH_POSTGRES_URL"
PGBOUNCER_ENV = "AISOPOD_BENCH_PGBOUNCER_URL"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
HISTORY_LIMIT = 20
READ_SESSION = 50
"""Messages in each session the read phase reads (a conversation a gateway would keep)."""
TEXT = "What's the weather in Oslo tomorrow, and should I take an umbrella?"


@dataclass(frozen=True)
class Measured:
    """One configuration's figures: throughput and latencies of appends and reads."""

    label: str
    threads: int
    pool: str
    prepare: str
    appends_per_s: float
    append_p50_ms: float
    append_p95_ms: float
    reads_per_s: float
    read_p50_ms: float
    read_p95_ms: float
    connections: int
    appends_low: float = 0.0
    appends_high: float = 0.0
    reads_low: float = 0.0
    reads_high: float = 0.0


Runner = Callable[[], Measured]
"""One configuration's measurement, run once per round."""


def rounds(runners: Sequence[Runner], count: int) -> list[Measured]:
    """Each runner's figures over `count` rounds, run in turns (so a burst of load from
    elsewhere on a shared machine hits every configuration alike): medians, with the
    lowest and highest appends/s."""
    runs: list[list[Measured]] = [[] for _ in runners]
    for _ in range(count):
        for index, runner in enumerate(runners):
            runs[index].append(runner())
    combined = []
    for measured in runs:
        first = measured[0]

        def median(field: str, of: list[Measured] = measured) -> float:
            return float(statistics.median(getattr(m, field) for m in of))

        appends = [m.appends_per_s for m in measured]
        reads = [m.reads_per_s for m in measured]
        combined.append(
            Measured(
                label=first.label,
                threads=first.threads,
                pool=first.pool,
                prepare=first.prepare,
                appends_per_s=median("appends_per_s"),
                append_p50_ms=median("append_p50_ms"),
                append_p95_ms=median("append_p95_ms"),
                reads_per_s=median("reads_per_s"),
                read_p50_ms=median("read_p50_ms"),
                read_p95_ms=median("read_p95_ms"),
                connections=round(median("connections")),
                appends_low=min(appends),
                appends_high=max(appends),
                reads_low=min(reads),
                reads_high=max(reads),
            )
        )
    return combined


def server_url() -> URL:
    """The server under test (`AISOPOD_BENCH_POSTGRES_URL`), on psycopg."""
    url = make_url(os.environ.get(URL_ENV, DEFAULT_URL))
    return url.set(drivername="postgresql+psycopg")


def pgbouncer_url(direct: URL) -> URL:
    """PgBouncer in front of `direct`'s server (`AISOPOD_BENCH_PGBOUNCER_URL`, else port
    6432 on the same host)."""
    given = os.environ.get(PGBOUNCER_ENV)
    if given:
        return make_url(given).set(drivername="postgresql+psycopg")
    return direct.set(port=6432)


@contextmanager
def scratch_database(server: URL, prefix: str) -> Iterator[URL]:
    """A new, empty database on `server` named `<prefix>_<random>`; dropped on exit with
    every connection to it (PgBouncer's included), whatever happened inside."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield server.set(database=name)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def with_options(url: URL, **settings: str) -> URL:
    """`url` with server settings passed as `options=-c name=value …`."""
    options = " ".join(f"-c{name}={value}" for name, value in settings.items())
    return url.update_query_dict({"options": options})


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile of `values` (nearest rank); 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def count_connections(engine: Engine) -> Callable[[], int]:
    """A counter of the server connections `engine` opens from now on."""
    opened = [0]

    def on_connect(_dbapi: object, _record: object) -> None:
        opened[0] += 1

    event.listen(engine, "connect", on_connect)
    return lambda: opened[0]


def run_threads(threads: int, work: Callable[[int], list[float]]) -> list[list[float]]:
    """Run `work(index)` on `threads` threads started together; their results in order."""
    results: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            results[index] = work(index)
        except BaseException as exc:  # surfaced below: a benchmark must not hide errors
            errors.append(exc)

    workers = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return results


def timed_loop(call: Callable[[], object], seconds: float) -> list[float]:
    """Call `call` until `seconds` have passed; each call's duration in seconds."""
    durations: list[float] = []
    deadline = time.perf_counter() + seconds
    while True:
        started = time.perf_counter()
        if started >= deadline:
            return durations
        call()
        durations.append(time.perf_counter() - started)


def thread_keys(threads: int, agent: str = "bench") -> list[str]:
    """One new session key per thread (so no two threads share a row lock)."""
    run = uuid.uuid4().hex[:8]
    return [f"{agent}:telegram:bot:dm:{run}-{index}" for index in range(threads)]


def phases(
    repo: SessionRepository, keys: Sequence[str], seconds: float, start: Callable[[], object]
) -> tuple[list[float], list[float]]:
    """Each of `keys`' threads appends to its session for `seconds`, then reads the newest
    `HISTORY_LIMIT` messages of a session of `READ_SESSION` messages of its own for as
    long (`start()` is called before each phase: a barrier across processes); every
    append's and every read's duration. The read session's size is fixed, so reads do not
    depend on how many appends the first phase managed."""
    readers = [f"{key}-read" for key in keys]
    for key, reader in zip(keys, readers, strict=True):
        repo.get_or_create(key)
        repo.get_or_create(reader)
        repo.append_messages(reader, [{"role": "user", "content": TEXT}] * READ_SESSION)

    def appends(index: int) -> list[float]:
        return timed_loop(lambda: repo.append_message(keys[index], "user", TEXT), seconds)

    def reads(index: int) -> list[float]:
        return timed_loop(lambda: repo.get_history(readers[index], limit=HISTORY_LIMIT), seconds)

    start()
    appended = [d for durations in run_threads(len(keys), appends) for d in durations]
    start()
    read = [d for durations in run_threads(len(keys), reads) for d in durations]
    return appended, read


def summarise(
    appended: Sequence[float],
    read: Sequence[float],
    *,
    seconds: float,
    label: str,
    threads: int,
    pool: str,
    prepare: str,
    connections: int,
) -> Measured:
    """The figures of one configuration from its calls' durations."""
    return Measured(
        label=label,
        threads=threads,
        pool=pool,
        prepare=prepare,
        appends_per_s=len(appended) / seconds,
        append_p50_ms=statistics.median(appended) * 1000,
        append_p95_ms=percentile(appended, 0.95) * 1000,
        reads_per_s=len(read) / seconds,
        read_p50_ms=statistics.median(read) * 1000,
        read_p95_ms=percentile(read, 0.95) * 1000,
        connections=connections,
    )


def measure(
    repo: SessionRepository,
    *,
    label: str,
    threads: int,
    pool: str,
    prepare: str,
    seconds: float,
    connections: Callable[[], int],
) -> Measured:
    """Appends, then reads, by `threads` threads of this process on `repo`."""
    keys = thread_keys(threads)
    for key in keys:
        repo.get_or_create(key)
    # A warm pool, as a running gateway's is: what opens after this is churn.
    run_threads(threads, lambda index: timed_loop(lambda: repo.get(keys[index]), 0.2))
    before = connections()
    appended, read = phases(repo, keys, seconds, lambda: None)
    return summarise(
        appended,
        read,
        seconds=seconds,
        label=label,
        threads=threads,
        pool=pool,
        prepare=prepare,
        connections=connections() - before,
    )


def prepare_setting(engine: Engine) -> str:
    """The prepare threshold psycopg was left with on one of `engine`'s connections."""
    raw = engine.raw_connection()
    try:
        threshold = getattr(raw.driver_connection, "prepare_threshold", None)
    finally:
        raw.close()
    return "off" if threshold is None else f"after {threshold}"


def sized_engine(url: URL, *, pool_size: int, max_overflow: int, prepare: int | None) -> Engine:
    """An engine on a store already migrated, with its own pool size, as
    docs/postgresql.md says to build one; `prepare` is psycopg's prepare threshold
    (which `open_database` would choose itself: 5 on a direct connection)."""
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        connect_args={"prepare_threshold": prepare},
    )


def pool_sizes(
    url: URL, seconds: float, threads: Sequence[int], sizes: Sequence[int]
) -> list[Runner]:
    """(a): every thread count on every pool size (no overflow), then the overflow churn
    of a pool of 1 + 10 and SQLAlchemy's default 5 + 10 under the most threads."""
    shapes = [(t, size, 0) for t in threads for size in sizes]
    shapes += [(max(threads), 1, 10), (max(threads), 5, 10)]

    def runner(count: int, size: int, overflow: int) -> Runner:
        def run() -> Measured:
            engine = sized_engine(url, pool_size=size, max_overflow=overflow, prepare=5)
            try:
                return measure(
                    SessionRepository(engine),
                    label=f"pool {size}+{overflow}",
                    threads=count,
                    pool=f"{size} + {overflow}",
                    prepare="after 5",
                    seconds=seconds,
                    connections=count_connections(engine),
                )
            finally:
                engine.dispose()

        return run

    return [runner(*shape) for shape in shapes]


def store_settings(
    direct: URL, bouncer: URL | None, seconds: float, threads: Sequence[int]
) -> list[Runner]:
    """(b) and (c): `open_database` as a gateway calls it (default pool 5 + 10), direct
    with `synchronous_commit` on and off, direct with prepared statements off, and
    through PgBouncer."""
    configurations: list[tuple[str, URL]] = [
        ("direct, synchronous_commit on", direct),
        ("direct, synchronous_commit off", with_options(direct, synchronous_commit="off")),
        (
            "direct, prepare_threshold=none",
            direct.update_query_dict({"prepare_threshold": "none"}),
        ),
    ]
    if bouncer is not None:
        configurations.append(("PgBouncer (transaction pooling)", bouncer))

    def runner(label: str, url: URL, count: int) -> Runner:
        def run() -> Measured:
            engine = open_database(url)
            try:
                opened = count_connections(engine)
                return measure(
                    SessionRepository(engine),
                    label=label,
                    threads=count,
                    pool="5 + 10",
                    prepare=prepare_setting(engine),
                    seconds=seconds,
                    connections=opened,
                )
            finally:
                engine.dispose()

        return run

    return [runner(label, url, count) for label, url in configurations for count in threads]


def _worker(url: str, threads: int, seconds: float, barrier: Any, out: Any) -> None:
    """A gateway worker process: `open_database` as a gateway calls it, `threads` threads
    through `phases`; puts its durations and opened connections (or its error) on `out`."""
    try:
        engine = open_database(url)
        try:
            opened = count_connections(engine)
            keys = thread_keys(threads)
            timed = phases(SessionRepository(engine), keys, seconds, lambda: barrier.wait(120))
            out.put((*timed, opened()))
        finally:
            engine.dispose()
    except BaseException as exc:
        barrier.abort()  # nobody waits forever for a worker that failed
        out.put(repr(exc))


def collect(workers: Sequence[Any], out: Any, timeout: float = 180) -> list[Any]:
    """One answer from each of `workers` (started processes) off `out`, then joined;
    `RuntimeError` if a worker died without answering or none answered in `timeout`."""
    answers: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(answers) < len(workers):
        try:
            answers.append(out.get(timeout=0.5))
        except queue.Empty:
            if all(not w.is_alive() for w in workers) or time.monotonic() > deadline:
                raise RuntimeError("a worker process ended without an answer") from None
    for worker in workers:
        worker.join(30)
    failed = [answer for answer in answers if isinstance(answer, str)]
    if failed:
        raise RuntimeError(f"a worker failed: {failed[0]}")
    return answers


def worker_processes(
    targets: Sequence[tuple[str, URL]], seconds: float, counts: Sequence[int], threads: int
) -> list[Runner]:
    """(d): N worker processes of `threads` threads each, on each target; the aggregate
    figures, with the server backends serving the database in mid-append."""

    def runner(label: str, url: URL, count: int) -> Runner:
        def run() -> Measured:
            context = multiprocessing.get_context("spawn")
            barrier = context.Barrier(count + 1)
            out = context.Queue()
            text_url = url.render_as_string(hide_password=False)
            workers = [
                context.Process(target=_worker, args=(text_url, threads, seconds, barrier, out))
                for _ in range(count)
            ]
            for worker in workers:
                worker.start()
            try:
                barrier.wait(120)  # the appends start
                time.sleep(seconds / 2)
                backends = server_backends(url)
                barrier.wait(120)  # the reads start
            except threading.BrokenBarrierError:
                pass  # a worker failed: `collect` says how
            answers = collect(workers, out)
            appended = [d for answer in answers for d in answer[0]]
            read = [d for answer in answers for d in answer[1]]
            return summarise(
                appended,
                read,
                seconds=seconds,
                label=f"{label}, {count} × {threads} threads",
                threads=count * threads,
                pool="5 + 10 each",
                prepare="after 5" if label == "direct" else "off",
                connections=backends,
            )

        return run

    return [runner(label, url, count) for label, url in targets for count in counts]


def server_backends(url: URL) -> int:
    """How many client backends of the server serve `url`'s database now."""
    admin = create_engine(server_url())
    try:
        with admin.connect() as conn:
            found = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = :name AND backend_type = 'client backend'"
                ),
                {"name": url.database},
            ).scalar_one()
    finally:
        admin.dispose()
    return int(found)


def reachable(url: URL) -> bool:
    """Whether a server answers at `url`."""
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        return False
    finally:
        engine.dispose()
    return True


def table(rows: Sequence[Measured], connections: str = "connections opened") -> str:
    """`rows` as a markdown table; `connections` heads the last column."""
    lines = [
        "| configuration | threads | pool | prepared | appends/s median (min–max) "
        "| append p50 / p95 ms | reads/s median (min–max) | read p50 / p95 ms "
        f"| {connections} |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.threads} | {r.pool} | {r.prepare} "
            f"| {r.appends_per_s:,.0f} ({r.appends_low:,.0f}–{r.appends_high:,.0f}) "
            f"| {r.append_p50_ms:.2f} / {r.append_p95_ms:.2f} "
            f"| {r.reads_per_s:,.0f} ({r.reads_low:,.0f}–{r.reads_high:,.0f}) "
            f"| {r.read_p50_ms:.2f} / {r.read_p95_ms:.2f} | {r.connections} |"
        )
    return "\n".join(lines)


def server_facts(url: URL) -> str:
    """The server's version and the settings the figures depend on."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            version = conn.execute(text("SHOW server_version")).scalar_one()
            facts = [f"PostgreSQL {version}"]
            for name in ("max_connections", "synchronous_commit", "fsync", "shared_buffers"):
                facts.append(f"{name}={conn.execute(text(f'SHOW {name}')).scalar_one()}")
    finally:
        engine.dispose()
    return ", ".join(facts)


def exit_on_sigterm() -> None:
    """Make SIGTERM end the run as Ctrl-C does, through every `finally`, so the scratch
    databases are dropped."""

    def stop(_signal: int, _frame: object) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement and print the tables as markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.0, help="per phase (default 1)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--pool-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=5, help="of each configuration (5)")
    args = parser.parse_args(argv)
    n = args.rounds
    exit_on_sigterm()
    direct = server_url()
    if not reachable(direct):
        print(f"no PostgreSQL at {direct.render_as_string(hide_password=True)}", file=sys.stderr)
        return 1
    print(
        f"# Pool and server settings ({server_facts(direct)}, {os.cpu_count()} cores, "
        f"store schema version {SCHEMA_VERSION}, {args.rounds} rounds of {args.seconds} s)\n"
    )
    with scratch_database(direct, "aisopod_bench_settings") as url:
        open_database(url).dispose()  # migrated once, before any engine of a given size
        bouncer: URL | None = pgbouncer_url(direct).set(database=url.database)
        if bouncer is not None and not reachable(bouncer):
            print("(PgBouncer does not answer: its rows are left out)\n")
            bouncer = None
        print("## (a) Pool size per process (engine built with create_engine)\n")
        print(table(rounds(pool_sizes(url, args.seconds, args.threads, args.pool_sizes), n)))
        print(
            "\n## (b, c) open_database as is: synchronous_commit, prepared statements, PgBouncer\n"
        )
        store_threads = [t for t in args.threads if t in (1, 4, 8)] or args.threads
        print(table(rounds(store_settings(url, bouncer, args.seconds, store_threads), n)))
        print("\n## (d) Worker processes, each open_database as is, 2 threads each\n")
        targets = [("direct", url)] + ([] if bouncer is None else [("PgBouncer", bouncer)])
        measured = rounds(worker_processes(targets, args.seconds, args.processes, 2), n)
        print(table(measured, connections="server backends"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
