"""The web viewer (`aisopod-session serve`) over HTTP: the app served by uvicorn in this
process on a real store file filled through the repository, read with plain requests.
The pages in a real browser: tests/test_viewer_browser.py."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from aisopod_session import SCHEMA_VERSION, SessionRepository, export_jsonl, open_database
from aisopod_session.cli import app as cli_app
from aisopod_session.viewer import create_app, is_loopback
from aisopod_session.viewer.app import FORKS_SHOWN
from tests.dbtools import make_seed_file, run_sql
from tests.viewer_server import (
    HOSTILE_TEXT,
    TOOL_RESULT,
    Reply,
    Seeded,
    fetch,
    seed,
    serving,
)


@pytest.fixture(scope="module")
def seeded_store(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[SessionRepository, Seeded]]:
    engine = open_database(tmp_path_factory.mktemp("viewer") / "sessions.db")
    repo = SessionRepository(engine)
    seeded = seed(repo)
    yield repo, seeded
    engine.dispose()


@pytest.fixture(scope="module")
def base(seeded_store: tuple[SessionRepository, Seeded]) -> Iterator[str]:
    with serving(create_app(seeded_store[0])) as url:
        yield url


@pytest.fixture
def repo(seeded_store: tuple[SessionRepository, Seeded]) -> SessionRepository:
    return seeded_store[0]


@pytest.fixture
def seeded(seeded_store: tuple[SessionRepository, Seeded]) -> Seeded:
    return seeded_store[1]


def get(url: str, status: int = 200, **headers: str) -> str:
    reply = fetch(url, headers)
    assert reply.status == status, reply.body
    return reply.body


def listed_keys(html: str) -> list[str]:
    """The keys of a sessions page's rows, in order, as text."""
    return [unescape(key) for key in re.findall(r'<a href="/sessions/\d+">([^<]*)</a>', html)]


def next_link(html: str) -> str | None:
    found = re.search(r'<a href="([^"]*)" id="next-page">', html)
    return None if found is None else unescape(found.group(1))


def error_of(html: str) -> str:
    found = re.search(r'<p class="error" id="error">(.*?)</p>', html, re.S)
    assert found is not None, html
    return unescape(found.group(1))


# --- status --------------------------------------------------------------------------------


def test_the_status_page_shows_the_schema_version_counts_and_sizes(
    base: str, repo: SessionRepository, seeded: Seeded
) -> None:
    html = get(base + "/")
    total = repo.summary().total
    assert f'<td id="schema-version">{SCHEMA_VERSION}</td>' in html
    assert f'<td id="session-count">{seeded.sessions}</td>' in html
    assert f'<td id="message-count">{total.messages}</td>' in html
    assert "+ WAL" in html  # a file's size
    assert '<a href="/sessions?status=compacted">compacted</a>' in html
    assert '<a href="/sessions?agent_id=pager">pager</a>' in html


# --- the sessions list -----------------------------------------------------------------


def test_filters_narrow_the_list_and_take_enum_values_in_any_case(
    base: str, seeded: Seeded
) -> None:
    pager = listed_keys(get(base + "/sessions?agent_id=pager&limit=100"))
    assert len(pager) == seeded.bulk
    assert all(key.startswith("pager:") for key in pager)
    assert listed_keys(get(base + "/sessions?peer_kind=THREAD&limit=100")) == pager
    assert listed_keys(get(base + "/sessions?status=compacted")) == [
        "concierge:slack:T024:channel:C0123"
    ]
    assert listed_keys(get(base + "/sessions?agent_id=nobody")) == []
    everything = listed_keys(get(base + "/sessions?limit=100"))
    assert len(everything) == seeded.sessions


