"""A smoke run of `make bench` at the smallest scale: the benchmark code works and writes
complete results. Timings are not checked here (benchmarks are not tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get("AISOPOD_TEST_POSTGRES_URL")


@contextmanager
def bench_schema(server: str) -> Iterator[str]:
    """A schema of the smoke run's own on the test server (scenario 9's PostgreSQL search
    fills the URL's schema); its URL; dropped afterwards. The PostgreSQL half makes and
    drops schemas of its own besides."""
    import psycopg

    schema = f"bench_smoke_{os.getpid()}"
    url = make_url(server).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {schema}")
        try:
            yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
                hide_password=False
            )
        finally:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def run_bench(results: Path, postgres_url: str | None) -> subprocess.CompletedProcess[str]:
    environment = {
        name: value for name, value in os.environ.items() if name != "AISOPOD_BENCH_POSTGRES_URL"
    }
    environment["AISOPOD_BENCH_SCALE"] = "0.001"
    if postgres_url is not None:
        environment["AISOPOD_BENCH_POSTGRES_URL"] = postgres_url
    command = [sys.executable, "-m", "benchmarks.bench", "--no-peers", "--no-docs"]
    return subprocess.run(
        [*command, "--results", str(results)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def check_postgresql_half(report: dict[str, Any], targets: list[str]) -> None:
    """The PostgreSQL half: scenarios 1–5 (floor, ours, async on 1 and 3), growth,
    concurrent writers at 1, 4 and 16 threads without an error, and their targets."""
    pg = report["postgresql"]
    assert [s["number"] for s in pg["scenarios"]] == [1, 2, 3, 4, 5]
    timed_async = [s["number"] for s in pg["scenarios"] if "ours, async" in s["stats"]]
    assert timed_async == [1, 3]
    for scenario in [*pg["scenarios"], *pg["growth"], pg["writers"]]:
        assert scenario["stats"], scenario
        assert all(stats["median_us"] > 0 for stats in scenario["stats"].values())
    assert len(pg["growth"]) == 3
    assert set(pg["writers"]["stats"]) == {
        f"{who}, {threads} threads" for who in ("floor", "ours") for threads in (1, 4, 16)
    }
    assert set(pg["errors"].values()) == {0}
    ours = [t for t in targets if t.startswith("PostgreSQL")]
    assert sum("psycopg floor's throughput" in t for t in ours) == 4
    assert sum(t.startswith("PostgreSQL growth") for t in ours) == 2
    assert sum(t.startswith("PostgreSQL concurrent writers") for t in ours) == 2


def test_the_benchmark_runs_every_scenario_and_reports_every_target(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    if POSTGRES:
        with bench_schema(POSTGRES) as url:
            completed = run_bench(results, url)
    else:
        completed = run_bench(results, None)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(results.read_text())
    assert [s["number"] for s in report["scenarios"]] == [1, 2, 3, 4, 5]
    # The async API's column: scenarios 1 and 3.
    timed_async = [s["number"] for s in report["scenarios"] if "ours, async" in s["stats"]]
    assert timed_async == [1, 3]
    for scenario in [*report["scenarios"], *report["growth"], report["processes"]]:
        assert scenario["stats"], scenario
        assert all(stats["median_us"] > 0 for stats in scenario["stats"].values())
    assert len(report["growth"]) == 3
    assert len(report["memory"]["samples"]) == 10
    assert set(report["query_plans"]) >= {"get_history(limit=50)", "list_sessions(agent_id=...)"}
    every_target = [t["target"] for t in report["targets"]]
    targets = [t for t in every_target if not t.startswith("PostgreSQL")]
    assert sum("floor's throughput" in t for t in targets) == 4
    assert sum(t.startswith("scenario 6") for t in targets) == 2
    # Scenario 9: pages, search against LIKE, fork against the floor, and their plans.
    find = report["find"]
    assert all(stats["median_us"] > 0 for stats in find["stats"].values())
    assert any(name.startswith("SQLite LIKE") for name in find["stats"])
    assert sum(t.startswith("scenario 9") for t in targets) >= 6
    plans = find["plans"]
    assert "idx_sessions_agent_updated" in " ".join(
        plans["page_sessions(agent_id=..., cursor=...)"]
    )
    assert "messages_fts VIRTUAL TABLE" in " ".join(plans["search_messages(query)"])
    # Scenario 10: the OpenAI Agents SDK's Session interface, ours against SQLiteSession;
    # ADK's BaseSessionService, ours against DatabaseSessionService and
    # SqliteSessionService (targets against DatabaseSessionService only).
    frameworks = report["frameworks"]["stats"]
    assert len(frameworks) == 4 + 3 * 3
    assert all(stats["median_us"] > 0 for stats in frameworks.values())
    assert sum(t.startswith("scenario 10: OpenAI") for t in targets) == 2
    assert sum(t.startswith("scenario 10: ADK") for t in targets) == 2
    assert "| 1. append one message per transaction |" in completed.stdout
    # The PostgreSQL half: measured on the test server, else said loudly.
    if POSTGRES:
        check_postgresql_half(report, every_target)
    else:
        assert report["postgresql"] == {"skipped": "not measured: set AISOPOD_BENCH_POSTGRES_URL"}
        assert "PostgreSQL half: not measured: set AISOPOD_BENCH_POSTGRES_URL" in completed.stdout
