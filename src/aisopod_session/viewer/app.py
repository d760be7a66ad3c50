"""The viewer's web app: status, sessions (filters, cursor pages), transcripts, search and
an export download, as server-rendered pages.

Read-only by construction: every route is a GET that calls the repository's read API
(`summary`, `page_sessions`, `get_by_id`, `get_history`, `search_messages`) or
`export_jsonl`, which reads one snapshot. Stored text is hostile (anyone who can message
the agent writes it): Jinja2 autoescapes everything, `render.visible` shows control
characters as escapes, and the Content-Security-Policy allows no script at all.
"""

from __future__ import annotations

import ipaddress
import secrets
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from pydantic import ValidationError
from sqlalchemy import Engine

from aisopod_session.cli import without_passwords
from aisopod_session.enums import PeerKind, Role, SessionStatus
from aisopod_session.errors import SessionNotFoundError, SessionStoreError
from aisopod_session.migrations import current_version
from aisopod_session.models import Session, SessionFilter
from aisopod_session.repository import SessionRepository
from aisopod_session.transfer import export_jsonl
from aisopod_session.viewer.render import (
    key_text,
    pretty_json,
    shown_message,
    size_text,
    snippet_parts,
    visible,
    when,
)

TOKEN_COOKIE = "aisopod_viewer_token"
"""The cookie that carries the token after the first request gave it as `?token=`
(named with the port, `aisopod_viewer_token_8765`: a browser sends a host's cookies to
every port of it, so two viewers on one host would otherwise replace each other's)."""
ERROR_CHARACTERS = 500
"""An error page quotes at most this much of the store's error message."""


def _cookie(request: Request) -> str:
    """The token cookie's name for the port the request was addressed to."""
    port = request.url.port or (443 if request.url.scheme == "https" else 80)
    return f"{TOKEN_COOKIE}_{port}"


FILTER_FIELDS = ("agent_id", "channel", "account_id", "peer_kind", "peer_id", "status")
TIME_FIELDS = ("updated_after", "updated_before")
SESSION_PAGE = 50
MESSAGE_PAGE = 200
FORKS_SHOWN = 10
"""A transcript lists this many of the session's forks, newest first, then links to all."""
SEARCH_LIMIT = 50
MAX_LIMIT = 1000

# No script, no frame, no form posting elsewhere: even a rendering mistake could not run
# stored text as code. The token may travel in the address: no Referer carries it away.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Handler = Callable[[Request], Awaitable[Response]]


