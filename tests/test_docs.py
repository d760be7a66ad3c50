"""Every ```python fence of README.md and docs/*.md runs as written, one test per fence
(its id names the file and the line), and where its result matters a check asserts it.

A fence that is a fragment names a hidden set-up in an HTML comment on the line just
before it, `<!-- docs-setup: NAME -->`; `SETUPS` below defines each one. Without one, a
fence is a complete program. Each fence runs in a fresh temporary folder (its working
directory), so `./aisopod-sessions.db` is a new file. A fence with a top-level `await`
runs in an event loop. Signatures and listings that are not meant to run are fenced as
`text` or `pycon`, which this module does not collect.
"""

from __future__ import annotations

import ast
import asyncio
import html
import inspect
import logging
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

import aisopod_session
from aisopod_session import (
    MIGRATIONS,
    AccessDeniedError,
    Message,
    NewMessage,
    Role,
    SessionKey,
    SessionRepository,
    SessionStatus,
    open_database,
)
from tests.dbtools import store_location

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python", "py", "python3"}
"""Fence languages that are Python to run (`pycon` and `text` are for reading only)."""

SETUP_MARK = re.compile(r"^\s*<!--\s*docs-setup:\s*(?P<name>[\w-]+)\s*-->\s*$")


@dataclass(frozen=True)
class Fence:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int
    """The line of the opening ``` (1-based)."""
    language: str
    code: str
    setup: str | None

    @property
    def name(self) -> str:
        """`docs/api.md:305`: where the fence opens, relative to the repository."""
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fences(path: Path) -> list[Fence]:
    """Every fenced block of `path` (indented ones dedented), with its set-up mark."""
    lines = path.read_text().splitlines()
    found: list[Fence] = []
    index = 0
    while index < len(lines):
        opening = re.match(r"^(\s*)(`{3,})\s*([\w+-]*)", lines[index])
        if opening is None:
            index += 1
            continue
        indent, ticks, language = opening.groups()
        end = index + 1
        while end < len(lines) and lines[end].strip() != ticks:
            end += 1
        assert end < len(lines), f"{path}:{index + 1}: a fence that is never closed"
        body = [
            line[len(indent) :] if line.startswith(indent) else line
            for line in lines[index + 1 : end]
        ]
        mark = SETUP_MARK.match(lines[index - 1]) if index else None
        found.append(
            Fence(
                path=path,
                line=index + 1,
                language=language.lower(),
                code="\n".join(body) + "\n",
                setup=mark.group("name") if mark else None,
            )
        )
        index = end + 1
    return found


def python_fences() -> list[Fence]:
    """Every Python fence of the documents, in reading order."""
    return [f for path in DOCUMENTS for f in fences(path) if f.language in PYTHON]


# --- the hidden set-ups ---------------------------------------------------------------------


@dataclass
class Context:
    """What a set-up may use and give: the fence's folder, a stack of clean-ups run after
    the fence and its check, replacements of literal text in the fence's code (a
    placeholder URL by the test server's), and the names the fence starts with."""

    folder: Path
    migrated_file: Path
    cleanup: ExitStack
    namespace: dict[str, Any] = field(default_factory=dict)
    replace: dict[str, str] = field(default_factory=dict)

    def store(self, name: str = "aisopod-sessions.db") -> Engine:
        """A new migrated store file in the fence's folder, disposed of afterwards."""
        path = self.folder / name
        shutil.copyfile(self.migrated_file, path)
        engine = open_database(path)
        self.cleanup.callback(engine.dispose)
        return engine


def public_names(context: Context) -> None:
    """Every public name of `aisopod_session`, as if `from aisopod_session import *`."""
    for name in aisopod_session.__all__:
        if not name.startswith("__"):
            context.namespace[name] = getattr(aisopod_session, name)


def with_repo(context: Context) -> None:
    """The public names, and `engine` and `repo` on an empty store."""
    public_names(context)
    engine = context.store()
    context.namespace.update(engine=engine, repo=SessionRepository(engine))