def test_cursor_pages_cover_every_session_once_and_keep_the_filter(
    base: str, seeded: Seeded
) -> None:
    url: str | None = "/sessions?agent_id=pager&limit=5"
    pages: list[list[str]] = []
    while url is not None:
        html = get(base + url)
        pages.append(listed_keys(html))
        url = next_link(html)
        if url is not None:
            query = parse_qs(urlsplit(url).query)
            assert query["agent_id"] == ["pager"]
            assert query["limit"] == ["5"]
            assert '<a href="/sessions?agent_id=pager&amp;limit=5" id="first-page">' in get(
                base + url
            )
    assert [len(page) for page in pages] == [5, 5, seeded.bulk - 10]
    seen = [key for page in pages for key in page]
    assert sorted(seen) == sorted(listed_keys(get(base + "/sessions?agent_id=pager&limit=100")))
    assert len(set(seen)) == seeded.bulk


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ({"peer_kind": "carrier-pigeon"}, "peer_kind: must be one of dm, group"),
        ({"status": "bogus"}, "status: must be one of active"),
        ({"agent_id": "a\x01b"}, "agent_id: "),
        ({"updated_after": "yesterday"}, "updated_after: 'yesterday' is not an ISO-8601 time"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"limit": "0"}, "limit: must be between 1 and 1000"),
        ({"limit": "-3"}, "limit: '-3' is not a whole number"),
    ],
)
def test_a_bad_filter_is_refused_with_400_naming_the_field(
    base: str, query: dict[str, str], words: str
) -> None:
    message = error_of(get(base + "/sessions?" + urlencode(query), 400))
    assert words in message
    assert "pydantic" not in message
    assert "Value error" not in message


def test_a_cursor_from_another_filter_is_refused(base: str) -> None:
    html = get(base + "/sessions?agent_id=pager&limit=5")
    cursor = parse_qs(urlsplit(next_link(html) or "").query)["cursor"][0]
    assert "cursor" in error_of(get(base + "/sessions?" + urlencode({"cursor": cursor}), 400))


# --- transcripts -----------------------------------------------------------------------


def test_a_transcript_shows_tool_calls_their_results_metadata_and_tokens(
    base: str, seeded: Seeded, repo: SessionRepository
) -> None:
    html = get(base + f"/sessions/{seeded.weather_id}")
    assert '<h1 class="key" id="session-key">concierge:telegram:bot-main:dm:1001</h1>' in html
    # OpenAI-style tool_calls: the tool's name, its id, its arguments as JSON.
    assert 'tool call <b>get_weather</b> <span class="call-id">call_1</span>' in html
    assert "&#34;city&#34;: &#34;Oslo&#34;" in html
    # The tool message that answers it, and a tool_use / tool_result block pair.
    assert '<span class="call-id">result of call_1</span>' in html
    assert TOOL_RESULT in html
    assert 'tool call <b>get_forecast</b> <span class="call-id">toolu_2</span>' in html
    assert 'tool result <span class="call-id">toolu_2</span></div><pre class="json">Sunny' in html
    assert '<span class="usage">input_tokens 9 output_tokens 5 </span>' in html
    assert "&#34;model&#34;: &#34;echo-1&#34;" in html
    assert "32 (20 input, 12 output)" in html
    messages = repo.get_history(seeded.weather)
    assert re.findall(r'<li class="message [^"]*" id="m(\d+)">', html) == [
        str(message.id) for message in messages
    ]


def test_a_transcript_pages_forwards(base: str, seeded: Seeded, repo: SessionRepository) -> None:
    ids = [str(message.id) for message in repo.get_history(seeded.weather)]
    html = get(base + f"/sessions/{seeded.weather_id}?limit=4")
    assert re.findall(r'id="m(\d+)"', html) == ids[:4]
    later = next_link(html)
    assert later == f"/sessions/{seeded.weather_id}?after={ids[3]}&limit=4"
    html = get(base + later)
    assert re.findall(r'<li class="message [^"]*" id="m(\d+)">', html) == ids[4:]
    assert next_link(html) is None
    assert 'id="from-start"' in html


