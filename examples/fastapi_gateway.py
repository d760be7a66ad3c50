"""A small chat gateway on FastAPI with the asyncio session store.

Channel adapters POST the chat messages they receive; the gateway records each one in
its conversation's session and answers with the message as stored. Agents (or an
operator's UI) read a session's history back, page by page. The repository reaches the
handlers through FastAPI's dependency system, confined to the agent named in the path,
so one agent's handler cannot touch another agent's sessions.

Run it (the store is `AISOPOD_SESSION_DB`, default `./gateway-sessions.db`; a
`postgresql://` URL works too) from the checkout, whose `make venv` installs FastAPI and
uvicorn with the other development tools:

    make venv && .venv/bin/uvicorn examples.fastapi_gateway:app

or in an environment of your own that has aisopod-session: `pip install fastapi uvicorn`
there (in a venv made by uv, which has no pip: `uv pip install fastapi uvicorn`), then
`uvicorn examples.fastapi_gateway:app` in the checkout.

    curl -X POST localhost:8000/agents/support/messages -H 'content-type: application/json' \\
        -d '{"channel": "telegram", "account_id": "bot-1", "peer_kind": "dm",
             "peer_id": "42", "role": "user", "content": "hello"}'
    curl localhost:8000/agents/support/sessions/1/messages?limit=20
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from aisopod_session import (
    AccessDeniedError,
    AsyncSessionRepository,
    DatabaseBusyError,
    JSONValue,
    Message,
    PeerKind,
    Role,
    Session,
    SessionKey,
    SessionNotFoundError,
    open_async_database,
)

DATABASE_ENV = "AISOPOD_SESSION_DB"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open (and migrate) the store once at start-up; close its pool at shutdown."""
    engine = await open_async_database(os.environ.get(DATABASE_ENV, "gateway-sessions.db"))
    app.state.repository = AsyncSessionRepository(engine)
    try:
        yield
    finally:
        await engine.dispose()


app = FastAPI(title="aisopod gateway (example)", lifespan=lifespan)


async def store(request: Request) -> AsyncSessionRepository:
    """The application's repository (the admin view, over every agent)."""
    repository: AsyncSessionRepository = request.app.state.repository
    return repository


async def agent_store(
    agent_id: str, repository: Annotated[AsyncSessionRepository, Depends(store)]
) -> AsyncSessionRepository:
    """The repository confined to the agent named in the path."""
    return repository.for_agent(agent_id)


AgentStore = Annotated[AsyncSessionRepository, Depends(agent_store)]


class Inbound(BaseModel):
    """A chat message as a channel adapter hands it over."""

    channel: str
    account_id: str
    peer_kind: PeerKind
    peer_id: str
    role: Role = Role.USER
    content: JSONValue  # text, or content blocks as the model API gives them
    tool_calls: JSONValue = None
    meta: dict[str, Any] | None = None
    tokens: int = Field(default=0, ge=0)
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)


class Recorded(BaseModel):
    """What the gateway answers: the stored message and its session's counters."""

    session_id: int
    message: Message
    message_count: int
    token_usage: int


@app.post("/agents/{agent_id}/messages", status_code=201)
async def receive(agent_id: str, inbound: Inbound, repository: AgentStore) -> Recorded:
    """Record a message in its conversation, creating the session on first contact."""
    key = SessionKey(
        agent_id, inbound.channel, inbound.account_id, inbound.peer_kind, inbound.peer_id
    )
    await repository.get_or_create(key)
    message = await repository.append_message(
        key,
        inbound.role,
        inbound.content,
        tool_calls=inbound.tool_calls,
        meta=inbound.meta,
        tokens=inbound.tokens,
        input_tokens=inbound.input_tokens,
        output_tokens=inbound.output_tokens,
    )
    session = await repository.get(key)
    assert session is not None
    assert session.id is not None
    return Recorded(
        session_id=session.id,
        message=message,
        message_count=session.message_count,
        token_usage=session.token_usage,
    )


@app.get("/agents/{agent_id}/sessions")
async def sessions(
    repository: AgentStore,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[Session]:
    """The agent's sessions, most recently active first."""
    return await repository.list_sessions(limit=limit, offset=offset)


@app.get("/agents/{agent_id}/sessions/{session_id}/messages")
async def history(
    session_id: int,
    repository: AgentStore,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    before_id: int | None = None,
) -> list[Message]:
    """A session's messages in order: all of them, or the newest `limit` before
    `before_id` (page back by passing the first id you got)."""
    session = await repository.get_by_id(session_id)
    if session is None:  # also another agent's session: not theirs to see
        raise HTTPException(status_code=404, detail=f"no session {session_id}")
    return await repository.get_history(session.key, limit=limit, before_id=before_id)


# The store's errors, as HTTP answers. (Invalid input is a ValueError naming the field.)


@app.exception_handler(ValueError)
async def invalid(request: Request, exc: ValueError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": str(exc)})


@app.exception_handler(SessionNotFoundError)
async def not_found(request: Request, exc: SessionNotFoundError) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": str(exc)})


@app.exception_handler(AccessDeniedError)
async def denied(request: Request, exc: AccessDeniedError) -> JSONResponse:
    return JSONResponse(status_code=403, content={"detail": str(exc)})


@app.exception_handler(DatabaseBusyError)
async def busy(request: Request, exc: DatabaseBusyError) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": str(exc)}, headers={"Retry-After": "1"})
