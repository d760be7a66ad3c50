"""Measure migration 4 (lineage, page indexes, the search index) on a large store:
`python -m benchmarks.migration4 [--messages N] [--postgresql URL]`.

Builds a store at schema version 3 holding N messages (default 10⁶) of about twenty words
each, in 1 000 sessions, with plain SQL; then upgrades it in a fresh process and prints
the time taken and the size of the store (SQLite: the file; PostgreSQL: the two tables
with their indexes) before and after. Figures go to docs/migrations.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import Engine, create_engine

from aisopod_session.migrations import MIGRATIONS, run_migrations
from benchmarks.migration3 import SESSIONS, series


def text_of(engine: Engine) -> str:
    """SQL of a message's JSON content: twenty words of a vocabulary of 5 000, derived
    from `n` (the same for every run)."""
    if engine.dialect.name == "postgresql":
        return (
            "to_json((SELECT string_agg('w' || mod(n::bigint * 7919 + k * 104729, 5000), ' ') "
            "FROM generate_series(1, 20) AS g(k)))::text"
        )
    return (
        "json_quote((SELECT group_concat('w' || ((n * 7919 + k * 104729) % 5000), ' ') "
        "FROM (WITH RECURSIVE g(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM g WHERE k < 20) "
        "SELECT k FROM g)))"
    )


def build(engine: Engine, messages: int) -> None:
    """Sessions and messages at schema version 3, as this library left them."""
    run_migrations(engine, MIGRATIONS[:3])
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id, "
            "created_at, updated_at, message_count) "
            "SELECT 'agent', 'telegram', 'bot', 'dm', 'peer-' || n, "
            "'2026-11-30T00:00:00.000000+00:00', '2026-11-30T00:00:00.000000+00:00', "
            f"{messages // SESSIONS} FROM {series(engine, SESSIONS)}"
        )
        conn.exec_driver_sql(
            "INSERT INTO messages (session_id, role, content, created_at) "
            f"SELECT 1 + mod(n, {SESSIONS}), 'user', {text_of(engine)}, "
            f"'2026-11-30T00:00:00.000000+00:00' FROM {series(engine, messages)}"
        )


def size(engine: Engine) -> int:
    """The store's size in bytes: the SQLite file (after a checkpoint), or PostgreSQL's
    two tables with their indexes and TOAST."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            return int(
                conn.exec_driver_sql(
                    "SELECT pg_total_relation_size('messages') + pg_total_relation_size('sessions')"
                ).scalar_one()
            )
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
        page = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
        return int(pages) * int(page)


def upgrade(url: str) -> None:
    """Run in a fresh process: migrate to the newest version; print the time as JSON."""
    engine = create_engine(url)
    started = time.perf_counter()
    run_migrations(engine)
    seconds = time.perf_counter() - started
    engine.dispose()
    print(json.dumps({"seconds": round(seconds, 1)}))


def measure(url: str, messages: int) -> dict[str, object]:
    engine = create_engine(url)
    build(engine, messages)
    before = size(engine)
    engine.dispose()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.migration4", "--upgrade", url],
        check=True,
        capture_output=True,
        text=True,
    )
    engine = create_engine(url)
    after = size(engine)
    engine.dispose()
    return {
        "messages": messages,
        **json.loads(done.stdout),
        "size_before_mib": round(before / 2**20),
        "size_after_mib": round(after / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--postgresql", help="an empty PostgreSQL database or schema URL")
    parser.add_argument("--upgrade", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upgrade:
        upgrade(args.upgrade)
        return
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'store.db'}"
        print("sqlite", json.dumps(measure(url, args.messages)), flush=True)
    if args.postgresql:
        engine = create_engine(args.postgresql)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS messages, sessions, schema_version")
        engine.dispose()
        print("postgresql", json.dumps(measure(args.postgresql, args.messages)), flush=True)


if __name__ == "__main__":
    main()