def test_a_fork_links_to_its_parent_and_the_message_it_was_forked_after(
    base: str, seeded: Seeded, repo: SessionRepository
) -> None:
    fork = repo.get_by_id(seeded.fork_id)
    assert fork is not None
    html = get(base + f"/sessions/{seeded.fork_id}")
    assert f'<a href="/sessions/{seeded.weather_id}" id="parent">' in html
    after = fork.forked_from_message_id
    assert after is not None
    assert f'href="/sessions/{seeded.weather_id}?after={after - 1}#m{after}">{after}</a>' in html
    assert 'id="lineage"' not in get(base + f"/sessions/{seeded.weather_id}")


def test_a_session_lists_its_forks_and_the_list_filters_by_parent(
    base: str, seeded: Seeded
) -> None:
    html = get(base + f"/sessions/{seeded.weather_id}")
    assert re.findall(r'<a href="/sessions/(\d+)" class="fork">', html) == [str(seeded.fork_id)]
    assert 'id="all-forks"' not in html
    assert 'id="forks"' not in get(base + f"/sessions/{seeded.fork_id}")
    listed = get(base + f"/sessions?parent_id={seeded.weather_id}")
    assert listed_keys(listed) == ["concierge:telegram:bot-main:dm:1001-fork"]
    assert f'name="parent_id" value="{seeded.weather_id}"' in listed
    assert error_of(get(base + "/sessions?parent_id=0", 400)).startswith("parent_id")
    assert error_of(get(base + "/sessions?parent_id=x", 400)).startswith("parent_id")


def test_a_session_with_many_forks_links_to_all_of_them(tmp_path: Path) -> None:
    engine = open_database(tmp_path / "forks.db")
    repo = SessionRepository(engine)
    source = repo.get_or_create("concierge:telegram:bot-main:dm:1")
    for n in range(FORKS_SHOWN + 1):
        repo.fork(source.key, f"concierge:telegram:bot-main:dm:fork-{n}")
    try:
        with serving(create_app(repo)) as url:
            html = get(url + f"/sessions/{source.id}")
            assert len(re.findall(r'class="fork"', html)) == FORKS_SHOWN
            assert f'<a href="/sessions?parent_id={source.id}" id="all-forks">' in html
            listed = listed_keys(get(url + f"/sessions?parent_id={source.id}"))
            assert len(listed) == FORKS_SHOWN + 1
    finally:
        engine.dispose()


def test_a_compacted_session_shows_its_summary(base: str, seeded: Seeded) -> None:
    html = get(base + f"/sessions/{seeded.compacted_id}")
    assert 'id="compaction"' in html
    assert "1 time(s)" in html
    assert '<div class="summary">Earlier: four standup notes about the release.</div>' in html


def test_an_unknown_session_is_404_and_a_bad_id_400(base: str) -> None:
    assert error_of(get(base + "/sessions/99999", 404)) == "no session with id 99999"
    assert "session id" in error_of(get(base + "/sessions/abc", 400))
    assert error_of(get(base + "/no/such/page", 404)) == "no page /no/such/page"


# --- hostile text ----------------------------------------------------------------------


def test_hostile_text_is_escaped_and_control_characters_shown(base: str, seeded: Seeded) -> None:
    reply = fetch(base + f"/sessions/{seeded.hostile_id}")
    html = reply.body
    assert reply.status == 200
    assert "<script" not in html
    assert "<img" not in html
    assert "<b>mallory" not in html
    assert "&lt;script&gt;window.pwned = 1; alert(1)&lt;/script&gt;" in html
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in html  # a tool's name
    assert "&lt;img src=x onerror=alert(2)&gt;" in html  # session metadata
    assert "concierge:telegram:bot-main:dm:&lt;b&gt;mallory&lt;/b&gt;" in html  # the key
    # No character a terminal or the text layout acts on reaches the page raw.
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", html)
    assert '<span class="ctl" title="control character">\\x1b</span>[31mred' in html
    assert '<span class="ctl" title="control character">\\u202e</span>evil' in html
    policy = reply.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "script-src" not in policy  # no script allowed at all
    assert reply.headers["X-Content-Type-Options"] == "nosniff"


