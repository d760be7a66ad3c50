"""Agent isolation: `repo.for_agent(agent)` confines every call to that agent's sessions;
the unscoped repository is the admin view of every agent."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine

from aisopod_session import (
    AccessDeniedError,
    NewMessage,
    Role,
    SessionFilter,
    SessionKey,
    SessionRepository,
    SessionStatus,
    SessionStoreError,
)
from tests.dbtools import before_io, no_statements, snapshot


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """Every test of this module runs on SQLite and on PostgreSQL (see conftest), but
    refusals made before any I/O, on SQLite alone (`dbtools.before_io`)."""
    return store_repo


MINE = SessionKey("agent-1", "telegram", "bot-A", "dm", "User-42")
THEIRS = SessionKey("agent-2", "telegram", "bot-A", "dm", "User-42")
ADMIN = SessionKey("admin", "slack", "T01", "channel", "C1")

Call = Callable[[SessionRepository, SessionKey | str], object]

KEYED_CALLS: dict[str, Call] = {
    "get_or_create": lambda r, k: r.get_or_create(k),
    "get": lambda r, k: r.get(k),
    "update_metadata": lambda r, k: r.update_metadata(k, {"x": 1}),
    "update_metadata replace": lambda r, k: r.update_metadata(k, {}, replace=True),
    "set_status": lambda r, k: r.set_status(k, SessionStatus.ARCHIVED),
    "delete": lambda r, k: r.delete(k),
    "append_message": lambda r, k: r.append_message(k, Role.USER, "hi", tokens=3),
    "append_messages": lambda r, k: r.append_messages(k, [NewMessage("user", "a")] * 2),
    "replace_messages": lambda r, k: r.replace_messages(k, [NewMessage("user", "b")]),
    "get_history": lambda r, k: r.get_history(k),
    "get_history paged": lambda r, k: r.get_history(k, limit=1, before_id=10**6),
}


@pytest.fixture
def admin(repo: SessionRepository) -> SessionRepository:
    """The unscoped repository over a store holding sessions of three agents."""
    for key in (MINE, THEIRS, ADMIN):
        repo.get_or_create(key)
        repo.append_message(key, Role.USER, f"said to {key.agent_id}", tokens=1)
    return repo


@pytest.mark.parametrize("method", list(KEYED_CALLS))
@pytest.mark.parametrize("as_text", [False, True], ids=["key", "text"])
def test_every_keyed_call_with_another_agents_key_is_denied_and_changes_nothing(
    admin: SessionRepository, store: Engine, method: str, as_text: bool
) -> None:
    scoped = admin.for_agent("agent-1")
    before = snapshot(store)
    key: SessionKey | str = THEIRS.canonical() if as_text else THEIRS
    with pytest.raises(AccessDeniedError, match="agent-2"):
        KEYED_CALLS[method](scoped, key)
    assert snapshot(store) == before


@pytest.mark.parametrize("method", list(KEYED_CALLS))
def test_a_key_of_an_agent_with_no_sessions_is_denied_too(
    admin: SessionRepository, store: Engine, method: str
) -> None:
    scoped = admin.for_agent("agent-1")
    before = snapshot(store)
    with pytest.raises(AccessDeniedError):
        KEYED_CALLS[method](scoped, SessionKey("agent-9", "telegram", "b", "dm", "p"))
    assert snapshot(store) == before


def test_access_denied_is_a_session_store_error() -> None:
    assert issubclass(AccessDeniedError, SessionStoreError)


@pytest.mark.parametrize("method", list(KEYED_CALLS))
def test_every_keyed_call_with_the_agents_own_key_works(
    admin: SessionRepository, method: str
) -> None:
    KEYED_CALLS[method](admin.for_agent("agent-1"), MINE)


def test_scoped_writes_land_in_the_shared_store(admin: SessionRepository) -> None:
    scoped = admin.for_agent("agent-1")
    scoped.append_message(MINE, Role.ASSISTANT, "reply", tokens=5)
    session = admin.get(MINE)
    assert session is not None
    assert (session.message_count, session.token_usage) == (2, 6)
    assert [m.content for m in admin.get_history(MINE)] == ["said to agent-1", "reply"]


FILTERS: list[SessionFilter | dict[str, object] | None] = [
    None,
    {},
    {"agent_id": "agent-2"},
    {"agent_id": "admin"},
    {"agent_id": "agent-1"},
    {"channel": "telegram"},
    {"channel": "slack"},
    {"peer_id": "User-42"},
    {"status": "active"},
    SessionFilter(agent_id="agent-2", channel="telegram"),
]


@pytest.mark.parametrize("spec", FILTERS)
def test_listing_and_counting_see_only_the_agents_sessions_whatever_the_filter(
    admin: SessionRepository, spec: SessionFilter | dict[str, object] | None
) -> None:
    for agent in ("agent-1", "agent-2", "admin"):
        scoped = admin.for_agent(agent)
        listed = scoped.list_sessions(spec, limit=1000)
        assert {s.agent_id for s in listed} <= {agent}
        assert scoped.count_sessions(spec) == len(listed)
        # The agent's own sessions under the same filter: what the admin view lists for it.
        expected = [s for s in admin.list_sessions(spec, limit=1000) if s.agent_id == agent]
        assert [s.id for s in listed] == [s.id for s in expected]


def test_the_admin_view_sees_every_agent(admin: SessionRepository) -> None:
    # The Rust crate's admin CLI only saw an agent literally called "admin".
    assert {s.agent_id for s in admin.list_sessions()} == {"agent-1", "agent-2", "admin"}
    assert admin.count_sessions() == 3
    assert admin.agent_id is None
    only_admin = admin.for_agent("admin")
    assert [s.key for s in only_admin.list_sessions()] == [ADMIN]
    with pytest.raises(AccessDeniedError):
        only_admin.get_history(MINE)


def test_get_by_id_hides_other_agents_sessions(admin: SessionRepository) -> None:
    mine, theirs = admin.get(MINE), admin.get(THEIRS)
    assert mine is not None
    assert theirs is not None
    assert mine.id
    assert theirs.id
    scoped = admin.for_agent("agent-1")
    assert scoped.get_by_id(theirs.id) is None
    found = scoped.get_by_id(mine.id)
    assert found is not None
    assert found.key == MINE
    assert admin.get_by_id(theirs.id) is not None


def test_agent_id_is_normalised_like_a_key_part(admin: SessionRepository) -> None:
    scoped = admin.for_agent("  Agent-1 ")
    assert scoped.agent_id == "agent-1"
    assert scoped.get(MINE) is not None


@before_io
@pytest.mark.parametrize("bad", ["", "  ", "a\x00", "x" * 256, 7, None])
def test_a_bad_agent_id_is_refused_naming_it(admin: SessionRepository, bad: object) -> None:
    with pytest.raises(ValueError, match="agent_id"), no_statements():
        admin.for_agent(bad)  # type: ignore[arg-type]


def test_a_confined_repository_cannot_widen_itself(admin: SessionRepository) -> None:
    scoped = admin.for_agent("agent-1")
    assert scoped.for_agent("AGENT-1").agent_id == "agent-1"
    with pytest.raises(AccessDeniedError, match="agent-1"):
        scoped.for_agent("agent-2")
    # Scoping returns a new repository; the admin view stays unscoped.
    assert admin.agent_id is None
    assert admin.count_sessions() == 3