CONVERSATION = "support:telegram:bot-1:dm:42"
CONVERSATION_LENGTH = 230


def with_conversation(context: Context) -> None:
    """`repo`, and `key`, a session of 230 alternating user and assistant messages;
    `last_seen_id`, the id of its 220th; `summarise` and `log` for the compaction
    example."""
    with_repo(context)
    repo: SessionRepository = context.namespace["repo"]
    key = SessionKey.parse(CONVERSATION)
    repo.get_or_create(key)
    roles = [Role.USER, Role.ASSISTANT]
    repo.append_messages(
        key, [NewMessage(roles[n % 2], f"message {n}") for n in range(CONVERSATION_LENGTH)]
    )
    context.namespace.update(
        key=key,
        last_seen_id=repo.get_history(key)[219].id,
        summarise=summarise,
        log=logging.getLogger("docs-example"),
    )


def summarise(messages: Sequence[Message]) -> str:
    """The compaction example's model call, standing in."""
    return f"{len(messages)} messages summarised"


VIP_AGENT = "support"


def with_vip_sessions(context: Context) -> None:
    """`repo` with 130 sessions of agent `support` (every other one tagged `vip`), 10 of
    agent `sales` (all `vip`), and `handle`, which collects what it is given in
    `handled`."""
    with_repo(context)
    repo: SessionRepository = context.namespace["repo"]
    for n in range(130):
        tags = ["vip"] if n % 2 == 0 else ["new"]
        repo.create(SessionKey(VIP_AGENT, "telegram", "bot-1", "dm", f"u{n}"), meta={"tags": tags})
    for n in range(10):
        repo.create(SessionKey("sales", "telegram", "bot-1", "dm", f"u{n}"), meta={"tags": ["vip"]})
    handled: list[object] = []
    context.namespace.update(handle=handled.extend, handled=handled)


DOC_POSTGRES_URL = "postgresql+psycopg://gateway@db.internal:5432/sessions"


def with_postgresql(context: Context) -> None:
    """The documents' PostgreSQL URL replaced by a new schema of the test server's
    (skipped, saying so, without one; failed under AISOPOD_REQUIRE_POSTGRES)."""
    url = context.cleanup.enter_context(store_location("postgresql", context.folder))
    context.replace[f'"{DOC_POSTGRES_URL}"'] = repr(url)


COPY_SOURCE = [("support:telegram:bot-1:dm:1", 3), ("support:slack:T01:channel:C9", 2)]


def with_copy_source(context: Context) -> None:
    """`with_postgresql`, and `./aisopod-sessions.db` holding two sessions to copy."""
    with_postgresql(context)
    repo = SessionRepository(context.store())
    for key, count in COPY_SOURCE:
        repo.get_or_create(key)
        repo.append_messages(key, [NewMessage(Role.USER, f"{key} {n}") for n in range(count)])


def with_openai_agents(context: Context) -> None:
    """The SDK's `Runner` and an `agent` on its scripted model, which answers once."""
    from agents import Agent, Runner, set_tracing_disabled
    from agents.testing import ScriptedModel, assistant_message

    set_tracing_disabled(True)
    model = ScriptedModel()
    model.enqueue([assistant_message("Hello! How can I help?")])
    context.namespace.update(Runner=Runner, agent=Agent(name="assistant", model=model))


def with_adk(context: Context) -> None:
    """ADK's `Runner` and an `agent` (an `LlmAgent` on a model that is never called)."""
    from google.adk.agents import LlmAgent
    from google.adk.runners import Runner

    context.namespace.update(
        Runner=Runner, agent=LlmAgent(name="assistant", model="gemini-2.5-flash")
    )


SETUPS: dict[str, Callable[[Context], None]] = {
    "names": public_names,
    "repo": with_repo,
    "conversation": with_conversation,
    "vip-sessions": with_vip_sessions,
    "postgresql": with_postgresql,
    "copy-to-postgresql": with_copy_source,
    "openai-agents": with_openai_agents,
    "adk": with_adk,
}