def test_hostile_text_in_lists_and_search_is_escaped(base: str) -> None:
    for path in ("/sessions?limit=100", "/search?q=pwned", "/search?q=%3Cscript%3E"):
        html = get(base + path)
        assert "<script" not in html
        assert "<b>mallory" not in html
    html = get(base + "/search?q=pwned")
    assert "<mark>pwned</mark>" in html
    assert "&lt;script&gt;window." in html


# --- search ------------------------------------------------------------------------------


def test_search_finds_messages_marks_the_words_and_links_to_them(
    base: str, seeded: Seeded, repo: SessionRepository
) -> None:
    html = get(base + "/search?q=oslo")
    hits = repo.search_messages("oslo")
    rows = re.findall(r'<tr class="hit">(.*?)</tr>', html, re.S)
    assert len(rows) == len(hits) > 0
    for row, hit in zip(rows, hits, strict=True):
        assert f'href="/sessions/{hit.message.session_id}?after=' in row
        assert f"#m{hit.message.id}" in row
    assert "<mark>Oslo</mark>" in html
    narrowed = get(base + "/search?q=oslo&role=TOOL")
    # The tool's answer, and its copy in the fork.
    assert len(re.findall(r'<tr class="hit">', narrowed)) == len(
        repo.search_messages("oslo", roles="tool")
    )
    assert "<mark>Oslo</mark>: 4 °C, light rain" in narrowed
    assert re.findall(r'<tr class="hit">', get(base + "/search?q=oslo&agent_id=pager")) == []
    assert 'id="hits"' not in get(base + "/search")  # nothing asked, nothing searched


def test_search_refuses_a_bad_role_naming_it(base: str) -> None:
    assert "roles" in error_of(get(base + "/search?q=oslo&role=robot", 400))


# --- export ------------------------------------------------------------------------------


def exported(engine: Any, **fields: str) -> list[str]:
    """What `export_jsonl` writes for this filter, without the header's time."""
    buffer = io.StringIO()
    export_jsonl(engine, buffer, fields or None)
    return buffer.getvalue().splitlines()[1:]


def test_the_export_download_is_the_export_format(base: str, repo: SessionRepository) -> None:
    reply = fetch(base + "/export")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/x-ndjson")
    assert re.fullmatch(
        r'attachment; filename="aisopod-sessions-\d{8}T\d{6}Z\.jsonl"',
        reply.headers["Content-Disposition"],
    )
    lines = reply.body.splitlines()
    header = json.loads(lines[0])
    assert header["type"] == "aisopod-session-export"
    assert header["schema_version"] == SCHEMA_VERSION
    assert lines[1:] == exported(repo.engine)


def test_the_export_download_takes_the_lists_filter_and_one_sessions_key(
    base: str, repo: SessionRepository, seeded: Seeded
) -> None:
    body = get(base + "/export?agent_id=pager&status=ACTIVE")
    assert body.splitlines()[1:] == exported(repo.engine, agent_id="pager", status="active")
    html = get(base + f"/sessions/{seeded.hostile_id}")
    link = re.search(r'<a href="([^"]*)" id="export">', html)
    assert link is not None
    lines = [json.loads(line) for line in get(base + unescape(link.group(1))).splitlines()[1:]]
    assert [line["key"] for line in lines if line["type"] == "session"] == [
        "concierge:telegram:bot-main:dm:<b>mallory</b>"
    ]
    assert next(line["content"] for line in lines if line["type"] == "message") == HOSTILE_TEXT
    assert "peer_kind" in error_of(get(base + "/export?peer_kind=fax", 400))


# --- on either backend ------------------------------------------------------------------