class ViewerError(Exception):
    """A request the viewer refuses, with the HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) only listens on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(
    store: SessionRepository | Engine,
    *,
    token: str | None = None,
    title: str = "aisopod-session",
) -> FastAPI:
    """The viewer's ASGI app on `store` (a repository, whose agent confinement it keeps,
    or an engine at this code's schema version). It only reads.

    With `token`, every request must carry it (`?token=`, which also sets a cookie for
    the pages after, the cookie, or `Authorization: Bearer`), else it gets 401; without,
    anyone who reaches the port can read the store (serve on loopback only then).
    `ValueError` naming `token` for an empty one."""
    if token is not None and not token.strip():
        raise ValueError("token: must not be empty")
    repo = store if isinstance(store, SessionRepository) else SessionRepository(store)
    templates = Environment(
        loader=PackageLoader("aisopod_session.viewer", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    templates.filters["v"] = visible
    templates.filters["when"] = when
    templates.filters["json"] = pretty_json
    templates.filters["size"] = size_text
    templates.filters["key_text"] = key_text
    templates.globals["title"] = title
    templates.globals["nav"] = ""
    templates.globals["agent_scope"] = repo.agent_id
    css = files("aisopod_session.viewer").joinpath("static/viewer.css").read_text("utf-8")
    # No redirect of `/path/` to `/path`: Starlette would build it from the Host header.
    app = FastAPI(
        title=title, docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False
    )

    def page(name: str, code: int = 200, **context: Any) -> HTMLResponse:
        html = templates.get_template(name).render(**context)
        return HTMLResponse(html, status_code=code, headers=_HEADERS)

    @app.middleware("http")
    async def guard(request: Request, call_next: Handler) -> Response:
        given = request.query_params.get("token")
        if token is None and not is_loopback(_host_name(request.headers.get("host", ""))):
            # Without a token, only requests addressed to this machine by a loopback name:
            # a web page whose name was made to resolve to 127.0.0.1 (DNS rebinding)
            # must not read the store from the operator's browser.
            return page(
                "error.html",
                421,
                status=421,
                message="without a token this viewer answers requests to 127.0.0.1 or "
                "localhost only: serve it with --token to reach it by another name",
            )
        if token is not None:
            offered = given or request.cookies.get(_cookie(request)) or _bearer(request)
            if offered is None or not secrets.compare_digest(
                offered.encode("utf-8"), token.encode("utf-8")
            ):
                response: Response = page(
                    "error.html",
                    401,
                    status=401,
                    message="this viewer needs its token: open the address "
                    "`aisopod-session serve` printed (…/?token=…)",
                )
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        response = await call_next(request)
        if token is not None and given is not None:
            response.set_cookie(_cookie(request), token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(ViewerError)
    async def refused(request: Request, exc: ViewerError) -> Response:
        return page("error.html", exc.status, status=exc.status, message=exc.message)

    @app.exception_handler(SessionNotFoundError)
    async def gone(request: Request, exc: SessionNotFoundError) -> Response:
        # Deleted between the page's reads (the viewer reads while the gateway writes).
        return page("error.html", 404, status=404, message=" ".join(str(exc).split()))

    @app.exception_handler(SessionStoreError)
    async def failed(request: Request, exc: SessionStoreError) -> Response:
        message = without_passwords(" ".join(str(exc).split()))
        if len(message) > ERROR_CHARACTERS:  # a driver's message may quote a whole cell
            message = message[:ERROR_CHARACTERS] + "…"
        return page("error.html", 500, status=500, message=f"the store failed: {message}")

    @app.exception_handler(Exception)
    async def broken(request: Request, exc: Exception) -> Response:
        # Anything else (the server logs its traceback): our page, with its headers.
        return page(
            "error.html",
            500,
            status=500,
            message=f"the viewer failed on this page ({type(exc).__name__}); see the server's log",
        )

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        return page("error.html", 404, status=404, message=f"no page {request.url.path}")

    @app.get("/static/viewer.css")
    def stylesheet() -> Response:
        return Response(css, media_type="text/css", headers=_HEADERS)

    @app.get("/", response_class=HTMLResponse)
    def status(request: Request) -> HTMLResponse:
        summary = repo.summary()
        return page(
            "status.html",
            nav="status",
            backend=repo.engine.dialect.name,
            version=current_version(repo.engine),
            summary=summary,
            sizes=_file_sizes(repo.engine),
        )

    @app.get("/sessions", response_class=HTMLResponse)
    def sessions(request: Request) -> HTMLResponse:
        params = request.query_params
        values, session_filter = _filter_of(params, repo)
        limit = _limit(params.get("limit"), SESSION_PAGE)
        cursor = params.get("cursor") or None
        try:
            found = repo.page_sessions(session_filter, limit=limit, cursor=cursor)
        except ValueError as exc:
            raise ViewerError(400, _own_words(exc)) from None
        kept = {**values, **({"limit": str(limit)} if "limit" in params else {})}
        next_url = None
        if found.next_cursor is not None:
            next_url = "/sessions?" + urlencode({**kept, "cursor": found.next_cursor})
        return page(
            "sessions.html",
            nav="sessions",
            values=values,
            sessions=found.sessions,
            next_url=next_url,
            first_url=("/sessions?" + urlencode(kept)) if cursor else None,
            export_url="/export?" + urlencode(values),
            limit=limit,
            page_sizes=sorted({10, 25, SESSION_PAGE, 100, 200, limit}),
            peer_kinds=[kind.value for kind in PeerKind],
            statuses=[state.value for state in SessionStatus],
        )

    @app.get("/sessions/{session_id}", response_class=HTMLResponse)
    def transcript(request: Request, session_id: str) -> HTMLResponse:
        session = _session(repo, session_id)
        params = request.query_params
        after = _int_param(params.get("after"), "after", 0)
        limit = _limit(params.get("limit"), MESSAGE_PAGE)
        owner = repo.get(session.key)
        if owner is None or owner.id != session.id:
            # Its key parts are stored in a form this version does not write (another
            # program's row): read by that key, the history would be another session's.
            # Asked of the store: the loaded row no longer shows a kind's stored case.
            raise ViewerError(
                409,
                f"session {session.id}: its key is stored as {key_text(session)!r}, which "
                "this version reads as another session's; read it with plain SQL",
            )
        messages = repo.get_history(session.key, limit=limit + 1, after_id=after)
        more = len(messages) > limit
        messages = messages[:limit]
        parent = None if session.parent_id is None else repo.get_by_id(session.parent_id)
        forks = repo.list_sessions({"parent_id": session.id}, limit=FORKS_SHOWN + 1)
        return page(
            "transcript.html",
            nav="sessions",
            session=session,
            meta=pretty_json(session.meta) if session.meta else None,
            parent=parent,
            forks=forks[:FORKS_SHOWN],
            more_forks=(
                "/sessions?" + urlencode({"parent_id": session.id})
                if len(forks) > FORKS_SHOWN
                else None
            ),
            messages=[shown_message(message) for message in messages],
            from_start=after == 0,
            next_url=(
                f"/sessions/{session.id}?" + urlencode({"after": messages[-1].id, "limit": limit})
                if more and messages
                else None
            ),
            export_url="/export?" + urlencode(_key_filter(session)),
        )

    @app.get("/search", response_class=HTMLResponse)
    def search(request: Request) -> HTMLResponse:
        params = request.query_params
        values, session_filter = _filter_of(params, repo)
        query = params.get("q", "")
        role = params.get("role") or None
        limit = _limit(params.get("limit"), SEARCH_LIMIT)
        try:
            hits = (
                repo.search_messages(query, filter=session_filter, roles=role, limit=limit)
                if query.strip()
                else []
            )
        except ValueError as exc:
            raise ViewerError(400, _own_words(exc)) from None
        return page(
            "search.html",
            nav="search",
            query=query,
            role=role or "",
            roles=[member.value for member in Role],
            values=values,
            hits=[(hit, snippet_parts(hit.snippet)) for hit in hits],
            searched=bool(query.strip()),
            peer_kinds=[kind.value for kind in PeerKind],
            statuses=[state.value for state in SessionStatus],
        )

    @app.get("/export")
    def export(request: Request) -> StreamingResponse:
        _, session_filter = _filter_of(request.query_params, repo)
        if repo.agent_id is not None:
            session_filter = session_filter.model_copy(update={"agent_id": repo.agent_id})
        # Written whole before the first byte goes out: an error is still a clean status,
        # and the snapshot is not held open while a slow client reads.
        spool = tempfile.TemporaryFile("w+b")  # noqa: SIM115 - closed by the stream
        try:
            with open(spool.fileno(), "w", encoding="utf-8", closefd=False) as text:
                export_jsonl(repo.engine, text, session_filter)
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return StreamingResponse(
            _chunks(spool),
            media_type="application/x-ndjson; charset=utf-8",
            headers={
                **_HEADERS,
                "Content-Disposition": f'attachment; filename="aisopod-sessions-{stamp}.jsonl"',
            },
        )

    return app


def _host_name(header: str) -> str:
    """The name in a Host header, without its port (`[::1]:8765` → `::1`)."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def _bearer(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None


