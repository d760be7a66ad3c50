"""Past one server, simulated on one: `python -m benchmarks.scaling`.

Takes the server from `AISOPOD_BENCH_POSTGRES_URL` (default
`postgresql://postgres@127.0.0.1:5432/test`, a role that may `CREATE DATABASE`); every
store is a database of its own, made here and dropped at the end. Two simulations, each
printed as markdown (docs/scaling.md holds a run and the design they check):

1. **Shards by agent.** Two databases, each a whole store opened with `open_database`,
   behind `ShardRouter`, which sends every call for an agent to the store its `agent_id`
   hashes to. Shown: where 200 agents' sessions land, that each agent's sessions and
   messages are on its shard only, what a listing across agents costs when it has to ask
   every shard and merge, and appends/s of worker processes on one store against the
   same load spread over two.
2. **A read replica with injected lag.** A second database fed by a copier that takes a
   consistent snapshot of the primary every few milliseconds (`copy_database` into an
   in-memory SQLite store) and applies it to the replica (`copy_database(...,
   overwrite=True)`, one transaction) only once it is `lag` old: the replica always shows
   a whole past state of the primary, as a streaming standby does, and that state is
   `lag` behind. Shown: what a reader of the replica sees of a conversation being
   written (its newest messages missing, its counters stale, search not finding them
   yet), how long a write takes to become visible there, and that reading a session's
   history from the primary after writing it (or from the replica only when it has
   caught up to the last id written) never misses a write.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import URL

from aisopod_session import (
    SCHEMA_VERSION,
    Message,
    SearchHit,
    Session,
    SessionFilter,
    SessionKey,
    SessionRepository,
    copy_database,
    open_database,
)
from benchmarks.postgresql_settings import (
    collect,
    exit_on_sigterm,
    percentile,
    reachable,
    run_threads,
    scratch_database,
    server_facts,
    server_url,
    timed_loop,
)

BUCKETS = 64
"""Logical shards: agents hash to one of these, and each is placed on a store. Moving a
bucket (its agents' sessions) to a new store adds capacity without rehashing the rest."""

TEXT = "Please book a table for two in Oslo tomorrow at seven"


# --- the router ---------------------------------------------------------------------------


def bucket_of(agent_id: str, buckets: int = BUCKETS) -> int:
    """The bucket of an agent id, normalised as a key's is (`ValueError` for an invalid
    one): a stable hash (BLAKE2b, the same in every process and release, unlike
    `hash()`), so every worker of every host agrees."""
    normalised = SessionKey(agent_id, "-", "-", "dm", "-").agent_id
    digest = hashlib.blake2b(normalised.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


class ShardRouter:
    """Sends every call for one agent to one store: the store its `agent_id`'s bucket is
    placed on. Every key holds its agent, so a call on a key, and `list_sessions` or
    `search_messages` for one agent, reach one store; calls across agents ask every
    store and merge.

    The stores are whole aisopod stores (engines from `open_database`, on any URL it
    takes); ids are each store's own, so a session or message is named by (shard, id),
    or better by its key.
    """

    def __init__(self, engines: Sequence[Engine], placement: Sequence[int] | None = None) -> None:
        """`placement[b]` is the index in `engines` of bucket b's store (default: buckets
        dealt round-robin over the stores)."""
        if not engines:
            raise ValueError("engines: at least one store")
        if placement is not None and (
            not placement or any(not 0 <= index < len(engines) for index in placement)
        ):
            raise ValueError(f"placement: store indexes from 0 to {len(engines) - 1}")
        self.repositories = [SessionRepository(engine) for engine in engines]
        self.placement = (
            list(placement)
            if placement is not None
            else [bucket % len(engines) for bucket in range(BUCKETS)]
        )

    def shard_of(self, agent_id: str) -> int:
        """The index of the store holding `agent_id`'s sessions."""
        return self.placement[bucket_of(agent_id, len(self.placement))]

    def for_agent(self, agent_id: str) -> SessionRepository:
        """A repository confined to `agent_id`, on its store: every call the gateway makes
        for one agent (`AccessDeniedError` for another agent's key, as `for_agent`)."""
        return self.repositories[self.shard_of(agent_id)].for_agent(agent_id)

    def for_key(self, key: SessionKey | str) -> SessionRepository:
        """The repository (confined to the key's agent) for calls on `key`."""
        parsed = key if isinstance(key, SessionKey) else SessionKey.parse(key)
        return self.for_agent(parsed.agent_id)

    def list_sessions(
        self, filter: SessionFilter | Mapping[str, Any] | None = None, *, limit: int = 100
    ) -> list[tuple[int, Session]]:
        """The `limit` most recently updated sessions matching `filter` over every store,
        each with its store's index, in `list_sessions`' order: (updated_at, id) newest
        first, ties between stores by store index. Each store is asked for its own
        `limit` newest (enough for the global `limit`), then the lists are merged."""
        per_shard = [
            [(index, session) for session in repo.list_sessions(filter, limit=limit)]
            for index, repo in enumerate(self.repositories)
        ]
        merged = heapq.merge(
            *per_shard, key=lambda item: (item[1].updated_at, item[0], item[1].id), reverse=True
        )
        return list(merged)[:limit]

    def count_sessions(self, filter: SessionFilter | Mapping[str, Any] | None = None) -> int:
        """How many sessions match `filter` over every store."""
        return sum(repo.count_sessions(filter) for repo in self.repositories)

    def search_messages(self, query: str, *, limit: int = 20) -> list[tuple[int, SearchHit]]:
        """The best `limit` hits of `query` over every store, by rank. PostgreSQL's
        `ts_rank` scores a message by its own words only, so ranks from two stores compare;
        SQLite's bm25 weighs by each store's own statistics, so there the merge is
        approximate."""
        hits = [
            (index, hit)
            for index, repo in enumerate(self.repositories)
            for hit in repo.search_messages(query, limit=limit)
        ]
        hits.sort(key=lambda item: item[1].rank, reverse=True)
        return hits[:limit]


# --- simulation 1: two shards ---------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """The median and 95th percentile of one call, in milliseconds."""

    label: str
    median_ms: float
    p95_ms: float


def timed(label: str, call: Callable[[], object], runs: int) -> Timing:
    """`call` run `runs` times after one untimed run."""
    call()
    durations = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        durations.append((time.perf_counter() - started) * 1000)
    return Timing(label, statistics.median(durations), percentile(durations, 0.95))


def fill(router: ShardRouter, single: SessionRepository, agents: int, sessions: int) -> None:
    """`agents` agents with `sessions` sessions of 3 messages each, written through the
    router and, the same, into one store `single`."""
    for agent in range(agents):
        for peer in range(sessions):
            key = f"agent-{agent}:telegram:bot:dm:peer-{peer}"
            for repo in (router.for_key(key), single):
                repo.get_or_create(key)
                repo.append_messages(
                    key,
                    [
                        {"role": "user", "content": f"{TEXT} (agent {agent})"},
                        {"role": "assistant", "content": "Booked."},
                        {"role": "user", "content": "Thanks"},
                    ],
                )


def routing_report(router: ShardRouter, agents: int) -> list[str]:
    """Where each agent's sessions are, checked against the router: lines of markdown."""
    lines = [
        "| shard | agents routed there | sessions | messages | sessions of other agents |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for index, repo in enumerate(router.repositories):
        mine = [a for a in range(agents) if router.shard_of(f"agent-{a}") == index]
        summary = repo.summary()
        strays = sum(
            totals.sessions
            for agent, totals in summary.by_agent.items()
            if router.shard_of(agent) != index
        )
        lines.append(
            f"| {index} | {len(mine)} | {summary.total.sessions} | {summary.total.messages} "
            f"| {strays} |"
        )
    return lines


def fan_out_report(router: ShardRouter, single: SessionRepository, runs: int) -> list[str]:
    """The cost of one agent's listing (one store) against listings across agents
    (every store, merged), with one store holding everything as the baseline."""
    merged = router.list_sessions(limit=20)
    everything = sorted(
        (
            (index, session)
            for index, repo in enumerate(router.repositories)
            for session in repo.list_sessions(limit=10_000)
        ),
        key=lambda item: (item[1].updated_at, item[0], item[1].id),
        reverse=True,
    )[:20]
    assert [(i, s.id) for i, s in merged] == [(i, s.id) for i, s in everything]
    timings = [
        timed(
            "one agent, list_sessions(agent_id), one store of all",
            lambda: single.list_sessions({"agent_id": "agent-7"}, limit=20),
            runs,
        ),
        timed(
            "one agent, through the router (its shard only)",
            lambda: router.for_agent("agent-7").list_sessions(limit=20),
            runs,
        ),
        timed(
            "all agents, newest 20, one store of all", lambda: single.list_sessions(limit=20), runs
        ),
        timed(
            "all agents, newest 20, fan-out to 2 shards + merge",
            lambda: router.list_sessions(limit=20),
            runs,
        ),
        timed("all agents, count, one store of all", single.count_sessions, runs),
        timed("all agents, count, fan-out to 2 shards", router.count_sessions, runs),
        timed(
            "search one word, one store of all",
            lambda: single.search_messages("booked", limit=20),
            runs,
        ),
        timed(
            "search one word, fan-out to 2 shards + merge",
            lambda: router.search_messages("booked", limit=20),
            runs,
        ),
    ]
    lines = ["| call | median ms | p95 ms |", "| --- | ---: | ---: |"]
    lines += [f"| {t.label} | {t.median_ms:.2f} | {t.p95_ms:.2f} |" for t in timings]
    return lines


def _append_worker(
    urls: list[str], worker: int, threads: int, seconds: float, barrier: Any, out: Any
) -> None:
    """A gateway worker process: `threads` threads, each appending for `seconds` to the
    sessions of 16 agents of its own in turn, through a router over `urls`; puts the
    appends each store took (or its error) on `out`."""
    engines: list[Engine] = []
    try:
        engines = [open_database(url) for url in urls]
        router = ShardRouter(engines)
        counts = [[0] * len(urls) for _ in range(threads)]

        def appends(thread: int) -> list[float]:
            keys = [f"agent-{worker}-{thread}-{n}:telegram:bot:dm:peer" for n in range(16)]
            repos = [router.for_key(key) for key in keys]
            shards = [router.shard_of(SessionKey.parse(key).agent_id) for key in keys]
            for repo, key in zip(repos, keys, strict=True):
                repo.get_or_create(key)
            turn = [0]

            def one() -> None:
                n = turn[0] % len(keys)
                turn[0] += 1
                repos[n].append_message(keys[n], "user", TEXT)
                counts[thread][shards[n]] += 1

            barrier.wait(120)
            return timed_loop(one, seconds)

        durations = [d for ds in run_threads(threads, appends) for d in ds]
        out.put((durations, [sum(c[i] for c in counts) for i in range(len(urls))]))
    except BaseException as exc:
        barrier.abort()
        out.put(repr(exc))
    finally:
        for engine in engines:
            engine.dispose()


@dataclass(frozen=True)
class Throughput:
    """Aggregate appends/s of worker processes over some stores."""

    label: str
    appends_per_s: float
    p50_ms: float
    per_shard: list[int]


def throughput(
    urls: Sequence[URL], label: str, processes: int, threads: int, seconds: float
) -> Throughput:
    """`processes` worker processes × `threads` threads appending through a router over
    `urls` for `seconds`, started together."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes * threads)
    out = context.Queue()
    texts = [url.render_as_string(hide_password=False) for url in urls]
    workers = [
        context.Process(target=_append_worker, args=(texts, w, threads, seconds, barrier, out))
        for w in range(processes)
    ]
    for worker in workers:
        worker.start()
    answers = collect(workers, out)
    durations = [d for answer in answers for d in answer[0]]
    per_shard = [sum(answer[1][i] for answer in answers) for i in range(len(urls))]
    return Throughput(
        label, len(durations) / seconds, statistics.median(durations) * 1000, per_shard
    )


def shards(server: URL, seconds: float, processes: int, threads: int, rounds: int) -> None:
    """Simulation 1, printed."""
    with ExitStack() as stack:
        shard_urls = [
            stack.enter_context(scratch_database(server, f"aisopod_shard_{n}")) for n in "ab"
        ]
        single_url = stack.enter_context(scratch_database(server, "aisopod_single"))
        engines = [open_database(url) for url in shard_urls]
        single_engine = open_database(single_url)
        stack.callback(single_engine.dispose)
        for engine in engines:
            stack.callback(engine.dispose)
        router = ShardRouter(engines)
        single = SessionRepository(single_engine)
        agents, sessions = 200, 5
        print(
            f"Two databases on one server ({', '.join(str(u.database) for u in shard_urls)}), "
            f"buckets: {BUCKETS} dealt round-robin; {agents} agents × {sessions} sessions "
            f"× 3 messages written through the router (and the same into one database, "
            f"{single_url.database}, for comparison).\n"
        )
        fill(router, single, agents, sessions)
        print("### Routing\n")
        print("\n".join(routing_report(router, agents)))
        print("\n### Listing and search: one shard against fan-out\n")
        print("\n".join(fan_out_report(router, single, runs=200)))
        print(
            f"\n### Appends/s: {processes} processes × {threads} threads, {seconds} s, "
            f"{rounds} rounds in turns (median, min–max)\n"
        )
        runs: dict[str, list[Throughput]] = {"one database": [], "two databases": []}
        for _ in range(rounds):
            runs["one database"].append(
                throughput([single_url], "one database", processes, threads, seconds)
            )
            runs["two databases"].append(
                throughput(shard_urls, "two databases", processes, threads, seconds)
            )
        print("| stores (one server) | appends/s | append p50 ms | appends per store |")
        print("| --- | ---: | ---: | --- |")
        for label, measured in runs.items():
            rates = [m.appends_per_s for m in measured]
            middle = sorted(measured, key=lambda m: m.appends_per_s)[len(measured) // 2]
            shares = " / ".join(f"{n:,}" for n in middle.per_shard)
            print(
                f"| {label} | {statistics.median(rates):,.0f} ({min(rates):,.0f}–"
                f"{max(rates):,.0f}) | {middle.p50_ms:.2f} | {shares} |"
            )


# --- simulation 2: a lagging read replica -------------------------------------------------


class LaggingReplica:
    """Feeds `replica` with the state `primary` had `lag` seconds ago: every `interval`
    a snapshot of the primary is taken (`copy_database` into an in-memory SQLite store,
    one consistent read) and applied to the replica, in one transaction, once it is `lag`
    old. `applied` lists (when applied, how old the state shown then was)."""

    def __init__(self, primary: Engine, replica: Engine, *, lag: float, interval: float) -> None:
        self.primary, self.replica = primary, replica
        self.lag, self.interval = lag, interval
        self.applied: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-copier")
        self._errors: list[BaseException] = []

    def __enter__(self) -> LaggingReplica:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._errors:
            raise self._errors[0]

    def _run(self) -> None:
        pending: list[tuple[float, Engine]] = []
        try:
            while not self._stop.is_set():
                snapshot = open_database(":memory:")
                taken = time.monotonic()
                copy_database(self.primary, snapshot)
                pending.append((taken, snapshot))
                while pending and time.monotonic() - pending[0][0] >= self.lag:
                    taken, ready = pending.pop(0)
                    # Only the newest ready state matters: older ones would be replaced.
                    if pending and time.monotonic() - pending[0][0] >= self.lag:
                        ready.dispose()
                        continue
                    copy_database(ready, self.replica, overwrite=True)
                    now = time.monotonic()
                    self.applied.append((now, now - taken))
                    ready.dispose()
                self._stop.wait(self.interval)
        except BaseException as exc:
            self._errors.append(exc)
        finally:
            for _, snapshot in pending:
                snapshot.dispose()


HISTORY = 20
"""Messages a reader asks for: the newest 20, as a gateway builds a prompt."""


@dataclass(frozen=True)
class Observation:
    """What readers saw right after one message of the conversation was written."""

    replica_has_it: bool
    replica_behind: int
    replica_search_found: bool
    primary_has_it: bool
    rule_has_it: bool
    rule_fell_back: bool


def message_id(message: Message) -> int:
    """The id of a stored message (always set once stored)."""
    assert message.id is not None
    return message.id


def count_of(repo: SessionRepository, key: str) -> int:
    """The session's `message_count` as `repo` sees it (0 if it has no such session)."""
    session = repo.get(key)
    return 0 if session is None else session.message_count


def history_ids(repo: SessionRepository, key: str, limit: int = HISTORY) -> list[int]:
    """The ids of the session's newest `limit` messages as `repo` sees them (none if it
    has no such session)."""
    if repo.get(key) is None:
        return []
    return [message_id(m) for m in repo.get_history(key, limit=limit)]


def read_your_writes(
    replica: SessionRepository, primary: SessionRepository, key: str, last_id: int
) -> tuple[list[int], bool]:
    """The history rule with a token: read the replica, and if it has not caught up to
    `last_id` (the id of the last message this caller wrote to the session), read the
    primary. The ids read, and whether it fell back to the primary."""
    seen = history_ids(replica, key)
    if seen and seen[-1] >= last_id:
        return seen, False
    return history_ids(primary, key), True


def converse(
    primary: SessionRepository, replica: SessionRepository, key: str, turns: int, pause: float
) -> list[Observation]:
    """A conversation of `turns` user messages written to the primary, `pause` apart,
    each with a word of its own; right after each, readers look for it on the replica
    (history, counter, search), on the primary, and by the token rule."""
    observations = []
    for turn in range(turns):
        word = f"zebra{turn}x"
        written = message_id(primary.append_message(key, "user", f"turn {turn}: {word}"))
        replica_ids = history_ids(replica, key)
        hits = replica.search_messages(word, limit=5)
        ruled, fell_back = read_your_writes(replica, primary, key, written)
        observations.append(
            Observation(
                replica_has_it=written in replica_ids,
                replica_behind=count_of(primary, key) - count_of(replica, key),
                replica_search_found=any(message_id(h.message) == written for h in hits),
                primary_has_it=written in history_ids(primary, key),
                rule_has_it=written in ruled,
                rule_fell_back=fell_back,
            )
        )
        time.sleep(pause)
    return observations


def visibility(
    replica: SessionRepository, key: str, writes: Sequence[tuple[float, int]], timeout: float
) -> list[float]:
    """Seconds from each write (monotonic time, id) until the replica's history of `key`
    shows it, polled every 5 ms; infinity if not within `timeout`."""
    delays: list[float] = []
    for written_at, written in writes:
        while True:
            latest = history_ids(replica, key, limit=1)
            if latest and latest[-1] >= written:
                delays.append(time.monotonic() - written_at)
                break
            if time.monotonic() - written_at > timeout:
                delays.append(float("inf"))
                break
            time.sleep(0.005)
    return delays


def replica_simulation(server: URL, lag: float, turns: int, pause: float) -> None:
    """Simulation 2, printed."""
    with ExitStack() as stack:
        primary_url = stack.enter_context(scratch_database(server, "aisopod_primary"))
        replica_url = stack.enter_context(scratch_database(server, "aisopod_replica"))
        primary_engine, replica_engine = open_database(primary_url), open_database(replica_url)
        stack.callback(primary_engine.dispose)
        stack.callback(replica_engine.dispose)
        primary, replica = SessionRepository(primary_engine), SessionRepository(replica_engine)
        # Other conversations, so the copier copies a store, not one session.
        for peer in range(50):
            other = f"concierge:telegram:bot:dm:other-{peer}"
            primary.get_or_create(other)
            primary.append_messages(other, [{"role": "user", "content": TEXT}] * 4)
        key = "concierge:telegram:bot:dm:alice"
        primary.get_or_create(key)
        copier = LaggingReplica(primary_engine, replica_engine, lag=lag, interval=0.02)
        with copier:
            time.sleep(lag * 2)  # the replica has caught up with the store as it was
            observations = converse(primary, replica, key, turns, pause)
            writes = []
            for turn in range(5):
                written = message_id(primary.append_message(key, "assistant", f"reply {turn}"))
                writes.append((time.monotonic(), written))
                time.sleep(lag / 3)
            delays = visibility(replica, key, writes, timeout=lag * 10)
        ages = [age for _, age in copier.applied]
    print(
        f"Primary {primary_url.database}, replica {replica_url.database} (two databases on "
        f"one server). Injected lag {lag * 1000:.0f} ms: a snapshot of the primary every "
        f"20 ms, applied when {lag * 1000:.0f} ms old; the state the replica showed was "
        f"{statistics.median(ages) * 1000:.0f} ms old at the median, "
        f"{max(ages) * 1000:.0f} ms at most ({len(ages)} states applied). A conversation "
        f"of {turns} user messages, one every {pause * 1000:.0f} ms, each looked for "
        "right after it was written:\n"
    )
    rows = [
        (f"the replica's history (newest {HISTORY})", [o.replica_has_it for o in observations]),
        (
            "the replica's `search_messages` (its word)",
            [o.replica_search_found for o in observations],
        ),
        (
            "the replica's `message_count` equals the primary's",
            [o.replica_behind == 0 for o in observations],
        ),
        (
            "the primary's history (rule: read your session there)",
            [o.primary_has_it for o in observations],
        ),
        (
            "the replica, else the primary if it is behind the id written",
            [o.rule_has_it for o in observations],
        ),
    ]
    print("| right after the write, the message is in … | reads |")
    print("| --- | ---: |")
    for label, flags in rows:
        print(f"| {label} | {sum(flags)} of {len(flags)} |")
    fell_back = sum(o.rule_fell_back for o in observations)
    behind = [o.replica_behind for o in observations]
    print(
        f"\nThe last rule read the primary {fell_back} times of {len(observations)}. The "
        f"replica's `message_count` of the session was behind by "
        f"{statistics.median(behind):.0f} messages at the median, {max(behind)} at most."
    )
    finite = [d for d in delays if d != float("inf")]
    never = len(delays) - len(finite)
    print(
        f"\nTime until a write shows on the replica (5 writes, polled every 5 ms): median "
        f"{statistics.median(finite) * 1000:.0f} ms, max {max(finite) * 1000:.0f} ms"
        + (f"; {never} never within {lag * 10:.0f} s." if never else ".")
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run both simulations and print them as markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="of appends (default 3)")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lag", type=float, default=0.5, help="injected, seconds (0.5)")
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="of the appends/s (3)")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    server = server_url()
    if not reachable(server):
        print(f"no PostgreSQL at {server.render_as_string(hide_password=True)}", file=sys.stderr)
        return 1
    print(
        f"# Scaling simulations ({server_facts(server)}, one machine, store schema version "
        f"{SCHEMA_VERSION})\n"
    )
    print("## 1. Two shards routed by agent_id\n")
    shards(server, args.seconds, args.processes, args.threads, args.rounds)
    print("\n## 2. A read replica with injected lag\n")
    replica_simulation(server, args.lag, args.turns, pause=0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