def test_every_page_works_on_either_backend(store: Engine) -> None:
    repo = SessionRepository(store)
    seeded = seed(repo, bulk=3)
    with serving(create_app(repo)) as url:
        status = get(url + "/")
        assert f'<td id="session-count">{seeded.sessions}</td>' in status
        assert ("+ WAL" in status) is (store.dialect.name == "sqlite")  # a file's sizes
        assert len(listed_keys(get(url + "/sessions?limit=2&agent_id=pager"))) == 2
        transcript = get(url + f"/sessions/{seeded.weather_id}")
        assert "tool call <b>get_weather</b>" in transcript
        assert "&lt;mark&gt;" not in get(url + "/search?q=forecast")
        assert "<mark>forecast</mark>" in get(url + "/search?q=forecast")
        lines = get(url + "/export").splitlines()
        assert lines[1:] == exported(store)


# --- read-only, confinement, the token ----------------------------------------------------


def test_every_route_only_reads() -> None:
    engine = open_database(":memory:")
    try:
        routes = create_app(SessionRepository(engine)).routes
    finally:
        engine.dispose()
    methods = {method for route in routes for method in getattr(route, "methods", set())}
    assert methods <= {"GET", "HEAD"}


def test_a_confined_repository_shows_and_exports_only_its_agent(
    repo: SessionRepository, seeded: Seeded
) -> None:
    with serving(create_app(repo.for_agent("pager"))) as url:
        assert len(listed_keys(get(url + "/sessions?limit=100"))) == seeded.bulk
        assert "only agent 'pager'" in error_of(get(url + "/sessions?agent_id=concierge", 403))
        assert "only agent 'pager'" in error_of(get(url + "/export?agent_id=concierge", 403))
        lines = [json.loads(line) for line in get(url + "/export").splitlines()[1:]]
        sessions = [line for line in lines if line["type"] == "session"]
        assert len(sessions) == seeded.bulk
        assert {line["agent_id"] for line in sessions} == {"pager"}
        get(url + f"/sessions/{seeded.weather_id}", 404)  # another agent's: as if none


def test_with_a_token_every_request_must_carry_it(repo: SessionRepository) -> None:
    with serving(create_app(repo, token="s3cret-token")) as url:
        for path in ("/", "/sessions", "/export", "/static/viewer.css", "/sessions/1"):
            reply = fetch(url + path)
            assert reply.status == 401, path
            assert "needs its token" in reply.body
            assert reply.headers["WWW-Authenticate"] == "Bearer"
        assert fetch(url + "/?token=wrong").status == 401
        assert fetch(url + "/", {"Authorization": "Bearer wrong"}).status == 401
        first = fetch(url + "/?token=s3cret-token")
        assert first.status == 200
        cookie = first.headers["Set-Cookie"]
        # Named with the port: another viewer on this host keeps a cookie of its own.
        name = f"aisopod_viewer_token_{urlsplit(url).port}"
        assert cookie.startswith(f"{name}=s3cret-token")
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "samesite=strict" in cookie.lower()
        assert fetch(url + "/sessions", {"Cookie": f"{name}=s3cret-token"}).status == 200
        other_port = {"Cookie": "aisopod_viewer_token_1=s3cret-token"}
        assert fetch(url + "/sessions", other_port).status == 401
        assert fetch(url + "/export", {"Authorization": "Bearer s3cret-token"}).status == 200


def test_without_a_token_only_loopback_names_are_answered(
    base: str, repo: SessionRepository
) -> None:
    """A page whose name resolves to 127.0.0.1 (DNS rebinding) gets nothing."""
    port = urlsplit(base).port
    refused = fetch(base + "/sessions", {"Host": f"attacker.example:{port}"})
    assert refused.status == 421
    assert "127.0.0.1 or localhost only" in error_of(refused.body)
    assert "concierge:" not in refused.body
    assert fetch(base + "/export", {"Host": "attacker.example"}).status == 421
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert fetch(base + "/sessions", {"Host": host}).status == 200, host
    with serving(create_app(repo, token="t0ken")) as url:  # a token: any name
        reply = fetch(url + "/sessions?token=t0ken", {"Host": "viewer.internal:8765"})
        assert reply.status == 200