def _chunks(spool: Any) -> Iterator[bytes]:
    try:
        while chunk := spool.read(64 * 1024):
            yield chunk
    finally:
        spool.close()


def _own_words(exc: Exception) -> str:
    """A refusal in one line: a pydantic error as `field: reason`, without its framing."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: "
            + error["msg"].removeprefix("Value error, ")
            for error in exc.errors()
        )
    return " ".join(str(exc).split())


def _filter_of(params: Any, repo: SessionRepository) -> tuple[dict[str, str], SessionFilter]:
    """The filter the query's fields ask for, and those fields (given ones only, to keep
    in links); 400 naming the field for a bad value, 403 for another agent than the
    repository's."""
    values = {name: params[name] for name in (*FILTER_FIELDS, *TIME_FIELDS) if params.get(name)}
    fields: dict[str, Any] = {name: values[name] for name in FILTER_FIELDS if name in values}
    for name in TIME_FIELDS:
        if name in values:
            fields[name] = _time(name, values[name])
    if params.get("parent_id"):
        values["parent_id"] = params["parent_id"]
        fields["parent_id"] = _int_param(values["parent_id"], "parent_id", 0)
    try:
        session_filter = SessionFilter.model_validate(fields)
    except ValidationError as exc:
        raise ViewerError(400, _own_words(exc)) from None
    scope = repo.agent_id
    if scope is not None and session_filter.agent_id not in (None, scope):
        raise ViewerError(403, f"agent_id: this viewer shows only agent {scope!r}")
    return values, session_filter


def _time(name: str, text: str) -> datetime:
    """An ISO-8601 date or time from a form field, UTC when it has no offset."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ViewerError(
            400, f"{name}: {text!r} is not an ISO-8601 time (2026-11-26 or 2026-11-26T08:00)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _int_param(text: str | None, name: str, default: int) -> int:
    if text is None or text == "":
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ViewerError(400, f"{name}: {text!r} is not a whole number >= 0")
    return int(text)


def _limit(text: str | None, default: int) -> int:
    limit = _int_param(text, "limit", default)
    if not 1 <= limit <= MAX_LIMIT:
        raise ViewerError(400, f"limit: must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit


def _session(repo: SessionRepository, session_id: str) -> Session:
    number = _int_param(session_id, "session id", 0)
    found = repo.get_by_id(number)
    if found is None:
        raise ViewerError(404, f"no session with id {session_id}")
    return found


def _key_filter(session: Session) -> dict[str, str]:
    """The filter fields that select exactly this session (its key's five parts)."""
    return {
        "agent_id": session.agent_id,
        "channel": session.channel,
        "account_id": session.account_id,
        "peer_kind": session.peer_kind.value,
        "peer_id": session.peer_id,
    }


def _file_sizes(engine: Engine) -> dict[str, int] | None:
    """The SQLite file's size and its WAL's, or None for a server or `:memory:`."""
    if engine.dialect.name != "sqlite":
        return None
    name = engine.url.database
    if not name or name == ":memory:" or name.startswith("file:"):
        return None
    path = Path(name)
    if not path.exists():
        return None
    wal = path.with_name(path.name + "-wal")
    return {"file": path.stat().st_size, "wal": wal.stat().st_size if wal.exists() else 0}