# --- running a fence --------------------------------------------------------------------


@dataclass
class Ran:
    """A fence after it ran: the names it left, its folder, and what it printed."""

    namespace: dict[str, Any]
    folder: Path
    out: str
    again: Callable[[], dict[str, Any]]
    """Runs the fence once more, in a new namespace (complete fences only)."""


def execute(fence: Fence, namespace: dict[str, Any], replace: dict[str, str]) -> None:
    """Run the fence's code in `namespace`, its tracebacks naming the document's lines;
    a top-level `await` makes it a coroutine, run to completion in a new event loop."""
    code = fence.code
    for placeholder, value in replace.items():
        assert placeholder in code, f"{fence.name}: the set-up expects {placeholder}"
        code = code.replace(placeholder, value)
    tree = ast.parse(code, str(fence.path))
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        # As in a REPL, the value of a closing expression is `_`, for the checks.
        last = tree.body[-1]
        tree.body[-1] = ast.Assign(targets=[ast.Name("_", ast.Store())], value=last.value)
        ast.copy_location(tree.body[-1], last)
    ast.fix_missing_locations(tree)
    ast.increment_lineno(tree, fence.line)
    compiled = compile(
        tree, str(fence.path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )
    result = eval(compiled, namespace)
    if inspect.iscoroutine(result):
        asyncio.run(result)


@contextmanager
def run_fence(
    fence: Fence, folder: Path, migrated_file: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[Ran]:
    """Set the fence up, run it, give the result to the check, then clean up."""
    with ExitStack() as cleanup:
        context = Context(folder=folder, migrated_file=migrated_file, cleanup=cleanup)
        if fence.setup is not None:
            assert fence.setup in SETUPS, f"{fence.name}: no set-up {fence.setup!r} in {__file__}"
            SETUPS[fence.setup](context)
        namespace = {"__name__": "docs_example", **context.namespace}
        cleanup.callback(dispose_engines, namespace)
        capsys.readouterr()
        execute(fence, namespace, context.replace)

        def again() -> dict[str, Any]:
            fresh: dict[str, Any] = {"__name__": "docs_example"}
            cleanup.callback(dispose_engines, fresh)
            execute(fence, fresh, context.replace)
            return fresh

        yield Ran(namespace=namespace, folder=folder, out=capsys.readouterr().out, again=again)


def dispose_engines(namespace: dict[str, Any]) -> None:
    """Close the pools of the engines a fence opened and left open."""
    for value in namespace.values():
        if isinstance(value, Engine):
            value.dispose()


# --- the checks: what each fence's result must be -------------------------------------------


def check_readme_chat_service(ran: Ran) -> None:
    """The README's gateway handler stored both turns, their metadata and tokens."""
    engine = open_database(ran.folder / "aisopod-sessions.db")
    repo = SessionRepository(engine)
    history = repo.get_history("support:telegram:bot-1:dm:12345")
    assert [(m.role, m.content, m.meta) for m in history] == [
        ("user", "Hi!", {}),
        (
            "assistant",
            [{"type": "text", "text": "(0 earlier messages) you said: Hi!"}],
            {"model": "echo-1"},
        ),
    ]
    session = repo.get("support:telegram:bot-1:dm:12345")
    assert session is not None
    assert (session.input_tokens, session.output_tokens, session.token_usage) == (9, 3, 12)
    engine.dispose()
    assert ran.out == "(0 earlier messages) you said: Hi!\n"


def check_readme_asyncio(ran: Ran) -> None:
    """The README's asyncio example stored and printed its message."""
    engine = open_database(ran.folder / "aisopod-sessions.db")
    history = SessionRepository(engine).get_history("support:telegram:bot-1:dm:67890")
    assert [(m.role, m.content) for m in history] == [("user", "Hello from asyncio")]
    engine.dispose()
    assert ran.out == "[(<Role.USER: 'user'>, 'Hello from asyncio')]\n"


def check_readme_openai_agents(ran: Ran) -> None:
    """The README's SDK fragment ran a turn into the key it names."""
    session = ran.namespace["session"]
    assert ran.namespace["result"].final_output == "Hello! How can I help?"
    items = asyncio.run(session.get_items())
    session.close()
    assert [item["role"] for item in items] == ["user", "assistant"]
    engine = open_database(ran.folder / "agents.db")
    key = "openai-agents:agents-sdk:default:thread:chat-42"
    assert key in README.read_text()
    assert SessionRepository(engine).get_history(key)[0].content == "Hi!"
    engine.dispose()


def check_readme_adk(ran: Ran) -> None:
    """The README's ADK fragment gives the runner the store's session service."""
    from aisopod_session.integrations.adk import AisopodSessionService

    service = ran.namespace["service"]
    assert isinstance(service, AisopodSessionService)
    assert ran.namespace["runner"].session_service is service
    service.close()
    assert (ran.folder / "adk.db").exists()


def check_api_fork(ran: Ran) -> None:
    """The fork holds copies of the messages up to 17, in order."""
    repo: SessionRepository = ran.namespace["repo"]
    copied = repo.get_history(ran.namespace["retry"])
    source = repo.get_history(CONVERSATION)
    up_to = [m.id for m in source].index(17) + 1
    assert [(m.role, m.content) for m in copied] == [(m.role, m.content) for m in source[:up_to]]
    assert ran.namespace["branch"].message_count == len(copied) == 17


def check_api_cursor_pages(ran: Ran) -> None:
    """The paging loop saw every matching session once, and no other."""
    repo: SessionRepository = ran.namespace["repo"]
    wanted = {"agent_id": VIP_AGENT, "meta": {"tags": ["vip"]}}
    handled = [session.id for session in ran.namespace["handled"]]
    assert len(handled) == len(set(handled)) == repo.count_sessions(wanted) == 65
    expected = {session.id for session in repo.list_sessions(wanted, limit=1000)}
    assert set(handled) == expected


def check_api_for_agent(ran: Ran) -> None:
    """The confined repository wrote its own agent's session and refused the other's."""
    repo: SessionRepository = ran.namespace["repo"]
    history = repo.get_history("support-bot:slack:T01:dm:U7")
    assert [(m.role, m.content) for m in history] == [("user", "hi")]
    assert ran.out.startswith("key sales-bot:slack:T01:dm:U7 belongs to agent 'sales-bot';")
    assert repo.get("sales-bot:slack:T01:dm:U7") is None
    with pytest.raises(AccessDeniedError):
        ran.namespace["support"].get_or_create("sales-bot:slack:T01:dm:U7")


def check_api_history_windows(ran: Ran) -> None:
    """The three windows are the newest 50, the 50 before, and what came after."""
    repo: SessionRepository = ran.namespace["repo"]
    ids = [m.id for m in repo.get_history(CONVERSATION)]
    assert [m.id for m in ran.namespace["recent"]] == ids[-50:]
    assert [m.id for m in ran.namespace["older"]] == ids[-100:-50]
    last_seen = ran.namespace["last_seen_id"]
    assert [m.id for m in ran.namespace["new_since"]] == [i for i in ids if i > last_seen]
    assert len(ran.namespace["new_since"]) == CONVERSATION_LENGTH - 220


def check_api_write_engine(ran: Ran) -> None:
    """Each run of the read-then-write example counts one more visit."""

    def visits() -> object:
        engine = open_database(ran.folder / "aisopod-sessions.db")
        session = SessionRepository(engine).get("support:telegram:bot-1:dm:12345")
        engine.dispose()
        assert session is not None
        return session.meta

    assert visits() == {"visits": 1}
    assert [s.peer_id for s in ran.namespace["active"]] == ["12345"]
    ran.again()
    ran.again()
    assert visits() == {"visits": 3}


def check_async_md(ran: Ran) -> None:
    """docs/async.md's example stored and printed both messages and their tokens."""
    assert ran.out == "['Hi!', 'Hello!']\n"
    engine = open_database(ran.folder / "aisopod-sessions.db")
    session = SessionRepository(engine).get("support:telegram:bot-1:dm:12345")
    engine.dispose()
    assert session is not None
    assert (session.message_count, session.token_usage) == (2, 9)


def check_integrations_openai_agents(ran: Ran) -> None:
    """The SDK example printed the second answer and stored four items."""
    integrations = ROOT / "docs" / "integrations.md"
    assert ran.out == "You said: Hi!\n"
    engine = open_database(ran.folder / "agents.db")
    key = "openai-agents:agents-sdk:default:thread:chat-42"
    assert key in integrations.read_text()
    history = SessionRepository(engine).get_history(key)
    assert [(m.role, m.meta["item_type"]) for m in history] == [
        ("user", "message"),
        ("assistant", "message"),
        ("user", "message"),
        ("assistant", "message"),
    ]
    engine.dispose()


def check_integrations_adk(ran: Ran) -> None:
    """The ADK example printed the answer and stored both events."""
    integrations = ROOT / "docs" / "integrations.md"
    assert ran.out == "You said: Hi!\nYou said: Hi! 2\n"
    engine = open_database(ran.folder / "adk.db")
    key = "google-adk:adk:helpdesk%3Aalice:thread:chat-7"
    assert key in integrations.read_text()
    history = SessionRepository(engine).get_history(key)
    assert [(m.role, m.content) for m in history] == [
        ("user", [{"text": "Hi!"}]),
        ("assistant", [{"text": "You said: Hi!"}]),
    ]
    engine.dispose()


def check_lifecycle_compact(ran: Ran) -> None:
    """The compaction kept the newest 20 behind the summary."""
    repo: SessionRepository = ran.namespace["repo"]
    result = ran.namespace["result"]
    before = ran.namespace["history"]
    assert result.removed == CONVERSATION_LENGTH - 20
    after = repo.get_history(CONVERSATION)
    assert (after[0].role, after[0].content) == ("system", summarise(before[:-20]))
    assert [m.id for m in after[1:]] == [m.id for m in before[-20:]]


class _OneRoundDoneError(Exception):
    """Ends the housekeeping loop after its first round."""


def check_lifecycle_housekeeping(ran: Ran) -> None:
    """One round of the housekeeping loop marks idle and prunes what it says."""
    now = datetime.now(UTC)
    times = [now - timedelta(days=100)]
    # The store's clock, set back while the sessions are made (`clock` in docs/api.md).
    engine = open_database(ran.folder / "housekeeping.db", clock=lambda: times[-1])
    repo = SessionRepository(engine)
    repo.get_or_create("support:telegram:bot-1:dm:old")
    times.append(now - timedelta(hours=3))
    repo.get_or_create("support:telegram:bot-1:dm:quiet")
    times.append(now)
    repo.get_or_create("support:telegram:bot-1:dm:busy")

    async def stop(_seconds: float) -> None:
        raise _OneRoundDoneError

    # The loop's own `asyncio`, with a sleep that ends it: one round, no waiting.
    ran.namespace["asyncio"] = type("Loop", (), {"to_thread": asyncio.to_thread, "sleep": stop})
    with pytest.raises(_OneRoundDoneError):
        asyncio.run(ran.namespace["housekeeping"](repo))
    statuses = {s.peer_id: s.status for s in repo.list_sessions()}
    engine.dispose()
    # `old` went idle and then, idle past 90 days, was pruned; `quiet` is idle, kept.
    assert statuses == {"quiet": SessionStatus.IDLE, "busy": SessionStatus.ACTIVE}


def check_migrations_example(ran: Ran) -> None:
    """The example migration is migration 2 as it shipped."""
    assert ran.namespace["_"] == MIGRATIONS[1]


def check_migrations_inspecting(ran: Ran) -> None:
    """A fresh file opened without migrating is at version 0, nothing applied."""
    assert ran.out == "0\n"
    assert (ran.folder / "sessions.db").exists()


def check_postgresql_open(ran: Ran) -> None:
    """The opening example's repository works on the server."""
    engine: Engine = ran.namespace["engine"]
    assert engine.dialect.name == "postgresql"
    repo: SessionRepository = ran.namespace["repo"]
    repo.get_or_create("support:telegram:bot-1:dm:1")
    assert repo.count_sessions() == 1


def check_postgresql_copy(ran: Ran) -> None:
    """The copy printed its counts and holds the source's messages under their ids."""
    assert ran.out.splitlines()[-1] == f"{len(COPY_SOURCE)} {sum(n for _, n in COPY_SOURCE)}"
    target = SessionRepository(ran.namespace["target"])
    source = SessionRepository(ran.namespace["source"])
    for key, _count in COPY_SOURCE:
        assert [(m.id, m.content) for m in target.get_history(key)] == [
            (m.id, m.content) for m in source.get_history(key)
        ]


def check_viewer_app(ran: Ran) -> None:
    """The app serves the confined repository's pages behind its token, and refuses
    another agent's sessions."""
    from tests.viewer_server import fetch, serving

    try:
        with serving(ran.namespace["app"]) as url:
            assert fetch(url + "/sessions").status == 401
            assert fetch(url + "/sessions?token=s3cret").status == 200
            refused = fetch(url + "/sessions?agent_id=other&token=s3cret")
            assert refused.status == 403
            assert "only agent 'concierge'" in html.unescape(refused.body)
    finally:
        ran.namespace["engine"].dispose()


CHECKS: dict[tuple[str, str], Callable[[Ran], None]] = {
    ("README.md", "class ChatService"): check_readme_chat_service,
    ("README.md", "Hello from asyncio"): check_readme_asyncio,
    ("README.md", "await Runner.run(agent"): check_readme_openai_agents,
    ("README.md", "AisopodSessionService.open"): check_readme_adk,
    ("docs/api.md", "repo.fork("): check_api_fork,
    ("docs/api.md", "repo.page_sessions("): check_api_cursor_pages,
    ("docs/api.md", 'repo.for_agent("support-bot")'): check_api_for_agent,
    ("docs/api.md", "new_since ="): check_api_history_windows,
    ("docs/api.md", "write_engine(engine)"): check_api_write_engine,
    ("docs/async.md", "asyncio.run(main())"): check_async_md,
    ("docs/integrations.md", "integrations.openai_agents import"): check_integrations_openai_agents,
    ("docs/integrations.md", "integrations.adk import"): check_integrations_adk,
    ("docs/lifecycle.md", "repo.compact("): check_lifecycle_compact,
    ("docs/lifecycle.md", "async def housekeeping"): check_lifecycle_housekeeping,
    ("docs/migrations.md", "Migration(\n"): check_migrations_example,
    ("docs/migrations.md", "current_version(engine)"): check_migrations_inspecting,
    ("docs/postgresql.md", "repo = SessionRepository(engine)"): check_postgresql_open,
    ("docs/postgresql.md", "copy_database("): check_postgresql_copy,
    ("docs/viewer.md", "create_app("): check_viewer_app,
}
"""A check per fence whose result matters, found by its file and a text only it holds."""


def checks_of(fence: Fence) -> list[Callable[[Ran], None]]:
    """The checks whose file and text name this fence."""
    where = str(fence.path.relative_to(ROOT))
    return [check for (path, text), check in CHECKS.items() if path == where and text in fence.code]


def fence_params() -> list[Any]:
    """One parameter per fence, named by its place; the PostgreSQL ones marked so."""
    params = []
    for fence in python_fences():
        needs_server = fence.setup in {"postgresql", "copy-to-postgresql"}
        marks = [pytest.mark.postgres] if needs_server else []
        params.append(pytest.param(fence, id=fence.name, marks=marks))
    return params


@pytest.mark.parametrize("fence", fence_params())
def test_python_fence_runs(
    fence: Fence,
    tmp_path: Path,
    migrated_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fence runs in a fresh folder, after its set-up; then its check, if any, holds."""
    monkeypatch.chdir(tmp_path)
    checks = checks_of(fence)
    assert len(checks) <= 1, f"{fence.name}: {len(checks)} checks claim this fence"
    with run_fence(fence, tmp_path, migrated_file, capsys) as ran:
        for check in checks:
            check(ran)


def test_the_documents_have_python_fences_to_run() -> None:
    """The collector finds the fences (a changed fence syntax would leave it none)."""
    found = python_fences()
    assert {f.path.name for f in found} >= {"README.md", "api.md", "async.md", "lifecycle.md"}
    assert len(found) >= len(CHECKS)


def test_every_check_names_exactly_one_fence() -> None:
    """A check whose fence changed or went away fails here instead of never running."""
    for path, text in CHECKS:
        named = [
            f for f in python_fences() if str(f.path.relative_to(ROOT)) == path and text in f.code
        ]
        assert len(named) == 1, f"the check of {path} {text!r} names {len(named)} fences"


def test_every_setup_mark_opens_a_python_fence_with_a_known_setup() -> None:
    """A set-up mark is right above a Python fence, and names a set-up this module has."""
    for path in DOCUMENTS:
        lines = path.read_text().splitlines()
        opening = {f.line: f for f in fences(path)}
        for number, line in enumerate(lines, start=1):
            mark = SETUP_MARK.match(line)
            if mark is None:
                continue
            fence = opening.get(number + 1)
            where = f"{path.relative_to(ROOT)}:{number}"
            assert fence is not None, f"{where}: no fence follows"
            assert fence.language in PYTHON, f"{where}: the fence is not Python"
            assert mark.group("name") in SETUPS, f"{where}: unknown set-up {mark.group('name')!r}"


def test_the_collector_reads_marks_languages_and_indented_fences(tmp_path: Path) -> None:
    """`fences` on a made-up document: languages, the mark, line numbers, dedenting."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# t\n\n```text\nx = (\n```\n\n<!-- docs-setup: repo -->\n```python\nprint(1)\n```\n"
        "- item\n\n  ```py\n  if True:\n      pass\n  ```\n"
    )
    found = fences(doc)
    assert [(f.line, f.language, f.setup) for f in found] == [
        (3, "text", None),
        (8, "python", "repo"),
        (13, "py", None),
    ]
    assert found[1].code == "print(1)\n"
    assert found[2].code == "if True:\n    pass\n"


def test_a_failing_fence_points_at_its_line_in_the_document(tmp_path: Path) -> None:
    """A fence's traceback names the document and the line there, not an offset."""
    doc = tmp_path / "doc.md"
    doc.write_text("text\n\n```python\nx = 1\nraise KeyError(x)\n```\n")
    (fence,) = fences(doc)
    with pytest.raises(KeyError) as raised:
        execute(fence, {}, {})
    assert raised.traceback[-1].lineno + 1 == 5  # pytest's line numbers count from 0
    assert raised.traceback[-1].path == doc


SIGNATURE = re.compile(r"(?<![\w.])(?P<name>[A-Za-z_]\w*)\((?P<params>[^()`]*)\)")
BARE_STAR = re.compile(r"(?:^|,)\s*\*\s*(?:,|$)")
REQUIRED = "(required)"


def signature_target(name: str) -> Callable[..., object] | None:
    """What a documented name means: a public callable of `aisopod_session`, a
    `SessionRepository` method, or an integration's class; None for any other name."""
    if name in {"AisopodSession", "AisopodSessionService"}:
        from aisopod_session.integrations.adk import AisopodSessionService
        from aisopod_session.integrations.openai_agents import AisopodSession

        return AisopodSession if name == "AisopodSession" else AisopodSessionService
    if name in aisopod_session.__all__:
        value = getattr(aisopod_session, name)
        return value if callable(value) else None
    method = getattr(SessionRepository, name, None)
    return method if callable(method) and not name.startswith("_") else None


def documented_parameters(params: str) -> list[tuple[str, bool, object]]:
    """`(name, keyword_only, default)` of each parameter of a signature as written in the
    docs (`key, *, limit=None`); a default is evaluated (`64 * 1024 * 1024`)."""
    tree = ast.parse(f"def _({params}): pass").body[0]
    assert isinstance(tree, ast.FunctionDef)
    arguments = tree.args

    def value(node: ast.expr | None) -> object:
        if node is None:
            return REQUIRED
        return eval(compile(ast.Expression(node), "<docs>", "eval"), {"__builtins__": {}})

    positional = [*arguments.posonlyargs, *arguments.args]
    defaults = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
    found = [
        (arg.arg, False, value(default)) for arg, default in zip(positional, defaults, strict=True)
    ]
    keyword = zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
    return found + [(arg.arg, True, value(default)) for arg, default in keyword]


def code_parameters(target: Callable[..., object]) -> list[tuple[str, bool, object]]:
    """`(name, keyword_only, default)` of each parameter of the code (`self` left out)."""
    return [
        (
            parameter.name,
            parameter.kind is inspect.Parameter.KEYWORD_ONLY,
            REQUIRED if parameter.default is inspect.Parameter.empty else parameter.default,
        )
        for parameter in inspect.signature(target).parameters.values()
        if parameter.name != "self"
    ]


def test_documented_signatures_match_the_code() -> None:
    """Every signature the documents give (a public name with its parameters, a bare `*`
    among them, as in `prune(*, updated_before, status=None, ...)`, in prose, tables,
    headings or `text` fences) names the code's parameters, in order, keyword-only where
    the code's are, with the code's defaults (the first ones only, where it ends in
    `...`)."""
    checked = []
    for path in DOCUMENTS:
        text = path.read_text()
        for match in SIGNATURE.finditer(text):
            params = " ".join(match["params"].split())
            target = signature_target(match["name"])
            if target is None or not BARE_STAR.search(params):
                continue
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
            # `prune(*, updated_before, ...)`: the first parameters, the rest left out.
            shown, elided = re.subn(r",\s*(?:\.\.\.|…)$", "", params)
            documented = documented_parameters(shown)
            code = code_parameters(target)
            assert documented == (code[: len(documented)] if elided else code), (
                f"{where}: {match[0]}"
            )
            checked.append(where)
    assert len(checked) >= 20, checked


def test_schema_md_plain_sql_reads_content_as_documented(store: Engine) -> None:
    """docs/schema.md's plain-SQL reading of JSON content, on the backend at hand: a
    string's text, the text blocks of block content, a metadata field, the text test."""
    doc = (ROOT / "docs" / "schema.md").read_text()
    backend = 0 if store.dialect.name == "sqlite" else 1
    rows = {
        line.split("|")[1].strip(): re.findall(r"`([^`]*)`", line.split("|")[2 + backend])
        for line in doc.splitlines()
        if line.startswith("| ") and line.count("`") >= 4
    }
    repo = SessionRepository(store)
    key = "agent:telegram:bot:dm:sql"
    repo.get_or_create(key)
    repo.append_message(key, "user", "héllo 🦀", meta={"model": "m-1"})
    repo.append_message(
        key,
        "assistant",
        [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}],
    )
    repo.append_message(key, "assistant", 42)
    with store.connect() as conn:

        def run(sql: str) -> list[object]:
            return [row[0] for row in conn.exec_driver_sql(sql)]

        for as_text in rows["content as text (a string's text; other values as JSON text)"]:
            texts = run(f"SELECT {as_text} FROM messages ORDER BY id")
            assert texts[0] == "héllo 🦀"
            assert str(texts[2]) == "42"
        (blocks,) = rows["the text of every text block"]
        assert run(blocks + " ORDER BY 1") == ["a", "b"]
        (field_,) = rows["a metadata field"]
        assert run(f"SELECT {field_} FROM messages ORDER BY id") == ["m-1", None, None]
        (is_text,) = rows["is it text?"]
        kinds = run(f"SELECT {is_text} FROM messages ORDER BY id")
        assert [bool(kind) for kind in kinds] == [True, False, False]