def test_an_empty_token_is_refused_naming_it(repo: SessionRepository) -> None:
    with pytest.raises(ValueError, match=r"^token: must not be empty"):
        create_app(repo, token=" ")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# --- the `serve` command ---------------------------------------------------------------


RUNNER = CliRunner()


def test_serve_refuses_a_missing_store_and_one_that_needs_migrating(tmp_path: Path) -> None:
    missing = RUNNER.invoke(cli_app, ["--db", str(tmp_path / "none.db"), "serve"])
    assert missing.exit_code == 1
    assert "no session store at" in missing.stderr
    assert not (tmp_path / "none.db").exists()
    old = tmp_path / "old.db"
    make_seed_file(old, version=2)
    behind = RUNNER.invoke(cli_app, ["--db", str(old), "serve"])
    assert behind.exit_code == 1
    assert "run `aisopod-session migrate` first" in behind.stderr


def test_serve_refuses_an_empty_token_and_a_bad_port(db_path: Path) -> None:
    open_database(db_path).dispose()
    empty = RUNNER.invoke(cli_app, ["--db", str(db_path), "serve", "--token", ""])
    assert (empty.exit_code, empty.stderr.strip()) == (1, "error: --token: must not be empty")
    for value, reason in (("70000", "must be from 1 to 65535; got 70000"), ("abc", "'abc' is")):
        port = RUNNER.invoke(cli_app, ["--db", str(db_path), "serve", "--port", value])
        assert port.exit_code == 2
        assert f"error: --port: {reason}" in port.stderr


def test_serve_on_a_port_in_use_says_so_in_one_line_before_claiming_to_serve(
    db_path: Path,
) -> None:
    """The port is bound before "Serving …" is printed: one taken by another server is
    a one-line error (uvicorn printed its own and exited 3, after our "Serving")."""
    open_database(db_path).dispose()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = RUNNER.invoke(cli_app, ["--db", str(db_path), "serve", "--port", str(port)])
    assert done.exit_code == 1
    assert done.stdout == ""
    assert done.stderr == (
        f"error: --port {port}: in use on 127.0.0.1 (another server?); pass another --port\n"
    )


