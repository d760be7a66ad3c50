"""A smoke run of `make bench` at the smallest scale: the benchmark code works and writes
complete results. Timings are not checked here (benchmarks are not tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmark_runs_every_scenario_and_reports_every_target(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    command = [sys.executable, "-m", "benchmarks.bench", "--no-peers", "--no-docs"]
    completed = subprocess.run(
        [*command, "--results", str(results)],
        cwd=ROOT,
        env={**os.environ, "AISOPOD_BENCH_SCALE": "0.001"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
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
    targets = [t["target"] for t in report["targets"]]
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
