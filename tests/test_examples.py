"""examples/fastapi_gateway.py, driven over HTTP: FastAPI's TestClient (httpx2) runs the
app with its lifespan on a real event loop, on a real database file."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient

from aisopod_session import SessionRepository, open_database

EXAMPLE = Path(__file__).parent.parent / "examples" / "fastapi_gateway.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastapi_gateway", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: FastAPI resolves annotations there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gateway(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("AISOPOD_SESSION_DB", str(db_path))
    return load_example()


@pytest.fixture
def client(gateway: ModuleType) -> Iterator[TestClient]:
    with TestClient(gateway.app) as client:  # runs the lifespan: opens the store
        yield client


def inbound(peer: str, content: str, **more: Any) -> dict[str, Any]:
    return {
        "channel": "telegram",
        "account_id": "bot-1",
        "peer_kind": "dm",
        "peer_id": peer,
        "content": content,
        **more,
    }


def test_messages_are_recorded_and_served_back_in_pages(client: TestClient, db_path: Path) -> None:
    answers = []
    for n in range(5):
        role = "user" if n % 2 == 0 else "assistant"
        response = client.post(
            "/agents/support/messages", json=inbound("42", f"m{n}", role=role, tokens=2)
        )
        assert response.status_code == 201, response.text
        answers.append(response.json())
    client.post("/agents/support/messages", json=inbound("43", "someone else"))

    session_id = answers[0]["session_id"]
    assert {a["session_id"] for a in answers} == {session_id}
    assert [a["message_count"] for a in answers] == [1, 2, 3, 4, 5]
    assert answers[-1]["token_usage"] == 10
    assert answers[1]["message"]["role"] == "assistant"

    listed = client.get("/agents/support/sessions").json()
    assert [s["peer_id"] for s in listed] == ["43", "42"]  # most recently active first

    newest = client.get(f"/agents/support/sessions/{session_id}/messages?limit=2").json()
    assert [m["content"] for m in newest] == ["m3", "m4"]
    older = client.get(
        f"/agents/support/sessions/{session_id}/messages?limit=2&before_id={newest[0]['id']}"
    ).json()
    assert [m["content"] for m in older] == ["m1", "m2"]
    every = client.get(f"/agents/support/sessions/{session_id}/messages").json()
    assert [m["id"] for m in every] == [a["message"]["id"] for a in answers]

    # What was served is what the store holds.
    engine = open_database(db_path)
    try:
        stored = SessionRepository(engine).get_by_id(session_id)
        assert stored is not None
        assert stored.message_count == 5
    finally:
        engine.dispose()


def test_an_agent_sees_only_its_own_sessions(client: TestClient) -> None:
    mine = client.post("/agents/support/messages", json=inbound("42", "hi")).json()
    theirs = client.get(f"/agents/sales/sessions/{mine['session_id']}/messages")
    assert theirs.status_code == 404
    assert client.get("/agents/sales/sessions").json() == []
    assert client.get("/agents/support/sessions/999/messages").status_code == 404


def test_bad_input_is_refused_naming_the_field(client: TestClient) -> None:
    response = client.post("/agents/support/messages", json=inbound("42", "hi", channel="  "))
    assert response.status_code == 422
    assert "channel" in response.json()["detail"]
    response = client.post("/agents/support/messages", json=inbound("42", "hi", tokens=-1))
    assert response.status_code == 422
    assert client.get("/agents/support/sessions").json() == []  # nothing was written


def test_concurrent_requests_are_all_recorded(gateway: ModuleType) -> None:
    async def main() -> list[dict[str, Any]]:
        app = gateway.app
        async with app.router.lifespan_context(app):
            transport = httpx2.ASGITransport(app=app)
            async with httpx2.AsyncClient(transport=transport, base_url="http://gw") as http:
                responses = await asyncio.gather(
                    *(
                        http.post("/agents/support/messages", json=inbound("42", f"m{n}"))
                        for n in range(100)
                    )
                )
                assert all(r.status_code == 201 for r in responses)
                session_id = responses[0].json()["session_id"]
                served = await http.get(f"/agents/support/sessions/{session_id}/messages")
                return list(served.json())

    messages = asyncio.run(main())
    assert len(messages) == 100
    assert sorted(m["content"] for m in messages) == sorted(f"m{n}" for n in range(100))
    assert len({m["id"] for m in messages}) == 100


def test_content_blocks_metadata_and_the_token_split_go_through_the_api(
    client: TestClient,
) -> None:
    """Content blocks, tool calls of any shape and message metadata are stored and
    served back as the JSON the adapter sent; input and output tokens add up."""
    blocks = [{"type": "text", "text": "look"}, {"type": "image", "url": "https://x/y.png"}]
    body = {
        **inbound("44", "ignored"),
        "content": blocks,
        "tool_calls": {"tool": "search", "args": {"q": "é"}},
        "meta": {"model": "m-1"},
        "input_tokens": 7,
        "output_tokens": 5,
    }
    answer = client.post("/agents/support/messages", json=body)
    assert answer.status_code == 201, answer.text
    recorded = answer.json()
    assert recorded["token_usage"] == 12
    assert recorded["message"]["content"] == blocks
    served = client.get(f"/agents/support/sessions/{recorded['session_id']}/messages").json()
    assert [(m["content"], m["tool_calls"], m["meta"]) for m in served] == [
        (blocks, {"tool": "search", "args": {"q": "é"}}, {"model": "m-1"})
    ]
    text = client.post("/agents/support/messages", json=inbound("44", "123")).json()
    assert text["message"]["content"] == "123"