def test_serve_without_the_viewer_extra_says_what_to_install(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_database(db_path).dispose()
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    done = RUNNER.invoke(cli_app, ["--db", str(db_path), "serve"])
    assert done.exit_code == 1
    assert done.stderr.strip() == (
        "error: serve needs the `viewer` extra (FastAPI, Jinja2 and uvicorn; uvicorn is "
        "missing): install aisopod-session[viewer]"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def until_served(url: str) -> Reply:
    """The first answer from `url` once the server listens (it starts after printing)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return fetch(url)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.processes
def test_serve_beyond_loopback_makes_up_a_token_and_enforces_it(db_path: Path) -> None:
    engine = open_database(db_path)
    seed(SessionRepository(engine), bulk=0)
    engine.dispose()
    port = free_port()
    script = Path(sys.executable).parent / "aisopod-session"
    command = [str(script), "--db", str(db_path), "serve", "--host", "0.0.0.0", "--port", str(port)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            found = re.search(r"read-only at (http://0\.0\.0\.0:\d+/\?token=(\S+)) ", line)
            assert found is not None, line
            token = found.group(2)
            assert len(token) >= 24
            local = f"http://127.0.0.1:{port}"
            assert until_served(local + "/").status == 401
            assert fetch(f"{local}/sessions?token=wrong").status == 401
            assert "concierge:telegram:bot-main:dm:1001" in get(f"{local}/sessions?token={token}")
        finally:
            server.terminate()


def test_serve_listens_on_every_address_its_host_gives(db_path: Path) -> None:
    """`--host ""` listens on every address of this machine, IPv4 and IPv6 alike, as
    uvicorn binds a host (one socket each): both loopbacks answer (IPv6 where the
    machine has it)."""
    open_database(db_path).dispose()
    port = free_port()
    loopbacks = ["127.0.0.1"]
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
            loopbacks.append("[::1]")
        except OSError:
            pass  # no IPv6 here
    script = Path(sys.executable).parent / "aisopod-session"
    command = [str(script), "--db", str(db_path), "serve", "--host", "", "--port", str(port)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout is not None
            found = re.search(r"\?token=(\S+) ", server.stdout.readline())
            assert found is not None
            for address in loopbacks:
                url = f"http://{address}:{port}/?token={found.group(1)}"
                assert until_served(url).status == 200, address
        finally:
            server.terminate()


# --- docs/viewer.md -------------------------------------------------------------------

VIEWER_MD = Path(__file__).resolve().parent.parent / "docs" / "viewer.md"


def test_viewer_md_documents_every_option_of_serve() -> None:
    help_text = RUNNER.invoke(cli_app, ["serve", "--help"], terminal_width=200).stdout
    options = set(re.findall(r"^\s+(--[a-z-]+)", help_text, flags=re.M)) - {"--help", "--db"}
    assert options == {"--host", "--port", "--token"}
    documented = set(re.findall(r"^\| `(--[a-z-]+)", VIEWER_MD.read_text(), flags=re.M))
    assert documented == options


# --- what other programs and hostile callers store --------------------------------------


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[tuple[SessionRepository, str]]:
    """A store of its own (these tests write what the shared one must not hold), served."""
    engine = open_database(tmp_path / "hostile.db")
    repo = SessionRepository(engine)
    try:
        with serving(create_app(repo)) as url:
            yield repo, url
    finally:
        engine.dispose()


def test_big_and_deeply_nested_values_make_a_page_of_bounded_size(
    hostile: tuple[SessionRepository, str],
) -> None:
    """JSON text in a tool call is indented only while that stays small (180 KB of
    brackets nested 900 deep would indent to 160 MB); JSON too deep for Python is named;
    text is cut at SHOWN_CHARACTERS with a note."""
    from aisopod_session import NewMessage
    from aisopod_session.viewer.render import SHOWN_CHARACTERS

    repo, url = hostile
    nested = "[" + ",".join(["[" * 900 + "]" * 900] * 100) + "]"
    calls = [{"id": "c", "function": {"name": "t", "arguments": nested}}]
    too_deep = {"type": "tool_result", "tool_use_id": "c", "content": "[" * 3000 + "]" * 3000}
    session = repo.get_or_create("a:web:x:dm:big")
    repo.append_messages(
        session.key,
        [
            NewMessage("assistant", "calling", tool_calls=calls),
            NewMessage("user", [too_deep]),
            NewMessage("user", "y" * (SHOWN_CHARACTERS + 5)),
        ],
    )
    reply = fetch(url + f"/sessions/{session.id}")
    assert reply.status == 200
    assert len(reply.body) < 2 * len(nested) + 3 * SHOWN_CHARACTERS
    assert "[[[[[[[[" in reply.body
    assert "5 more characters (download the session)" in reply.body


def test_characters_a_page_would_hide_are_shown_as_escapes(
    hostile: tuple[SessionRepository, str],
) -> None:
    repo, url = hostile
    session = repo.get_or_create("a:web:x:dm:hidden")
    repo.append_message(session.key, "user", "zero\u200bwidth, tag\U000e0041, lrm\u200e, ls\u2028.")
    html = get(url + f"/sessions/{session.id}")
    for code in ("\\u200b", "\\U000e0041", "\\u200e", "\\u2028"):
        assert f">{code}</span>" in html
    assert not any(char in html for char in "\u200b\U000e0041\u200e\u2028")


def test_rows_with_keys_another_program_wrote_neither_break_nor_mislead(
    hostile: tuple[SessionRepository, str],
) -> None:
    """A key part this version would refuse does not take the list down; a key stored in
    another spelling of an existing session's key is not shown with that one's messages."""
    repo, url = hostile
    normal = repo.get_or_create("bot:telegram:b1:group:g1")
    repo.append_message(normal.key, "user", "the normal session's message")
    engine = repo.engine
    now = "2026-11-30T10:00:00Z"
    for agent, kind, peer in (
        ("Bot", "group", "g1"),
        ("bot", "GROUP", "g1"),  # read back as the kind `group`: only the store can tell
        ("d3", "group", "x" * 3000),
    ):
        run_sql(
            engine,
            "INSERT INTO sessions (agent_id, channel, account_id, peer_kind, peer_id,"
            " created_at, updated_at) VALUES (?, 'telegram', 'b1', ?, ?, ?, ?)",
            (agent, kind, peer, now, now),
        )
    listed = get(url + "/sessions?limit=100")
    assert "d3:telegram:b1:group:" + "x" * 3000 in unescape(listed)
    with engine.connect() as conn:
        spelled = conn.exec_driver_sql(
            "SELECT id FROM sessions WHERE agent_id = 'Bot' OR peer_kind = 'GROUP'"
        ).scalars()
        ids = list(spelled)
    assert len(ids) == 2
    for spelled_id in ids:
        refused = fetch(url + f"/sessions/{spelled_id}")
        assert refused.status == 409
        assert "the normal session's message" not in refused.body
        assert "plain SQL" in error_of(refused.body)
    assert "the normal session&#39;s message" in get(url + f"/sessions/{normal.id}")


def test_a_time_out_of_range_is_a_bad_request_and_no_path_is_redirected(
    hostile: tuple[SessionRepository, str],
) -> None:
    _repo, url = hostile
    html = get(url + "/sessions?" + urlencode({"updated_after": "9999-12-31T23:59:59-23:59"}), 400)
    assert error_of(html).startswith("updated_after: ")
    assert fetch(url + "/sessions/").status == 404


def test_a_page_that_fails_unexpectedly_is_our_error_page_with_its_headers(
    hostile: tuple[SessionRepository, str],
) -> None:
    """A row the reading code cannot read (a creation time plain SQL wrote) fails its
    page, not the viewer: our 500 page, with the policy headers, naming the row."""
    repo, url = hostile
    session = repo.get_or_create("a:web:x:dm:damaged")
    run_sql(
        repo.engine,
        "UPDATE sessions SET created_at = ? WHERE id = ?",
        ("yesterday" * 1000, session.id),
    )
    reply = fetch(url + f"/sessions/{session.id}")
    assert reply.status == 500
    assert reply.headers["Content-Security-Policy"].startswith("default-src 'none';")
    assert reply.headers["Cache-Control"] == "no-store"
    error = error_of(reply.body)
    assert f"sessions row {session.id}, column created_at" in error
    assert len(error) < 700


def test_text_that_is_not_utf8_is_shown_with_replacement_characters(
    hostile: tuple[SessionRepository, str],
) -> None:
    """Bytes that are not UTF-8, stored as text by another program, are shown with
    U+FFFD in their place; the rest of the transcript as ever."""
    repo, url = hostile
    session = repo.get_or_create("a:web:x:dm:utf8")
    repo.append_message(session.key, "user", "before it")
    run_sql(
        repo.engine,
        "INSERT INTO messages (session_id, role, content, created_at)"
        " VALUES (?, 'user', CAST(? AS TEXT), '2026-11-30T10:00:00Z')",
        (session.id, b'"caf\xc3\xa9 \xff\xfe"'),
    )
    reply = fetch(url + f"/sessions/{session.id}")
    assert reply.status == 200
    assert "before it" in reply.body
    assert "café \ufffd\ufffd" in reply.body
