"""Import an OpenClaw gateway's sessions (`sessions.json` and its JSONL transcripts,
OpenClaw 2026.2 with transcript format v3) into the store: `import_openclaw` and the
`aisopod-session import-openclaw` command. docs/openclaw.md has the mapping.

Each session entry becomes one session (its key mapped by `map_key`), the live branch
of its transcript one message per entry, written with the session in one write
transaction. Re-running imports only what is new; a damaged file or line is reported
by path and line number and the rest goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from aisopod_session.enums import PeerKind, Role, SessionStatus
from aisopod_session.errors import SessionStoreError
from aisopod_session.keys import MAX_KEY_PART_LENGTH, SessionKey
from aisopod_session.repository import SessionRepository
from aisopod_session.transfer import (
    ImportResult,
    MessageLine,
    SessionLine,
    check_storable,
    first_complaint,
    import_records,
)
from aisopod_session.validation import check_json, encodable

BULKY_FIELDS = ("skillsSnapshot", "systemPromptReport")
"""Entry fields not carried over: prompts and skill lists OpenClaw rebuilds itself."""
DEFAULT_ACCOUNT = "default"
_KINDS = {
    "direct": PeerKind.DM,
    "dm": PeerKind.DM,
    "group": PeerKind.GROUP,
    "channel": PeerKind.CHANNEL,
}
_FAMILIES = ("subagent", "cron", "hook", "acp")
_ARCHIVE = re.compile(
    r"^(?P<file>.+\.jsonl)\.(?P<reason>deleted|reset|bak)\.(?P<at>\d{4}-\d\d-\d\dT[\d.-]+Z)$"
)
_NOT_TRANSCRIPTS = re.compile(r"\.(trajectory|checkpoint\.[^.]+)\.jsonl$")
"""Later OpenClaw builds' other JSONL files beside the transcripts."""
_CONTENT_OF = {"compaction": "summary", "branch_summary": "summary", "custom_message": "content"}
_ROLES = {
    "user": Role.USER,
    "assistant": Role.ASSISTANT,
    "toolResult": Role.TOOL,
    "bashExecution": Role.TOOL,
    "custom": Role.USER,
    "hookMessage": Role.USER,  # v2's name for `custom`
}

Progress = Callable[[int, int], object]
"""Called with the sessions handled so far and their total, after each one."""


@dataclass(frozen=True)
class OpenClawProblem:
    """Something the import could not read or write, by file (and line, 1-based)."""

    path: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.reason}"


@dataclass
class OpenClawImportResult:
    """What `import_openclaw` did (with `dry_run`, would do)."""

    sessions_created: int = 0
    sessions_updated: int = 0
    """Sessions already imported that got new messages, or new metadata."""
    sessions_unchanged: int = 0
    messages_imported: int = 0
    messages_existing: int = 0
    orphans: int = 0
    """Transcripts without an entry in `sessions.json`, imported by their session id."""
    archived_imported: int = 0
    archived_skipped: list[str] = field(default_factory=list)
    """Archived transcripts (`.reset.`, `.deleted.`, `.bak.`) left out, by path."""
    aliases: int = 0
    """Entries naming a transcript another entry imports (a cron job's key beside its
    run's): recorded in that session's metadata (`openclaw.aliases`)."""
    other_branches: int = 0
    """Entries off the live branch of their transcripts (imported in forks)."""
    forks_created: int = 0
    """Sessions made of a branch off a transcript's live branch (see docs/openclaw.md)."""
    problems: list[OpenClawProblem] = field(default_factory=list)
    dry_run: bool = False


# --- keys ---------------------------------------------------------------------------------


