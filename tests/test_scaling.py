"""The shard router of benchmarks/scaling.py (docs/scaling.md), on two SQLite stores: an
agent's calls reach one store, always the same one, and listings across agents merge."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from benchmarks.scaling import BUCKETS, ShardRouter, bucket_of

from aisopod_session import AccessDeniedError, open_database


def test_an_agents_bucket_is_stable_across_processes_and_spellings() -> None:
    # A constant, not a second call: hash() would agree within this process and differ
    # in the next one; BLAKE2b must not.
    assert bucket_of("support") == 4
    assert bucket_of("  Support\t") == bucket_of("support")
    with pytest.raises(ValueError, match="agent_id"):
        bucket_of("")


def test_agents_spread_over_the_buckets_and_two_stores() -> None:
    buckets = Counter(bucket_of(f"agent-{n}") for n in range(2000))
    assert len(buckets) == BUCKETS
    halves = Counter(bucket % 2 for bucket in buckets.elements())
    assert 900 <= halves[0] <= 1100


def test_every_call_for_an_agent_reaches_its_store_only(tmp_path: Path) -> None:
    engines = [open_database(tmp_path / f"shard-{n}.db") for n in "ab"]
    try:
        router = ShardRouter(engines)
        keys = [f"agent-{n}:telegram:bot:dm:peer" for n in range(12)]
        for key in keys:
            repo = router.for_key(key)
            repo.get_or_create(key)
            repo.append_message(key, "user", f"hello from {key}")
        stored = [set(repo.summary().by_agent) for repo in router.repositories]
        assert all(stored), "both stores hold some agents"
        for index, agents in enumerate(stored):
            assert {router.shard_of(agent) for agent in agents} == {index}
        assert router.count_sessions() == len(keys)
        everything = sorted(
            (
                (index, session)
                for index, repo in enumerate(router.repositories)
                for session in repo.list_sessions()
            ),
            key=lambda item: (item[1].updated_at, item[0], item[1].id),
            reverse=True,
        )
        assert router.list_sessions(limit=5) == everything[:5]
        assert len(router.search_messages("hello", limit=50)) == len(keys)
        with pytest.raises(AccessDeniedError):
            router.for_agent("agent-1").get(keys[2])
    finally:
        for engine in engines:
            engine.dispose()
