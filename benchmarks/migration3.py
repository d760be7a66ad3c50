"""Measure migration 3 (JSON content) on a large store: `python -m benchmarks.migration3
[--messages N] [--postgresql URL]`.

Builds a store at schema version 2 holding N messages (default 10⁶; plain SQL, as this
library's earlier versions or the Rust crate would have left it), then upgrades it in a
fresh process and prints the time taken and the process's peak memory before and after
the upgrade. Two kinds of store: `ours` (every content cell quoted) and `crate` (content
already JSON, each cell checked and kept). Figures go to docs/migrations.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import Engine, create_engine

from aisopod_session import open_database
from aisopod_session.migrations import MIGRATIONS, run_migrations

SESSIONS = 1000


def build(engine: Engine, messages: int, kind: str) -> None:
    """Sessions and messages at schema version 2: `ours` with text content, `crate` with
    JSON content and a one-row bare schema_version."""
    run_migrations(engine, MIGRATIONS[:2])
    content = "'message ' || n" if kind == "ours" else "'\"message ' || n || '\"'"
    with engine.begin() as conn:
        if kind == "crate":
            conn.exec_driver_sql("DELETE FROM schema_version WHERE version = 1")
            conn.exec_driver_sql(
                "UPDATE schema_version SET name = NULL, checksum = NULL, applied_at = NULL"
            )
        conn.exec_driver_sql(
            "INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id, "
            "created_at, updated_at, message_count) "
            "SELECT 'agent', 'telegram', 'bot', 'dm', 'peer-' || n, "
            "'2026-11-30T00:00:00.000000+00:00', '2026-11-30T00:00:00.000000+00:00', "
            f"{messages // SESSIONS} FROM {series(engine, SESSIONS)}"
        )
        conn.exec_driver_sql(
            "INSERT INTO messages (session_id, role, content, created_at) "
            f"SELECT 1 + mod(n, {SESSIONS}), 'user', {content}, "
            f"'2026-11-30T00:00:00.000000+00:00' FROM {series(engine, messages)}"
        )


def series(engine: Engine, count: int) -> str:
    if engine.dialect.name == "postgresql":
        return f"generate_series(1, {count}) AS s(n)"
    return (
        f"(WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < {count}) "
        "SELECT n FROM c)"
    )


def upgrade(url: str) -> None:
    """Run in a fresh process: upgrade and print time and peak memory as JSON."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    engine = open_database(url)
    seconds = time.perf_counter() - started
    engine.dispose()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "rss_before_kib": before, "rss_after_kib": after}))


def measure(url: str, messages: int, kind: str) -> dict[str, object]:
    engine = create_engine(url)
    build(engine, messages, kind)
    engine.dispose()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.migration3", "--upgrade", url],
        check=True,
        capture_output=True,
        text=True,
    )
    return {"kind": kind, "messages": messages, **json.loads(done.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--postgresql", help="an empty PostgreSQL database or schema URL")
    parser.add_argument("--upgrade", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upgrade:
        upgrade(args.upgrade)
        return
    for kind in ("ours", "crate"):
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{Path(folder) / 'store.db'}"
            print("sqlite", json.dumps(measure(url, args.messages, kind)), flush=True)
    if args.postgresql:
        for kind in ("ours", "crate"):
            engine = create_engine(args.postgresql)
            with engine.begin() as conn:
                conn.exec_driver_sql("DROP TABLE IF EXISTS messages, sessions, schema_version")
            engine.dispose()
            print("postgresql", json.dumps(measure(args.postgresql, args.messages, kind)))


if __name__ == "__main__":
    main()