def _fit(part: str) -> str:
    """`part` as a key part: control characters and undecodable bytes percent-encoded
    (a key part cannot hold them), itself when it then fits, else a prefix and a digest
    of it."""
    part = "".join(_encoded(char) for char in part).strip() or "unknown"
    if len(part) <= MAX_KEY_PART_LENGTH:
        return part
    digest = hashlib.sha256(part.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{part[:200]}~{digest}"


def _encoded(char: str) -> str:
    if char == "%" or unicodedata.category(char) in ("Cc", "Cs"):
        return "".join(f"%{b:02X}" for b in char.encode("utf-8", "surrogateescape"))
    return char


def map_key(key: str, agent_id: str = "main") -> SessionKey:
    """Our key for an OpenClaw session key (lower-cased, as OpenClaw writes them).

    - `agent:<a>:<channel>[:<account>]:<direct|dm|group|channel>:<peer>`: agent `a`, that
      channel, the account (or `default`), peer kind `dm`, `group` or `channel`;
      a `:thread:<t>` or `:topic:<n>` suffix makes it a `thread` whose peer id is
      `<kind>:<peer>:thread:<t>`.
    - `agent:<a>:direct:<peer>` (no channel): channel `openclaw-direct`.
    - `agent:<a>:<main key>` (every DM collapsed, also `global`): channel
      `openclaw-main`, a `dm` peer named by the main key.
    - `agent:<a>:subagent|cron|hook|acp:<rest>`: channel `openclaw-<family>`, a `thread`
      whose peer id is the rest (`<job>:run:<id>` for a cron run).
    - `hook:<...>` and other keys without `agent:`: the folder's agent `agent_id`.
    - Anything else: channel `openclaw-other`, the key's rest as a `thread`'s peer id.

    A part longer than a key part can be is shortened with a digest (the original key is
    always kept in the session's metadata)."""
    parts = [part for part in key.strip().lower().split(":") if part]
    if len(parts) >= 3 and parts[0] == "agent":
        agent_id, rest = parts[1], parts[2:]
    else:
        rest = parts or ["main"]
    if rest[0] in _FAMILIES:
        peer = ":".join(rest[1:]) or rest[0]
        return _key(agent_id, f"openclaw-{rest[0]}", DEFAULT_ACCOUNT, PeerKind.THREAD, peer)
    if len(rest) == 1:
        return _key(agent_id, "openclaw-main", DEFAULT_ACCOUNT, PeerKind.DM, rest[0])
    at = next((i for i, part in enumerate(rest[:3]) if part in _KINDS and i + 1 < len(rest)), None)
    if at is None:
        return _key(agent_id, "openclaw-other", DEFAULT_ACCOUNT, PeerKind.THREAD, ":".join(rest))
    kind, peer, suffix = rest[at], rest[at + 1], rest[at + 2 :]
    channel = rest[0] if at >= 1 else f"openclaw-{'direct' if kind == 'dm' else kind}"
    account = rest[1] if at == 2 else DEFAULT_ACCOUNT
    if suffix:
        return _key(agent_id, channel, account, PeerKind.THREAD, ":".join([kind, peer, *suffix]))
    return _key(agent_id, channel, account, _KINDS[kind], peer)


def _key(agent: str, channel: str, account: str, kind: PeerKind, peer: str) -> SessionKey:
    return SessionKey(_fit(agent), _fit(channel), _fit(account), kind, _fit(peer))


# --- sources ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Store:
    agent_id: str
    folder: Path


def find_stores(source: Path) -> list[_Store]:
    """The session folders under `source`: an OpenClaw state folder (`agents/*/sessions`),
    one agent's folder (`agents/<id>`), or one `sessions` folder. `ValueError` naming
    `source` if it is none of them."""
    if not source.is_dir():
        raise ValueError(f"source: {source} is not a folder")
    if (source / "agents").is_dir():
        return [
            _Store(agent.name.lower(), agent / "sessions")
            for agent in sorted((source / "agents").iterdir())
            if (agent / "sessions").is_dir()
        ]
    if (source / "sessions").is_dir():
        return [_Store(source.name.lower(), source / "sessions")]
    if (source / "sessions.json").exists() or any(source.glob("*.jsonl")):
        agent = source.parent.name if source.parent.parent.name == "agents" else "main"
        return [_Store(agent.lower(), source)]
    raise ValueError(
        f"source: {source} holds no OpenClaw sessions (expected agents/<id>/sessions, "
        "sessions/, or sessions.json and *.jsonl files)"
    )


def read_entries(
    path: Path, problems: list[OpenClawProblem]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The `(key, entry)` pairs of a `sessions.json`, read one entry at a time (its bulky
    fields dropped), so that a 50 MB file is never held whole. A file that is empty,
    truncated or not an object is reported (with the line where reading stopped) after
    the entries before the damage."""
    decoder = json.JSONDecoder()
    try:
        handle = path.open(encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        problems.append(OpenClawProblem(str(path), None, f"cannot be read: {exc.strerror}"))
        return
    with handle:
        buffer, offset, line = "", 0, 1

        def fill() -> bool:
            nonlocal buffer, offset, line
            chunk = handle.read(1 << 20)
            if not chunk:
                return False
            line += buffer.count("\n", 0, offset)
            buffer = buffer[offset:] + chunk
            offset = 0
            return True

        def skip(chars: str) -> str | None:
            """Skip whitespace and any of `chars`; the next character, None at the end."""
            nonlocal offset
            while True:
                while offset < len(buffer) and (
                    buffer[offset].isspace() or buffer[offset] in chars
                ):
                    offset += 1
                if offset < len(buffer):
                    return buffer[offset]
                if not fill():
                    return None

        def value() -> Any:
            nonlocal offset
            while True:
                try:
                    parsed, end = decoder.raw_decode(buffer, offset)
                except json.JSONDecodeError:
                    if fill():
                        continue
                    raise
                # A number may run on into the next chunk: read on while it ends the buffer.
                if end == len(buffer) and not isinstance(parsed, dict | list | str) and fill():
                    continue
                offset = end
                return parsed

        def report(reason: str) -> None:
            where = line + buffer.count("\n", 0, offset)
            problems.append(OpenClawProblem(str(path), where, reason))

        first = skip("")
        if first is None:
            problems.append(OpenClawProblem(str(path), None, "empty (0 bytes): no entries"))
            return
        if first != "{":
            report("not a JSON object: no entries read")
            return
        offset += 1
        while True:
            nxt = skip(",")
            if nxt is None:
                report("ends before the object is closed (truncated): the entries before are read")
                return
            if nxt == "}":
                return
            try:
                key = value()
                if skip("") != ":":
                    raise json.JSONDecodeError("expected ':'", buffer, offset)
                offset += 1
                skip("")
                entry = value()
            except json.JSONDecodeError as exc:
                report(f"not JSON here ({exc.msg}; truncated?): the entries before are read")
                return
            except RecursionError:
                report("nested too deeply to read: the entries before are read")
                return
            if not isinstance(key, str) or not isinstance(entry, dict):
                report(f"entry {key!r} is not an object: skipped")
                continue
            for name in BULKY_FIELDS:
                entry.pop(name, None)
            yield key, entry


@dataclass
class _Transcript:
    path: Path
    header: dict[str, Any] | None
    live: list[tuple[int, dict[str, Any]]]
    """The live branch's entries (with their line numbers), oldest first."""
    other: int
    """Entries off the live branch."""
    branches: list[_Branch] = field(default_factory=list)
    """The other branches, one per leaf off the live branch, in file order."""


@dataclass
class _Branch:
    leaf: str
    """The id of the branch's last entry."""
    fork_point: str | None
    """The live branch's entry it branched from (None: it shares none)."""
    own: list[tuple[int, dict[str, Any]]]
    """Its entries after the fork point, oldest first."""


class TranscriptChangedError(Exception):
    """A transcript changed between the two passes that read it (OpenClaw wrote or
    repaired it meanwhile)."""


def read_transcript(path: Path, problems: list[OpenClawProblem]) -> _Transcript:
    """A transcript's header, its live branch (from the last entry in the file up its
    `parentId` links; an entry whose parent is missing, after a trim, starts it) and its
    other branches. Two passes over the file; between them only each entry's id, parent
    and line are held, and the second checks each entry is still where the first saw
    it (`TranscriptChangedError` if not). A transcript of format v1 (no entry has an id) is
    one chain in file order. Reported and skipped: lines that are not JSON objects, a
    header after the first entry, entries without an id among entries with ids; an id
    seen twice is reported (the later entry stands for it, as in OpenClaw)."""
    parents: dict[str, tuple[str | None, int]] = {}
    ids_at: dict[int, str | None] = {}
    header: dict[str, Any] | None = None
    last: str | None = None
    anonymous: list[int] = []
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            entry = _json_line(text, path, number, problems)
            if entry is None:
                continue
            if entry.get("type") == "session":
                if header is None and not parents and not anonymous:
                    header = entry
                else:
                    problems.append(OpenClawProblem(str(path), number, "a second header: skipped"))
                continue
            ident = entry.get("id")
            if not isinstance(ident, str):
                anonymous.append(number)
                ids_at[number] = None
                continue
            if ident in parents:
                problems.append(
                    OpenClawProblem(
                        str(path),
                        parents[ident][1],
                        f"id {ident!r} is used again on line {number}: the later entry stands",
                    )
                )
                del ids_at[parents[ident][1]]
            parent = entry.get("parentId")
            parents[ident] = (parent if isinstance(parent, str) else None, number)
            ids_at[number] = ident
            last = ident
    if parents and anonymous:
        for number in anonymous:
            problems.append(OpenClawProblem(str(path), number, "an entry without an id: skipped"))
            del ids_at[number]
        anonymous = []
    wanted: set[int] = set(anonymous)
    if last is not None:
        node: str | None = last
        seen: set[str] = set()
        while node is not None and node in parents and node not in seen:
            seen.add(node)
            parent, number = parents[node]
            wanted.add(number)
            node = parent
    # Every other leaf (an entry no entry names as its parent) ends a branch: its
    # entries run from the leaf up to the first entry on the live branch.
    on_live = {ident for ident, (_, number) in parents.items() if number in wanted}
    named = {parent for parent, _ in parents.values() if parent is not None}
    shapes: list[tuple[str, str | None, list[int]]] = []
    for leaf, _ in sorted(parents.items(), key=lambda item: item[1][1]):
        if leaf in named or leaf in on_live:
            continue
        lines: list[int] = []
        up: str | None = leaf
        seen_here: set[str] = set()
        while up is not None and up in parents and up not in on_live and up not in seen_here:
            seen_here.add(up)
            lines.append(parents[up][1])
            up = parents[up][0]
        shapes.append((leaf, up if up in on_live else None, lines[::-1]))
    needed = wanted | {number for _, _, lines in shapes for number in lines}
    entries: dict[int, dict[str, Any]] = {}
    if needed:
        with path.open(encoding="utf-8-sig", errors="surrogateescape") as handle:
            for number, text in enumerate(handle, start=1):
                if number in needed:
                    entry = _json_line(text, path, number, None)
                    ident = None if entry is None else entry.get("id")
                    now = ident if isinstance(ident, str) else None
                    if entry is None or now != ids_at[number]:
                        raise TranscriptChangedError(f"line {number} changed between two reads")
                    entries[number] = entry
        if len(entries) != len(needed):
            raise TranscriptChangedError("lines went missing between two reads")
    live = [(number, entries[number]) for number in sorted(wanted)]
    branches = [
        _Branch(leaf, point, [(n, entries[n]) for n in lines]) for leaf, point, lines in shapes
    ]
    other = len(parents) + len(anonymous) - len(wanted)
    return _Transcript(path, header, live, other, branches)


def _json_line(
    text: str, path: Path, number: int, problems: list[OpenClawProblem] | None
) -> dict[str, Any] | None:
    try:
        entry = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        if problems is not None:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            problems.append(OpenClawProblem(str(path), number, f"not JSON ({reason}): skipped"))
        return None
    if not isinstance(entry, dict):
        if problems is not None:
            problems.append(OpenClawProblem(str(path), number, "not a JSON object: skipped"))
        return None
    return entry


# --- mapping ------------------------------------------------------------------------------


def _time(value: Any) -> datetime | None:
    """An entry's time: epoch milliseconds, or ISO-8601 text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value / 1000, UTC)
        except (OverflowError, ValueError, OSError):
            return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def entry_message(entry: dict[str, Any], at: datetime, line: int | None = None) -> dict[str, Any]:
    """The message fields of one transcript entry (see docs/openclaw.md): a chat
    message by its role, with its content (blocks kept; a shell run's output) and its
    assistant's tool calls; a compaction or branch summary as a `system` message holding
    the summary; a custom message as the user's; any other entry as a `system` message
    without content. The metadata keeps the rest of the entry under `openclaw.entry`
    (with its id, type and times also beside it, for queries), from which
    `rebuild_entry` gives the entry back; an entry without an id also keeps its `line`,
    so that two equal ones stay two messages."""
    kind = entry.get("type")
    rest = dict(entry)
    content: Any = None
    content_field: str | None = None
    tool_calls: Any = None
    role = Role.SYSTEM
    if kind == "message" and isinstance(rest.get("message"), dict):
        message = dict(rest["message"])
        role = _ROLES.get(str(message.get("role")), Role.SYSTEM)
        name = "content" if "content" in message else "output" if "output" in message else None
        if name is not None:
            content, content_field = message.pop(name), f"message.{name}"
        rest["message"] = message
        if isinstance(content, list):
            calls = [b for b in content if isinstance(b, dict) and b.get("type") == "toolCall"]
            tool_calls = calls or None
        stamp = _time(message.get("timestamp"))
        if stamp is not None:
            at = stamp
    elif kind in _CONTENT_OF and _CONTENT_OF[kind] in rest:
        content_field = _CONTENT_OF[kind]
        content = rest.pop(content_field)
        role = Role.USER if kind == "custom_message" else Role.SYSTEM
    stored: dict[str, Any] = {
        "entry_id": entry.get("id"),
        "parent_id": entry.get("parentId"),
        "type": kind,
        "timestamp": entry.get("timestamp"),
        "content_field": content_field,
        "entry": rest,
    }
    if not isinstance(entry.get("id"), str) and line is not None:
        stored["line"] = line
    return {
        "role": role,
        "content": content,
        "tool_calls": tool_calls,
        "metadata": {"openclaw": stored},
        "created_at": at,
    }


def rebuild_entry(content: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """The transcript entry a message imported by `entry_message` came from, exactly."""
    stored = meta["openclaw"]
    entry: dict[str, Any] = json.loads(json.dumps(stored["entry"]))
    field_name = stored["content_field"]
    if field_name is not None and field_name.startswith("message."):
        entry["message"][field_name.removeprefix("message.")] = content
    elif field_name is not None:
        entry[field_name] = content
    return entry


# --- import -------------------------------------------------------------------------------


@dataclass
class _Planned:
    store: _Store
    key_text: str | None
    """The entry's OpenClaw key; None for an orphan or archived transcript."""
    entry: dict[str, Any]
    transcript: Path | None
    status: SessionStatus = SessionStatus.ACTIVE
    aliases: list[str] = field(default_factory=list)


def import_openclaw(
    source: str | os.PathLike[str],
    repository: SessionRepository,
    *,
    agents: list[str] | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    archived: bool = False,
) -> OpenClawImportResult:
    """Import the OpenClaw sessions under `source` (see `find_stores`) into the store.

    Every entry of every agent's `sessions.json` (of `agents` only, if given) becomes
    one session, and every transcript without an entry (an orphan) one too, keyed by its
    session id; archived transcripts (`.reset.`, `.deleted.`, `.bak.`) are imported as
    `archived` sessions with `archived=True`, else listed in `archived_skipped`. Each
    session is written with its messages in one write transaction. Importing again adds
    only new entries (a session whose live branch no longer holds the last entry
    imported is reported, not changed). A damaged file or line is reported in
    `problems` by path and line and the rest goes on. With `dry_run`, nothing is
    written and the counts say what would be. `ValueError` naming `source` or `agents`
    for a source with no OpenClaw sessions or an agent that is not there."""
    root = Path(source)
    stores = find_stores(root)
    if agents is not None:
        wanted = {agent.lower() for agent in agents}
        missing = sorted(wanted - {store.agent_id for store in stores})
        if missing:
            raise ValueError(f"agents: no sessions folder for {', '.join(missing)} under {root}")
        stores = [store for store in stores if store.agent_id in wanted]
    result = OpenClawImportResult(dry_run=dry_run)
    plans = [plan for store in stores for plan in _plan(store, result, archived)]
    for done, plan in enumerate(plans, start=1):
        where = str(plan.transcript or plan.store.folder / "sessions.json")
        try:
            _import_one(plan, repository, result, dry_run)
        except TranscriptChangedError as exc:
            result.problems.append(
                OpenClawProblem(where, None, f"{exc} (OpenClaw wrote it meanwhile): run again")
            )
        except (ValueError, RecursionError, OSError, SessionStoreError) as exc:
            # One session's failure (an input no check foresaw, a store error such as
            # another import's session created meanwhile) is reported; the rest goes on.
            result.problems.append(
                OpenClawProblem(where, None, f"not imported: {type(exc).__name__}: {exc}")
            )
        if progress is not None:
            progress(done, len(plans))
    return result


def _plan(store: _Store, result: OpenClawImportResult, archived: bool) -> list[_Planned]:
    """The sessions to import from one sessions folder, entries first, then orphans and
    archives; entries naming one transcript are imported once, under the longest key."""
    plans: dict[str, _Planned] = {}
    by_file: dict[Path, _Planned] = {}
    store_file = store.folder / "sessions.json"
    entries = read_entries(store_file, result.problems) if store_file.exists() else iter(())
    for key_text, entry in sorted(entries, key=lambda pair: -len(pair[0])):
        session_id = entry.get("sessionId")
        if not isinstance(session_id, str) or not session_id.strip():
            result.problems.append(
                OpenClawProblem(
                    str(store_file), None, f"entry {key_text!r} has no sessionId: skipped"
                )
            )
            continue
        transcript = _transcript_of(store.folder, session_id, entry.get("sessionFile"))
        if transcript is not None and transcript in by_file:
            by_file[transcript].aliases.append(key_text)
            result.aliases += 1
            continue
        plan = _Planned(store, key_text, entry, transcript)
        plans[key_text] = plan
        if transcript is not None:
            by_file[transcript] = plan
    # The most recently updated first: of two keys that map onto one session (a legacy
    # spelling beside the current one), the current one is imported.
    ordered = sorted(
        plans.values(),
        key=lambda plan: (-_millis(plan.entry.get("updatedAt")), plan.key_text or ""),
    )
    for path in sorted(store.folder.iterdir()):
        if (
            path.suffix == ".jsonl"
            and path.is_file()
            and path not in by_file
            and not _NOT_TRANSCRIPTS.search(path.name)
        ):
            session_id = path.name.removesuffix(".jsonl")
            ordered.append(_Planned(store, None, {"sessionId": session_id}, path))
            result.orphans += 1
            continue
        found = _ARCHIVE.match(path.name)
        if found is None or not path.is_file():
            continue
        if not archived:
            result.archived_skipped.append(str(path))
            continue
        session_id = found["file"].removesuffix(".jsonl")
        entry = {"sessionId": session_id, "archived": found["reason"], "archivedAt": found["at"]}
        ordered.append(_Planned(store, None, entry, path, SessionStatus.ARCHIVED))
        result.archived_imported += 1
    return ordered


def _transcript_of(folder: Path, session_id: str, session_file: Any) -> Path | None:
    """The transcript of an entry: `sessionFile`'s name in the folder, that path itself,
    or `<sessionId>.jsonl`; None if none exists (OpenClaw writes it with the first
    reply)."""
    candidates = []
    if isinstance(session_file, str) and session_file:
        candidates += [folder / Path(session_file).name, Path(session_file)]
    candidates.append(folder / f"{session_id}.jsonl")
    return next((path for path in candidates if path.is_file()), None)


def _import_one(
    plan: _Planned, repository: SessionRepository, result: OpenClawImportResult, dry_run: bool
) -> None:
    entry = plan.entry
    session_id = str(entry["sessionId"])
    if plan.key_text is not None:
        key = map_key(plan.key_text, plan.store.agent_id)
    else:
        family = "openclaw-archive" if plan.status is SessionStatus.ARCHIVED else "openclaw-orphan"
        peer = session_id
        if plan.status is SessionStatus.ARCHIVED:
            peer = f"{session_id}:{entry['archived']}:{entry['archivedAt']}"
        key = _key(plan.store.agent_id, family, DEFAULT_ACCOUNT, PeerKind.THREAD, peer)
    where = str(plan.transcript or plan.store.folder / "sessions.json")
    if repository.agent_id not in (None, key.agent_id):
        result.problems.append(
            OpenClawProblem(
                where, None, f"agent {key.agent_id!r} is outside the repository's scope: skipped"
            )
        )
        return
    transcript = None
    if plan.transcript is not None:
        try:
            transcript = read_transcript(plan.transcript, result.problems)
        except OSError as exc:
            result.problems.append(OpenClawProblem(where, None, f"cannot be read: {exc.strerror}"))
    live = [] if transcript is None else transcript.live
    if transcript is not None:
        result.other_branches += transcript.other
    existing = repository.get(key)
    original = None if plan.key_text is None else _text_of(plan.key_text)
    head = live[-1][1].get("id") if live else None
    new_from = 0
    previous: list[Any] = []
    if existing is not None:
        stored = existing.meta.get("openclaw")
        stored_key = existing.meta.get("openclaw_key")
        if stored_key != original:
            result.problems.append(
                OpenClawProblem(
                    where,
                    None,
                    f"session {key} holds {stored_key!r}, not {original!r} (a key that maps onto "
                    "the same one): skipped",
                )
            )
            return
        imported_head = stored.get("head") if isinstance(stored, dict) else None
        earlier = stored.get("previous_session_ids", []) if isinstance(stored, dict) else []
        previous = list(earlier) if isinstance(earlier, list) else []
        if existing.meta.get("openclaw_session_id") not in (None, session_id):
            # OpenClaw reset the conversation (a new session id under the key): the new
            # one continues the session's history after the old one.
            previous.append(existing.meta.get("openclaw_session_id"))
            imported_head = None
        ids = [item.get("id") for _, item in live]
        if imported_head is not None and imported_head not in ids:
            result.problems.append(
                OpenClawProblem(
                    where,
                    None,
                    f"the live branch no longer holds entry {imported_head!r}, the last one "
                    "imported (the conversation was branched or rewritten since): skipped",
                )
            )
            return
        if imported_head is not None:
            # What the last run imported ends at its head: only the entries after it are
            # new (the session and its head are written in one transaction).
            new_from = ids.index(imported_head) + 1
            result.messages_existing += new_from
    header_time = _time((transcript.header or {}).get("timestamp")) if transcript else None
    updated = _time(entry.get("updatedAt"))
    first_time = _time(live[0][1].get("timestamp")) if live else None
    modified = None
    if plan.transcript is not None:
        modified = datetime.fromtimestamp(plan.transcript.stat().st_mtime, UTC)
    created = header_time or first_time or updated or modified or datetime.now(UTC)
    updated = updated or (_time(live[-1][1].get("timestamp")) if live else None) or created
    compactions = 0
    last_compaction: tuple[datetime, str | None] | None = None
    for _, item in live:
        if item.get("type") == "compaction":
            compactions += 1
            summary = item.get("summary")
            at = _time(item.get("timestamp")) or updated
            last_compaction = (at, summary if isinstance(summary, str) else None)
    messages = _message_lines(live[new_from:], key, updated, where, result, repository)
    written = {number for number, _ in messages}
    refused = next(
        (
            index
            for index, (number, _) in enumerate(live)
            if index >= new_from and number not in written
        ),
        None,
    )
    if refused is not None:
        # The next run starts again from the refused entry (and reports it again).
        head = live[refused - 1][1].get("id") if refused > 0 else None
    entry = _storable_entry(entry, plan, result)
    header = None if transcript is None else transcript.header
    if header is not None:
        header = _storable_entry(header, plan, result, what="the transcript's header")
    meta: dict[str, Any] = {
        "openclaw_key": original,
        "openclaw_session_id": session_id,
        "openclaw": {
            "agent": plan.store.agent_id,
            "entry": entry,
            "transcript": None if plan.transcript is None else plan.transcript.name,
            "header": header,
            "head": head,
            "aliases": [_text_of(alias) for alias in plan.aliases],
            "previous_session_ids": previous,
        },
    }
    counted = entry.get("compactionCount")
    total = _count(entry.get("totalTokens"))
    given_in, given_out = _count(entry.get("inputTokens")), _count(entry.get("outputTokens"))
    session = _session_line(
        key,
        where,
        result,
        created_at=created,
        updated_at=max(updated, created),
        token_usage=max(total, given_in + given_out),
        input_tokens=given_in,
        output_tokens=given_out,
        metadata=meta,
        status=plan.status,
        compaction_count=max(compactions, _count(counted)),
        last_compacted_at=None if last_compaction is None else last_compaction[0],
        last_compaction_summary=None if last_compaction is None else last_compaction[1],
    )
    if session is None:
        return
    if dry_run:
        if existing is None:
            result.sessions_created += 1
            result.messages_imported += len(messages)
        elif existing.meta != meta:
            result.sessions_updated += 1
        else:
            result.sessions_unchanged += 1
    else:
        outcome = _write(repository, session, messages, where, result, refresh=True)
        result.messages_imported += outcome.messages_imported
        result.messages_existing += outcome.messages_existing
        if outcome.sessions_created:
            result.sessions_created += 1
        elif outcome.messages_imported or existing is None or existing.meta != meta:
            result.sessions_updated += 1
        else:
            result.sessions_unchanged += 1
    if transcript is not None:
        name = original if original is not None else session_id
        for branch in transcript.branches:
            _import_branch(repository, result, key, name, session_id, live, branch, where, dry_run)


def _import_branch(
    repository: SessionRepository,
    result: OpenClawImportResult,
    key: SessionKey,
    original: str,
    session_id: str,
    live: list[tuple[int, dict[str, Any]]],
    branch: _Branch,
    where: str,
    dry_run: bool,
) -> None:
    """A branch off the live one as a fork of the session: the live entries up to its
    fork point, then its own, in one write transaction; once (branches do not grow: a
    continued branch ends at a new leaf, another fork)."""
    fork_key = _key(
        key.agent_id,
        key.channel,
        key.account_id,
        key.peer_kind,
        f"{key.peer_id}#branch:{branch.leaf}",
    )
    fork_name = f"{original}#branch:{branch.leaf}"
    existing = repository.get(fork_key)
    if existing is not None:
        if existing.meta.get("openclaw_key") != fork_name:
            result.problems.append(
                OpenClawProblem(
                    where,
                    None,
                    f"session {fork_key} holds another key's branch: {branch.leaf!r} skipped",
                )
            )
        return
    shared: list[tuple[int, dict[str, Any]]] = []
    if branch.fork_point is not None:
        for number, item in live:
            shared.append((number, item))
            if item.get("id") == branch.fork_point:
                break
    entries = [*shared, *branch.own]
    if not entries:
        return
    times = [t for t in (_time(item.get("timestamp")) for _, item in entries) if t is not None]
    created = times[0] if times else datetime.now(UTC)
    messages = _message_lines(entries, fork_key, created, where, result, repository)
    if dry_run:
        result.forks_created += 1
        result.messages_imported += len(messages)
        return
    meta = {
        "openclaw_key": fork_name,
        "openclaw_session_id": session_id,
        "openclaw": {"fork_of": str(key), "fork_point": branch.fork_point, "head": branch.leaf},
    }
    # Its lineage, as `fork` records it: the session, and its message the branch left.
    parent = repository.get(key)
    point = None
    if parent is not None and branch.fork_point is not None:
        point = next(
            (
                message.id
                for message in reversed(repository.get_history(key))
                if _entry_id(message) == branch.fork_point
            ),
            None,
        )
    session = _session_line(
        fork_key,
        where,
        result,
        created_at=created,
        updated_at=max(times) if times else created,
        metadata=meta,
        parent_id=None if parent is None else parent.id,
        forked_from_message_id=point,
    )
    if session is None:
        return
    outcome = _write(repository, session, messages, where, result, lineage=True)
    result.forks_created += outcome.sessions_created
    result.messages_imported += outcome.messages_imported


def _entry_id(message: Any) -> Any:
    """The OpenClaw entry id of a message this import wrote (None for another's)."""
    stored = message.meta.get("openclaw")
    return stored.get("entry_id") if isinstance(stored, dict) else None


def _storable_entry(
    entry: dict[str, Any], plan: _Planned, result: OpenClawImportResult, what: str = ""
) -> dict[str, Any]:
    """The entry (or header) without the fields the store cannot hold (a NaN, an
    integer beyond 64 bits, undecodable text...), each reported by name; the rest is
    kept."""
    kept: dict[str, Any] = {}
    where = str(plan.store.folder / "sessions.json") if not what else str(plan.transcript)
    what = what or f"entry {plan.key_text!r}"
    for name, value in entry.items():
        try:
            check_json("entry", {name: value})
            if not encodable(name) or not encodable(json.dumps(value)):
                raise ValueError("holds text that is not UTF-8")
        except (ValueError, RecursionError) as exc:
            reason = str(exc).splitlines()[0]
            result.problems.append(
                OpenClawProblem(where, None, f"{what}: field {name!r} not kept: {reason}")
            )
            continue
        kept[name] = value
    return kept


def _text_of(text: str) -> str:
    """`text` with undecodable bytes (read as lone surrogates) percent-encoded."""
    if encodable(text):
        return text
    return "".join(_encoded(char) if unicodedata.category(char) == "Cs" else char for char in text)


def _message_lines(
    entries: list[tuple[int, dict[str, Any]]],
    key: SessionKey,
    default: datetime,
    where: str,
    result: OpenClawImportResult,
    repository: SessionRepository,
) -> list[tuple[int, MessageLine]]:
    """The message lines of transcript entries (by line number) for the session `key`;
    an entry the store refuses is reported by its line, the others go on."""
    key_text = str(key)
    lines: list[tuple[int, MessageLine]] = []
    for number, item in entries:
        fields = entry_message(item, _time(item.get("timestamp")) or default, number)
        try:
            line = MessageLine(type="message", session=key_text, **fields)
            check_storable(line, repository.engine)
            lines.append((number, line))
        except ValueError as exc:
            result.problems.append(OpenClawProblem(where, number, f"not imported: {_reason(exc)}"))
    return lines


def _session_line(
    key: SessionKey, where: str, result: OpenClawImportResult, **values: Any
) -> SessionLine | None:
    """The session line for `key` with `values`, or None (reported) if it is refused."""
    try:
        return SessionLine(
            type="session",
            agent_id=key.agent_id,
            channel=key.channel,
            account_id=key.account_id,
            peer_kind=key.peer_kind,
            peer_id=key.peer_id,
            **values,
        )
    except ValueError as exc:
        result.problems.append(
            OpenClawProblem(where, None, f"session not imported: {_reason(exc)}")
        )
        return None


def _write(
    repository: SessionRepository,
    session: SessionLine,
    messages: list[tuple[int, MessageLine]],
    where: str,
    result: OpenClawImportResult,
    *,
    refresh: bool = False,
    lineage: bool = False,
) -> ImportResult:
    """The session and its messages in one write transaction; refusals reported."""
    outcome = ImportResult()
    records: list[tuple[int, SessionLine | MessageLine]] = [(0, session), *messages]
    import_records(repository.engine, records, outcome, refresh=refresh, lineage=lineage)
    for error in outcome.errors:
        result.problems.append(
            OpenClawProblem(where, error.line or None, f"not imported: {error.reason}")
        )
    return outcome


def _millis(value: Any) -> float:
    """An entry's `updatedAt` for ordering (0 when it is not a number)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
        return float(value)
    return 0.0


def _count(value: Any) -> int:
    """A token count from an entry: a non-negative integer, else 0."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    if isinstance(value, float) and value.is_integer() and 0 <= value < 2**63:
        return int(value)
    return 0


def _reason(exc: ValueError) -> str:
    """A refusal as `field: what is wrong` (a validation error's first complaint)."""
    if isinstance(exc, ValidationError):
        return first_complaint(exc, "entry")
    return str(exc)
