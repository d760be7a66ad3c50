"""The Google ADK adapter (`AisopodSessionService`): ADK's `BaseSessionService` contract on
SQLite and PostgreSQL, over both repositories, under ADK's own `Runner` with a scripted
model (no network), from several threads and event loops."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
from google.adk.agents import LlmAgent
from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError as AdkNotFound
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.sessions.base_session_service import BaseSessionService, GetSessionConfig
from google.adk.sessions.session import Session as AdkSession
from google.genai import types
from pydantic import Field
from sqlalchemy import Engine
from typer.testing import CliRunner

from aisopod_session import (
    AsyncSessionRepository,
    Role,
    SessionRepository,
    open_async_database_sync,
)
from aisopod_session.cli import app
from aisopod_session.integrations.adk import (
    AisopodSessionService,
    app_state_key,
    session_key,
    user_state_key,
)
from tests.dbtools import python_clock, snapshot

APP = "weather app"
USER = "user:42@example.com"


@pytest.fixture(params=["sync", "async"])
def service(
    request: pytest.FixtureRequest, store: Engine, store_url: str
) -> Iterator[AisopodSessionService]:
    """The service on a `SessionRepository` over `store`, or on an
    `AsyncSessionRepository` on its database."""
    if request.param == "sync":
        yield AisopodSessionService(SessionRepository(store))
        return
    engine = open_async_database_sync(store_url, clock=python_clock)
    try:
        yield AisopodSessionService(AsyncSessionRepository(engine))
    finally:
        engine.sync_engine.dispose(close=False)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def event(
    author: str = "agent",
    *,
    text: str | None = "hello",
    delta: dict[str, Any] | None = None,
    timestamp: float | None = None,
    **fields: Any,
) -> Event:
    content = None
    if text is not None:
        content = types.Content(
            role="user" if author == "user" else "model", parts=[types.Part(text=text)]
        )
    values: dict[str, Any] = {
        "author": author,
        "invocation_id": "inv-1",
        "content": content,
        "actions": EventActions(state_delta=delta or {}),
        **fields,
    }
    if timestamp is not None:
        values["timestamp"] = timestamp
    return Event(**values)


RICH_EVENTS = [
    event("user", text="What is the weather in Oslo? 🌧"),
    Event(
        author="weather_agent",
        invocation_id="inv-1",
        content=types.Content(
            role="model",
            parts=[
                types.Part(
                    function_call=types.FunctionCall(
                        id="call-1", name="get_weather", args={"city": "Oslo", "days": [1, 2.5]}
                    )
                )
            ],
        ),
        long_running_tool_ids={"call-1"},
    ),
    Event(
        author="weather_agent",
        invocation_id="inv-1",
        content=types.Content(
            role="user",
            parts=[
                types.Part(
                    function_response=types.FunctionResponse(
                        id="call-1", name="get_weather", response={"result": "rain", "c": 4}
                    )
                )
            ],
        ),
    ),
    Event(
        author="weather_agent",
        invocation_id="inv-1",
        branch="root.weather",
        content=types.Content(
            role="model",
            parts=[
                types.Part(text="Rain, 4 °C."),
                types.Part(inline_data=types.Blob(mime_type="image/png", data=bytes(range(256)))),
            ],
        ),
        actions=EventActions(state_delta={"last_city": "Oslo"}, artifact_delta={"map.png": 1}),
        custom_metadata={"trace": {"id": 7}},
        usage_metadata=types.GenerateContentResponseUsageMetadata(
            prompt_token_count=10, candidates_token_count=3
        ),
    ),
    Event(author="weather_agent", invocation_id="inv-1", actions=EventActions(escalate=True)),
]
"""Events of every shape a run stores: the user's text, a function call, its response,
text with bytes, state and artifact deltas, metadata, an event without content."""


def test_it_is_an_adk_session_service() -> None:
    assert issubclass(AisopodSessionService, BaseSessionService)


def test_events_round_trip_exactly_in_order(service: AisopodSessionService) -> None:
    async def go() -> tuple[AdkSession, AdkSession | None]:
        session = await service.create_session(app_name=APP, user_id=USER, session_id="s1")
        for item in RICH_EVENTS:
            await service.append_event(session, item.model_copy(deep=True))
        return session, await service.get_session(app_name=APP, user_id=USER, session_id="s1")

    session, read = run(go())
    assert read is not None
    assert read.events == RICH_EVENTS == session.events
    assert read.events[3].content is not None
    assert read.events[3].content.parts is not None
    assert read.events[3].content.parts[1].inline_data is not None
    assert read.events[3].content.parts[1].inline_data.data == bytes(range(256))
    assert read.state == {"last_city": "Oslo"}
    assert read.last_update_time == RICH_EVENTS[-1].timestamp == session.last_update_time


def test_each_event_is_one_message_with_a_role_and_its_parts(
    service: AisopodSessionService, store: Engine
) -> None:
    async def go() -> None:
        session = await service.create_session(app_name=APP, user_id=USER, session_id="s1")
        for item in RICH_EVENTS:
            await service.append_event(session, item.model_copy(deep=True))

    run(go())
    repo = SessionRepository(store)
    history = repo.get_history(session_key(APP, USER, "s1"))
    assert [m.role for m in history] == [
        Role.USER,
        Role.ASSISTANT,
        Role.TOOL,
        Role.ASSISTANT,
        Role.ASSISTANT,
    ]
    assert history[0].content == [{"text": "What is the weather in Oslo? 🌧"}]
    assert history[4].content is None
    assert all(m.meta["source"] == "google-adk" for m in history)
    assert [hit.message.id for hit in repo.search_messages("Oslo weather")] == [history[0].id]


def test_create_session_ids_state_and_duplicates(
    service: AisopodSessionService, store: Engine
) -> None:
    async def go() -> list[AdkSession]:
        return [
            await service.create_session(app_name=APP, user_id=USER, session_id="  padded  "),
            await service.create_session(app_name=APP, user_id=USER),
            await service.create_session(app_name=APP, user_id=USER, session_id="   "),
            await service.create_session(
                app_name=APP,
                user_id=USER,
                session_id="with-state",
                state={"a": 1, "app:theme": "dark", "user:lang": "nb", "temp:scratch": 1},
            ),
        ]

    padded, generated, blank, stated = run(go())
    assert padded.id == "padded"
    assert len(generated.id) == 36
    assert len(blank.id) == 36
    assert generated.id != blank.id
    assert stated.state == {"a": 1, "app:theme": "dark", "user:lang": "nb"}
    assert padded.state == {}  # created before the app and user state were
    assert padded.events == []
    before = snapshot(store)
    with pytest.raises(AlreadyExistsError):
        run(
            service.create_session(
                app_name=APP, user_id=USER, session_id="padded", state={"app:theme": "light"}
            )
        )
    assert snapshot(store) == before
    again = run(service.get_session(app_name=APP, user_id=USER, session_id=" padded"))
    assert again is not None
    assert again.state == {"app:theme": "dark", "user:lang": "nb"}
    assert run(service.get_user_state(app_name=APP, user_id=USER)) == {"lang": "nb"}


def test_get_session_config_is_answered_by_the_database(service: AisopodSessionService) -> None:
    base = 1_800_000_000.0
    events = [event(text=f"e{i}", timestamp=base + i) for i in range(250)]

    async def go(config: GetSessionConfig | None) -> list[str]:
        found = await service.get_session(
            app_name=APP, user_id=USER, session_id="s1", config=config
        )
        assert found is not None
        return [e.content.parts[0].text for e in found.events if e.content and e.content.parts]  # type: ignore[misc]

    async def fill() -> None:
        session = await service.create_session(app_name=APP, user_id=USER, session_id="s1")
        for item in events:
            await service.append_event(session, item)

    run(fill())
    names = [f"e{i}" for i in range(250)]
    assert run(go(None)) == names
    assert run(go(GetSessionConfig(num_recent_events=0))) == []
    assert run(go(GetSessionConfig(num_recent_events=3))) == names[-3:]
    assert run(go(GetSessionConfig(num_recent_events=1000))) == names
    assert run(go(GetSessionConfig(after_timestamp=base + 240))) == names[240:]
    assert run(go(GetSessionConfig(after_timestamp=base + 239.5))) == names[240:]
    assert run(go(GetSessionConfig(after_timestamp=base + 10))) == names[10:]
    assert run(go(GetSessionConfig(after_timestamp=base - 1))) == names
    assert run(go(GetSessionConfig(after_timestamp=base + 1000))) == []
    both = GetSessionConfig(num_recent_events=5, after_timestamp=base + 247)
    assert run(go(both)) == names[247:]
    assert run(go(GetSessionConfig(num_recent_events=2, after_timestamp=base))) == names[-2:]


def test_missing_sessions_and_names_no_key_can_hold(service: AisopodSessionService) -> None:
    async def go() -> None:
        assert await service.get_session(app_name=APP, user_id=USER, session_id="nope") is None
        assert await service.get_session(app_name=APP, user_id=USER, session_id="x" * 300) is None
        assert await service.get_session(app_name="x" * 300, user_id=USER, session_id="s") is None
        await service.delete_session(app_name=APP, user_id=USER, session_id="nope")
        assert await service.get_user_state(app_name=APP, user_id="nobody") == {}
        assert (await service.list_sessions(app_name="no app")).sessions == []
        with pytest.raises(ValueError, match="session_id"):
            await service.create_session(app_name=APP, user_id=USER, session_id="x" * 300)
        with pytest.raises(ValueError, match="app_name, user_id"):
            await service.create_session(app_name="a" * 200, user_id="u" * 100)
        with pytest.raises(ValueError, match="user_id"):
            await service.create_session(app_name=APP, user_id=42)  # type: ignore[arg-type]

    run(go())


def test_names_are_kept_exactly_and_never_collide(service: AisopodSessionService) -> None:
    names = [
        ("a:b", "c", "s"),
        ("a", "b:c", "s"),
        ("App", "u", "s"),
        ("app", "u", "s"),
        (" app", "u ", "s"),
        ("app", "U", "s"),
        ("app", "", "s:1"),
        ("", "u%3A", "s%1\t"),
        ("app\n", "ü\x00", "é"),
    ]

    async def go() -> list[tuple[str, str, str]]:
        for app_name, user_id, session_id in names:
            await service.create_session(
                app_name=app_name,
                user_id=user_id,
                session_id=session_id,
                state={"who": [app_name, user_id, session_id]},
            )
        found = []
        for app_name, user_id, session_id in names:
            session = await service.get_session(
                app_name=app_name, user_id=user_id, session_id=session_id
            )
            assert session is not None
            assert session.state == {"who": [app_name, user_id, session_id]}
            listed = await service.list_sessions(app_name=app_name)
            found += [(s.app_name, s.user_id, s.id) for s in listed.sessions]
        return found

    found = run(go())
    assert sorted(set(found)) == sorted((a, u, s.strip()) for a, u, s in names)


def test_list_sessions_oldest_update_first_with_merged_state(
    service: AisopodSessionService,
) -> None:
    async def go() -> tuple[list[tuple[str, str, float]], list[tuple[str, str]], AdkSession]:
        made = {}
        for user_id, session_id in [("bob", "b1"), ("alice", "a1"), ("alice", "a2"), ("bob", "b2")]:
            made[session_id] = await service.create_session(
                app_name=APP, user_id=user_id, session_id=session_id, state={"n": session_id}
            )
        await service.create_session(app_name="other", user_id="alice", session_id="o1")
        await service.append_event(made["a1"], event(delta={"app:x": 1, "user:y": 2}))
        everyone = await service.list_sessions(app_name=APP)
        alice = await service.list_sessions(app_name=APP, user_id="alice")
        assert all(s.events == [] for s in everyone.sessions)
        first = everyone.sessions[0]
        return (
            [(s.user_id, s.id, s.last_update_time) for s in everyone.sessions],
            [(s.user_id, s.id) for s in alice.sessions],
            first,
        )

    everyone, alice, first = run(go())
    assert [(u, s) for u, s, _ in everyone] == [
        ("bob", "b1"),
        ("alice", "a2"),
        ("bob", "b2"),
        ("alice", "a1"),
    ]
    assert [t for *_, t in everyone] == sorted(t for *_, t in everyone)
    assert alice == [("alice", "a2"), ("alice", "a1")]
    assert first.state == {"n": "b1", "app:x": 1}


def test_sessions_read_back_are_the_objects_adk_validation_makes(
    service: AisopodSessionService,
) -> None:
    """The sessions `get_session` and `list_sessions` return equal what ADK's own
    validation makes of the same values, field for field and type for type: names given
    as a `StrEnum` come back as plain strings."""

    class Names(StrEnum):
        APP = "enum-app"
        USER = "enum-user"

    async def go() -> list[AdkSession]:
        await service.create_session(
            app_name=Names.APP, user_id=Names.USER, session_id="s1", state={"n": [1]}
        )
        got = await service.get_session(app_name=Names.APP, user_id=Names.USER, session_id="s1")
        listed = await service.list_sessions(app_name=Names.APP, user_id=Names.USER)
        everyone = await service.list_sessions(app_name=Names.APP)
        assert got is not None
        return [got, *listed.sessions, *everyone.sessions]

    for found in run(go()):
        validated = AdkSession.model_validate(found.model_dump())
        assert found == validated
        assert found.model_dump_json(by_alias=True) == validated.model_dump_json(by_alias=True)
        assert found.model_fields_set == validated.model_fields_set
        for name in ("id", "app_name", "user_id"):
            assert type(getattr(found, name)) is str
        assert (found.app_name, found.user_id, found.state) == ("enum-app", "enum-user", {"n": [1]})


def test_append_event_state_rules(service: AisopodSessionService) -> None:
    async def go() -> None:
        one = await service.create_session(app_name=APP, user_id=USER, session_id="one")
        two = await service.create_session(app_name=APP, user_id=USER, session_id="two")
        other = await service.create_session(app_name=APP, user_id="someone", session_id="x")
        added = await service.append_event(
            one,
            event(delta={"k": 1, "app:a": "A", "user:u": "U", "temp:t": "T"}),
        )
        # temp: state is the running invocation's: in memory, never stored.
        assert one.state == {"k": 1, "app:a": "A", "user:u": "U", "temp:t": "T"}
        assert added.actions.state_delta == {"k": 1, "app:a": "A", "user:u": "U"}
        read = await service.get_session(app_name=APP, user_id=USER, session_id="one")
        assert read is not None
        assert read.state == {"k": 1, "app:a": "A", "user:u": "U"}
        assert read.events[0].actions.state_delta == {"k": 1, "app:a": "A", "user:u": "U"}
        seen_two = await service.get_session(app_name=APP, user_id=USER, session_id="two")
        seen_other = await service.get_session(app_name=APP, user_id="someone", session_id="x")
        assert seen_two is not None
        assert seen_other is not None
        assert seen_two.state == {"app:a": "A", "user:u": "U"}
        assert seen_other.state == {"app:a": "A"}
        assert await service.get_user_state(app_name=APP, user_id=USER) == {"u": "U"}
        # A partial event is neither stored nor applied.
        partial = event(delta={"k": 2}, partial=True)
        assert await service.append_event(two, partial) is partial
        assert two.events == []
        read_two = await service.get_session(app_name=APP, user_id=USER, session_id="two")
        assert read_two is not None
        assert read_two.events == []
        assert "k" not in read_two.state
        del other

    run(go())


def test_a_stale_session_is_refused_with_nothing_written(
    service: AisopodSessionService, store: Engine
) -> None:
    async def go() -> None:
        await service.create_session(app_name=APP, user_id=USER, session_id="s1")
        first = await service.get_session(app_name=APP, user_id=USER, session_id="s1")
        second = await service.get_session(app_name=APP, user_id=USER, session_id="s1")
        assert first is not None
        assert second is not None
        await service.append_event(first, event(text="from first", timestamp=time.time() + 1))
        await service.append_event(first, event(text="first again", timestamp=time.time() + 2))
        before = snapshot(store)
        with pytest.raises(StaleSessionError):
            await service.append_event(second, event(text="from second", delta={"user:z": 1}))
        assert snapshot(store) == before
        assert second.events == []
        gone = AdkSession(id="gone", app_name=APP, user_id=USER)
        with pytest.raises(AdkNotFound):
            await service.append_event(gone, event())

    run(go())


def test_tasks_appending_to_one_session_object_take_turns(
    service: AisopodSessionService,
) -> None:
    """Tasks appending to the same session object at once are not stale to each other
    (ADK's own services lock each session): every event and every state key is kept,
    in the order the tasks started."""

    async def go() -> None:
        session = await service.create_session(app_name=APP, user_id=USER, session_id="s1")
        events = [event(text=f"t{n}", delta={f"k{n}": n, f"user:u{n}": n}) for n in range(12)]
        await asyncio.gather(*(service.append_event(session, e) for e in events))
        stored = await service.get_session(app_name=APP, user_id=USER, session_id="s1")
        assert stored is not None
        assert [e.id for e in stored.events] == [e.id for e in events]
        assert stored.state == session.state
        assert {name: stored.state[name] for name in ("k0", "k11", "user:u0", "user:u11")} == {
            "k0": 0,
            "k11": 11,
            "user:u0": 0,
            "user:u11": 11,
        }
        assert service._appending == {}  # no lock is left behind

    run(go())


def test_delete_removes_the_session_and_its_events_only(
    service: AisopodSessionService, store: Engine
) -> None:
    async def go() -> None:
        session = await service.create_session(
            app_name=APP, user_id=USER, session_id="s1", state={"user:kept": True}
        )
        await service.append_event(session, event())
        await service.delete_session(app_name=APP, user_id=USER, session_id="s1")
        assert await service.get_session(app_name=APP, user_id=USER, session_id="s1") is None
        assert await service.get_user_state(app_name=APP, user_id=USER) == {"kept": True}

    run(go())
    assert SessionRepository(store).get(session_key(APP, USER, "s1")) is None
    assert SessionRepository(store).get(user_state_key(APP, USER)) is not None
    assert SessionRepository(store).get(app_state_key(APP)) is not None


def test_concurrent_appends_from_threads_and_loops_lose_no_state(
    service: AisopodSessionService,
) -> None:
    """Eight threads, each with its own event loop and session of one user, each adding
    its own user-state key and app-state key: every event and every key is kept."""
    run(service.create_session(app_name=APP, user_id=USER, session_id="setup"))

    def worker(index: int) -> None:
        async def go() -> None:
            session = await service.create_session(
                app_name=APP, user_id=USER, session_id=f"t{index}"
            )
            for turn in range(5):
                await service.append_event(
                    session,
                    event(
                        text=f"{index}-{turn}",
                        delta={f"user:k{index}": turn, f"app:a{index}": turn},
                    ),
                )

        asyncio.run(go())

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    async def check() -> None:
        assert await service.get_user_state(app_name=APP, user_id=USER) == {
            f"k{index}": 4 for index in range(8)
        }
        for index in range(8):
            session = await service.get_session(app_name=APP, user_id=USER, session_id=f"t{index}")
            assert session is not None
            assert len(session.events) == 5
            assert session.state[f"app:a{index}"] == 4

    run(check())


class ScriptedLlm(BaseLlm):
    """A model that answers from a script: a function call, then text (no network)."""

    script: list[LlmResponse] = Field(default_factory=list)

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        yield self.script.pop(0)


def get_weather(city: str) -> dict[str, str]:
    """The weather in a city."""
    return {"city": city, "weather": "rain"}


def test_under_adks_runner_with_tools_over_several_turns(
    service: AisopodSessionService, store: Engine
) -> None:
    script = [
        LlmResponse(
            content=types.Content(
                role="model",
                parts=[
                    types.Part(
                        function_call=types.FunctionCall(name="get_weather", args={"city": "Oslo"})
                    )
                ],
            )
        ),
        LlmResponse(content=types.Content(role="model", parts=[types.Part(text="It rains.")])),
        LlmResponse(content=types.Content(role="model", parts=[types.Part(text="Still rain.")])),
    ]
    agent = LlmAgent(
        name="weather",
        model=ScriptedLlm(model="scripted", script=script),
        tools=[get_weather],
        output_key="last_answer",
    )
    runner = Runner(app_name=APP, agent=agent, session_service=service)

    async def go() -> AdkSession | None:
        await service.create_session(app_name=APP, user_id=USER, session_id="run-1")
        for question in ("Weather in Oslo?", "And now?"):
            async for _ in runner.run_async(
                user_id=USER,
                session_id="run-1",
                new_message=types.Content(role="user", parts=[types.Part(text=question)]),
            ):
                pass
        return await service.get_session(app_name=APP, user_id=USER, session_id="run-1")

    session = run(go())
    assert session is not None
    texts = [
        part.text
        or (part.function_call and part.function_call.name)
        or (part.function_response and part.function_response.name)
        for e in session.events
        if e.content and e.content.parts
        for part in e.content.parts
    ]
    assert texts == [
        "Weather in Oslo?",
        "get_weather",
        "get_weather",
        "It rains.",
        "And now?",
        "Still rain.",
    ]
    assert session.state["last_answer"] == "Still rain."
    history = SessionRepository(store).get_history(session_key(APP, USER, "run-1"))
    assert [m.role for m in history][:4] == [Role.USER, Role.ASSISTANT, Role.TOOL, Role.ASSISTANT]


def test_open_close_and_the_cli_sees_adk_sessions(tmp_path: Path) -> None:
    path = tmp_path / "adk.db"
    service = AisopodSessionService.open(path)

    async def go() -> None:
        session = await service.create_session(app_name=APP, user_id=USER, session_id="s1")
        await service.append_event(session, event("user", text="Visible in the CLI"))

    run(go())
    service.close()
    run(_await(service.close()))  # as ADK's own services' close is awaited
    with pytest.raises(RuntimeError, match="closed"):
        run(service.get_session(app_name=APP, user_id=USER, session_id="s1"))
    key = session_key(APP, USER, "s1")
    listed = CliRunner().invoke(app, ["sessions", "list", "--db", str(path), "--channel", "adk"])
    assert listed.exit_code == 0, listed.output
    assert "s1" in listed.output
    shown = CliRunner().invoke(app, ["sessions", "show", "--db", str(path), str(key)])
    assert shown.exit_code == 0, shown.output
    assert "Visible in the CLI" in shown.output


async def _await(awaitable: Any) -> None:
    await awaitable


def test_async_with_closes_the_store_it_opened(tmp_path: Path) -> None:
    async def go() -> AisopodSessionService:
        async with AisopodSessionService.open(tmp_path / "adk.db") as service:
            await service.create_session(app_name=APP, user_id=USER, session_id="s1")
        return service

    service = run(go())
    with pytest.raises(RuntimeError, match="closed"):
        run(service.list_sessions(app_name=APP))


def test_constructor_refusals(store: Engine) -> None:
    with pytest.raises(TypeError, match="repository"):
        AisopodSessionService(store)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="agent_id"):
        AisopodSessionService(SessionRepository(store), agent_id="bad\x00agent")
    confined = SessionRepository(store).for_agent("gateway")
    assert AisopodSessionService(confined).agent_id == "gateway"
    with pytest.raises(ValueError, match="agent_id"):
        AisopodSessionService(confined, agent_id="other")


def test_a_cancelled_append_leaves_the_copy_in_step_with_the_store(
    service: AisopodSessionService,
) -> None:
    """Cancelled while its write runs (on a worker thread with `SessionRepository`, where
    the write commits anyway): the copy gets every event the store holds."""

    async def go() -> tuple[int, int, int]:
        session = await service.create_session(app_name=APP, user_id=USER, session_id="c")
        cancelled = 0
        for number in range(20):
            task = asyncio.ensure_future(service.append_event(session, event(text=f"e{number}")))
            await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                cancelled += 1
        stored = await service.get_session(app_name=APP, user_id=USER, session_id="c")
        assert stored is not None
        assert [e.id for e in stored.events] == [e.id for e in session.events]
        return cancelled, len(stored.events), len(session.events)

    cancelled, stored, held = run(go())
    assert stored == held
    assert cancelled + stored >= 20  # each either stored, or cancelled before its write


def test_refusals_name_the_argument_and_names_with_nul_list(
    service: AisopodSessionService, store: Engine
) -> None:
    async def go() -> None:
        session = await service.create_session(app_name="a\x00", user_id="u", session_id="s")
        listed = await service.list_sessions(app_name="a\x00")
        assert [(s.user_id, s.id) for s in listed.sessions] == [("u", "s")]
        before = snapshot(store)
        with pytest.raises(ValueError, match=r"^state: "):
            await service.create_session(app_name=APP, user_id=USER, state={"k": float("nan")})
        with pytest.raises(ValueError, match=r"^state key"):
            await service.create_session(app_name=APP, user_id=USER, state={"\ud800": 1})
        with pytest.raises(ValueError, match=r"^app_name: holds a lone surrogate"):
            await service.create_session(app_name="\ud800", user_id=USER)
        with pytest.raises(ValueError, match=r"^event: "):
            await service.append_event(session, event(delta={"k": float("inf")}))
        # Values JSON holds but the store does not: named where the event holds them.
        refused: list[tuple[Event, str]] = [
            (
                event(delta={"app:k": 2**70}),
                r"^event: the integer at event\.actions\.state_delta\.app:k does not fit",
            ),
            (
                event(delta={"k": 2**70}),
                r"^event: the integer at event\.actions\.state_delta\.k does not fit",
            ),
            (
                Event(
                    author="agent",
                    invocation_id="i",
                    content=types.Content(
                        role="model",
                        parts=[
                            types.Part(
                                function_call=types.FunctionCall(name="f", args={"n": 2**64})
                            )
                        ],
                    ),
                ),
                r"^event: the integer at event\.content\.parts\[0\]\.function_call\.args\.n",
            ),
            (
                event(custom_metadata={"d": _nested(63)}),
                r"^event: nested deeper than 64 levels at event\.custom_metadata\.d",
            ),
        ]
        for refused_event, reason in refused:
            with pytest.raises(ValueError, match=reason) as raised:
                await service.append_event(session, refused_event)
            assert type(raised.value) is ValueError
        with pytest.raises(ValueError, match=r"^state: the integer at state\.app:k does not fit"):
            await service.create_session(app_name=APP, user_id=USER, state={"app:k": -(2**64)})
        assert snapshot(store) == before
        if store.dialect.name != "postgresql":
            return  # SQLite stores NUL characters
        # What only PostgreSQL refuses, a NUL character, is named in ADK's terms too.
        nul: list[tuple[Event, str]] = [
            (event(delta={"k": ["ok", "a\x00"]}), r"event\.actions\.state_delta\.k\[1\]"),
            (event(delta={"user:k": "\x00"}), r"event\.actions\.state_delta\.user:k"),
            (event(text="a\x00b"), r"event\.content\.parts\[0\]\.text"),
        ]
        for refused_event, place in nul:
            with pytest.raises(ValueError, match=rf"^event: the text at {place} holds a NUL"):
                await service.append_event(session, refused_event)
        assert snapshot(store) == before
        # State is metadata, JSON text that holds the escape `\u0000`: stored there too.
        made = await service.create_session(app_name=APP, user_id=USER, state={"app:k": "\x00"})
        assert made.state == {"app:k": "\x00"}
        assert session.events == []

    run(go())
    with pytest.raises(ValueError, match="agent_id"):
        AisopodSessionService(SessionRepository(store), agent_id="")


def _nested(levels: int) -> Any:
    """A list nested `levels` deep."""
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value
