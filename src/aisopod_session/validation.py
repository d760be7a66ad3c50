"""The one owner of "`ValueError` naming the field": every check that input is
storable, raised before anything is written, and the stored JSON text those checks
measure (`dump_json`), and the repository's arguments (keys, statuses, summaries, ages,
token counts). Key parts are checked by `keys.py` (the key's own rules), and arguments
that are models (`SessionFilter`, `NewMessage`) by their validators, which call the
checks here, and by `models.as_filter` / `models.as_new_messages`, which make them."""

import inspect
import json
import math
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from aisopod_session.enums import Role, SessionStatus
from aisopod_session.keys import SessionKey, normalize_key_part, parse_enum

JSONValue: TypeAlias = str | int | float | bool | list[Any] | dict[str, Any] | None
"""What a message's `content` and `tool_calls` may be: any JSON value (a `tuple` is
taken as a list)."""

MAX_JSON_DEPTH = 64
"""How deep metadata and tool calls may nest; deeper values are refused as input."""

MAX_TEXT_BYTES = 256 * 1024 * 1024
"""The most UTF-8 bytes one stored text value may take: a message's content, a compaction
summary, the JSON text of tool calls or of metadata. Larger values are refused as input
(`ValueError` naming the field). Well inside SQLite's own limit (10⁹ bytes per row) and
PostgreSQL's (1 GiB per value and per message), with room for a message's other columns."""


def dump_json(value: Any) -> str:
    """Compact JSON text, as the Rust crate writes it (`serde_json::to_string`): no spaces,
    non-ASCII as UTF-8; NaN and Infinity are refused because JSON has no such values."""
    return _encode(value)


# One encoder for every write: `json.dumps` with options builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


_LONG_TEXT = MAX_TEXT_BYTES // 8
"""Strings up to this many characters fit the limit whatever they hold (six bytes a
character at most as JSON); longer ones are measured."""

_MAX_INTEGER = 2**63 - 1
"""The largest integer stored: SQLite's INTEGER (and JSON integers read back exactly by
its JSON functions) are signed 64-bit values."""


def check_json(field: str, value: Any, path: str | None = None, depth: int = 1) -> Any:
    """Return `value` if it stores and reads back unchanged as JSON, else `ValueError`
    naming `field`, and the failing value's place from `path` (`field` by default) on.
    `depth`: how deep `value` itself sits in the stored JSON (1: it is the whole of it).

    Allowed: dicts with string keys, lists and tuples (read back as lists), strings
    without lone surrogates, integers that fit in 64 signed bits, finite floats, booleans
    and None, nested at most `MAX_JSON_DEPTH` deep.
    """
    if _plainly_valid(value, depth):
        return value
    # Something is wrong, or of a subclass the quick walk does not judge: walk again,
    # keeping the path of every value, to accept it or to say exactly where it fails.
    stack: list[tuple[Any, int, str]] = [(value, depth, field if path is None else path)]
    while stack:
        item, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{field}: nested deeper than {MAX_JSON_DEPTH} levels at {path}")
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, int):
            # SQLite's JSON functions (and most JSON readers) turn wider integers into
            # floats, and Python cannot even print ones of over 4300 digits.
            if not -_MAX_INTEGER - 1 <= item <= _MAX_INTEGER:
                raise ValueError(f"{field}: the integer at {path} does not fit in 64 bits")
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"{field}: {item} at {path} is not a JSON number")
        elif isinstance(item, str):
            _check_encodable(field, item, path)
            if len(item) > _LONG_TEXT and (size := 2 + _utf8_size(item)) > MAX_TEXT_BYTES:
                raise ValueError(f"{field}: the text at {path} {_too_large(size, at_least=True)}")
        elif isinstance(item, dict):
            for name, child in item.items():
                if not isinstance(name, str):
                    raise ValueError(f"{field}: key {name!r} at {path} is not a string")
                _check_encodable(field, name, path)
                stack.append((child, depth + 1, _member(path, name)))
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(item))
        else:
            raise ValueError(f"{field}: {type(item).__name__} at {path} is not JSON-serialisable")
    return value


def _member(path: str, name: str) -> str:
    """The path of `name` inside the object at `path`, for an error message: `.name`,
    or `["…"]` with JSON escapes when the key is empty or holds characters that would
    not print (a newline would break the message's one line)."""
    if name.isprintable() and name and "." not in name and "[" not in name:
        return f"{path}.{name}"
    return f"{path}[{json.dumps(name)}]"


def _plainly_valid(item: Any, depth: int) -> bool:
    """True if `item` passes `check_json`, judged quickly: exact built-in types only,
    no paths kept. False means "walk again" (it may still be valid: an `IntEnum`, a
    `dict` subclass). Recursion stops at the depth limit, so hostile nesting cannot
    exhaust the stack."""
    if depth > MAX_JSON_DEPTH:
        return False
    kind = type(item)
    if kind is str:
        # A huge string goes through the walk, which refuses one that alone is too large.
        return len(item) <= _LONG_TEXT and (item.isascii() or encodable(item))
    if item is None or kind is bool:
        return True
    if kind is int:
        return bool(-_MAX_INTEGER - 1 <= item <= _MAX_INTEGER)
    if kind is float:
        return math.isfinite(item)
    if kind is dict:
        for name, child in item.items():
            if type(name) is not str or not (name.isascii() or encodable(name)):
                return False
            if not _plainly_valid(child, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        return all(_plainly_valid(child, depth + 1) for child in item)
    return False


def encodable(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (it holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_encodable(field: str, value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{field}: text at {path} holds a lone surrogate {value[exc.start]!r} "
            f"at position {exc.start}, which cannot be stored"
        ) from None


def check_content(value: Any, field: str = "content") -> JSONValue:
    """`value` if it is a JSON value that can be stored, else `ValueError` naming
    `field`. A `str` is returned as it is; a tuple anywhere becomes a list."""
    if type(value) is str:
        if not value.isascii():
            _check_encodable(field, value, field)
        if len(value) > _LONG_TEXT:
            _check_string_size(field, value)
        return value
    found: JSONValue = _normalised(check_json(field, value))
    return found


def check_tool_calls(value: Any, field: str = "tool_calls") -> JSONValue:
    """`value` if it is None or a JSON value that can be stored, else `ValueError`."""
    if value is None:
        return None
    found: JSONValue = _normalised(check_json(field, value))
    return found


def check_message_meta(value: Any, field: str = "meta") -> dict[str, Any] | None:
    """`value` as a dict if it is None or a JSON object that can be stored, else
    `ValueError` naming `field`."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{field}: must be a JSON object (dict) or None, not {type(value).__name__}"
        )
    found = _normalised(check_json(field, dict(value)))
    assert isinstance(found, dict)
    return found


def _normalised(value: Any) -> Any:
    """`value` as JSON reads it back: tuples become lists (only values that hold one are
    copied)."""
    if isinstance(value, tuple):
        return [_normalised(item) for item in value]
    if isinstance(value, list):
        items = [_normalised(item) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if isinstance(value, dict):
        pairs = {name: _normalised(item) for name, item in value.items()}
        return value if all(pairs[n] is v for n, v in value.items()) else pairs
    return value


def check_text_size(field: str, text: str) -> str:
    """`text` (already known to encode) if it fits `MAX_TEXT_BYTES`, else `ValueError`
    naming `field`."""
    if len(text) > MAX_TEXT_BYTES // 4:
        size = _utf8_size(text)
        if size > MAX_TEXT_BYTES:
            raise ValueError(f"{field}: {_too_large(size)}")
    return text


def _check_string_size(field: str, text: str) -> None:
    """`ValueError` naming `field` if `text`'s JSON text is larger than `MAX_TEXT_BYTES`.
    That text takes at least the string's UTF-8 bytes and two quotes, and at most six
    bytes a character (`\\u001f`): only between those bounds is it built to be measured,
    so a string far over the limit is refused without copying it."""
    floor = 2 + _utf8_size(text)
    if floor > MAX_TEXT_BYTES:
        raise ValueError(f"{field}: {_too_large(floor, at_least=True)}")
    if 2 + 6 * len(text) > MAX_TEXT_BYTES:
        check_text_size(field, dump_json(text))


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _too_large(size: int, *, at_least: bool = False) -> str:
    takes = "takes at least" if at_least else "takes"
    return f"{takes} {size:,} bytes of UTF-8; the store keeps at most {MAX_TEXT_BYTES:,} per value"


def stored_json(field: str, value: Any) -> str:
    """The stored JSON text of a value already checked (`check_content` and friends),
    `ValueError` naming `field` if it is larger than `MAX_TEXT_BYTES`."""
    return check_text_size(field, dump_json(value))


def escaped_nul(text: str) -> bool:
    """Whether JSON text holds the escape `\\u0000` (a NUL inside a string), which
    PostgreSQL's `jsonb` refuses (an escaped backslash before `u0000` is not one)."""
    start = text.find("\\u0000")
    while start != -1:
        backslashes = len(text[:start]) - len(text[:start].rstrip("\\"))
        if backslashes % 2 == 0:
            return True
        start = text.find("\\u0000", start + 1)
    return False


def first_nul(value: Any) -> str | None:
    """The path of the first string holding a NUL character inside a JSON value (keys
    too), or None: PostgreSQL's `jsonb` cannot hold `\\u0000`, so `content::jsonb`
    would fail on such a cell."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return path
        elif isinstance(item, dict):
            for name, child in item.items():
                if "\x00" in name:
                    return path
                stack.append((child, _member(path, name)))
        elif isinstance(item, list | tuple):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
    return None


def check_int(field: str, value: Any, *, minimum: int | None) -> None:
    """`ValueError` naming `field` unless `value` is an `int` (not a `bool`) of at least
    `minimum` that fits in 64 signed bits."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: must be an integer, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{field}: must be >= {minimum}, got {value}")
    if not -_MAX_INTEGER - 1 <= value <= _MAX_INTEGER:
        raise ValueError(f"{field}: must fit in a 64-bit signed integer, got {value}")


def check_callback(field: str, value: Any) -> None:
    """`ValueError` naming `field` unless `value` is callable and not a coroutine or
    generator function: callbacks run inside a write transaction, on a thread that
    cannot await, and an unawaited coroutine would be taken for a true answer."""
    if not callable(value):
        raise ValueError(f"{field}: must be callable, not {type(value).__name__}")
    if _asynchronous(value) or _asynchronous(type(value).__call__):
        raise ValueError(
            f"{field}: must be a plain function, not a coroutine or generator function (it "
            "runs inside the write transaction, which cannot await)"
        )


def _asynchronous(function: Any) -> bool:
    return (
        inspect.iscoroutinefunction(function)
        or inspect.isasyncgenfunction(function)
        or inspect.isgeneratorfunction(function)
    )


def callback_answer(field: str, answer: Any) -> Any:
    """`answer`, what the `field` callback returned, unless it is awaitable or a
    generator (a function that returns a coroutine without being a coroutine function):
    `ValueError` naming `field`, raised inside the transaction, so nothing is written."""
    if inspect.isawaitable(answer) or inspect.isasyncgen(answer) or inspect.isgenerator(answer):
        if inspect.iscoroutine(answer) or inspect.isgenerator(answer):
            answer.close()  # never run, and never to be: no RuntimeWarning about it
        raise ValueError(
            f"{field}: returned an awaitable or a generator; it must answer at once (it "
            "runs inside the write transaction, which cannot await)"
        )
    return answer


_EPOCH = datetime(1, 1, 2, tzinfo=UTC)


def check_age(field: str, age: timedelta) -> None:
    """`ValueError` naming `field` for an age reaching back before the year 1, which no
    datetime can hold."""
    if age >= datetime.now(UTC) - _EPOCH:
        raise ValueError(f"{field}: {age!r} reaches back before the year 1")


# --- the repository's arguments -----------------------------------------------------------


def as_key(key: Any) -> SessionKey:
    """`key` as a `SessionKey`: one already, or its text form (`SessionKey.parse`, whose
    errors name the part); else `ValueError` naming `key`."""
    if isinstance(key, SessionKey):
        return key
    if isinstance(key, str):
        return SessionKey.parse(key)
    raise ValueError(f"key: must be a SessionKey or its text form, not {type(key).__name__}")


def check_agent_id(agent_id: Any) -> str:
    """`agent_id` normalised as `SessionKey.agent_id` is, else `ValueError` naming it."""
    try:
        return normalize_key_part(agent_id, lower=True)
    except ValueError as exc:
        raise ValueError(f"agent_id: {exc}") from None


def check_status(status: Any) -> SessionStatus:
    """`status` as a `SessionStatus` (its value in any case), else `ValueError` naming
    `status`."""
    try:
        return parse_enum(SessionStatus, status)
    except ValueError as exc:
        raise ValueError(f"status: {exc}") from None


def check_changes(changes: Any, field: str = "changes") -> dict[str, Any]:
    """Metadata (or changes to it): a mapping with string keys holding JSON values, as a
    `dict`; else `ValueError` naming `field` (and the place inside it)."""
    if not isinstance(changes, Mapping):
        raise ValueError(f"{field}: must be a mapping, not {type(changes).__name__}")
    return dict(check_json(field, dict(changes)))


def check_summary(summary: Any) -> str:
    """A compaction summary: text that can be stored and is not empty or only
    whitespace; else `ValueError` naming `summary`."""
    if not isinstance(summary, str):
        raise ValueError(f"summary: must be text, not {type(summary).__name__}")
    check_content(summary, "summary")
    if not summary.strip():
        raise ValueError("summary: must not be empty or only whitespace")
    return summary


def check_idle_for(idle_for: Any) -> timedelta:
    """A positive `timedelta` that reaches back no further than the year 1; else
    `ValueError` naming `idle_for`."""
    if not isinstance(idle_for, timedelta) or idle_for <= timedelta(0):
        raise ValueError(f"idle_for: must be a positive timedelta, got {idle_for!r}")
    check_age("idle_for", idle_for)
    return idle_for


def check_aware(field: str, value: Any) -> datetime:
    """A timezone-aware `datetime` that has a UTC time (the store's form: 9999-12-31
    23:59 at -23:59 has none), else `ValueError` naming `field`."""
    if not isinstance(value, datetime):
        raise ValueError(f"{field}: must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{field}: must be timezone-aware")
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{field}: {value.isoformat()} is out of range in UTC") from None
    return value


def ago(field: str, now: datetime, age: timedelta) -> datetime:
    """`now - age`, or `ValueError` naming `field` if that is before the year 1."""
    try:
        return now - age
    except OverflowError:
        raise ValueError(f"{field}: {age!r} reaches back before the year 1") from None


def check_token_counts(tokens: Any, input_tokens: Any, output_tokens: Any) -> tuple[int, int, int]:
    """What an append adds to `token_usage`, `input_tokens` and `output_tokens`: each an
    int >= 0, their sum within 64 bits; else `ValueError` naming the argument."""
    check_int("tokens", tokens, minimum=0)
    check_int("input_tokens", input_tokens, minimum=0)
    check_int("output_tokens", output_tokens, minimum=0)
    total = tokens + input_tokens + output_tokens
    if total > _MAX_INTEGER:
        raise ValueError(
            f"tokens: tokens + input_tokens + output_tokens is {total}, more than "
            f"{_MAX_INTEGER}, the largest count the store keeps"
        )
    return total, input_tokens, output_tokens


def refuse_nul(field: str, value: Any) -> None:
    """`ValueError` naming `field` (and the place inside a JSON value) if a string in
    `value` holds NUL, for PostgreSQL: its text cannot hold it, nor its `jsonb` the
    escape `\\u0000` that JSON text would carry, so `content::jsonb` would fail."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(
                f"{field}: holds a NUL character at {value.index(chr(0))}, which "
                "PostgreSQL cannot store (SQLite can)"
            )
        return
    path = first_nul(value)
    if path is not None:
        raise ValueError(
            f"{field}: the string at {field}{path} holds a NUL character, which "
            "PostgreSQL cannot store (SQLite can)"
        )


# --- search and filters -------------------------------------------------------------------

MAX_QUERY_CHARS = 100_000
"""The longest search query `search_messages` takes (`ValueError` naming `query` beyond)."""
MAX_QUERY_WORDS = 4_096
"""The most words the distinct terms of a search query may hold (`ValueError` naming
`query` beyond): PostgreSQL makes a query tree as deep as a phrase is long, and refuses
one of some 15 000 words as deeper than its stack. Words are counted so that the count
is never below either database's (`_words`)."""


def search_terms(query: Any) -> list[str]:
    """The terms of a search query, each to be matched as a phrase: `"quoted text"` is
    one term, every other run of non-space characters another; a quote left open runs
    to the end. Every character is taken literally (the databases' query syntax never
    sees the text: each term is passed as a quoted phrase or a parameter); NUL separates
    terms like a space. A query without terms (empty, only spaces) has none. `ValueError`
    naming `query` for a non-string or a query over `MAX_QUERY_CHARS`."""
    if not isinstance(query, str):
        raise ValueError(f"query: must be text, not {type(query).__name__}")
    if len(query) > MAX_QUERY_CHARS:
        raise ValueError(f"query: {len(query)} characters, more than {MAX_QUERY_CHARS}")
    text = query.replace("\x00", " ")
    terms: list[str] = []
    for index, part in enumerate(text.split('"')):
        if index % 2:  # inside quotes: one phrase
            if part.strip():
                terms.append(" ".join(part.split()))
        else:
            terms.extend(part.split())
    # A term given twice asks nothing more; fewer terms keep the query's tree shallow.
    distinct = list(dict.fromkeys(terms))
    words = sum(_words(term) for term in distinct)
    if words > MAX_QUERY_WORDS:
        raise ValueError(f"query: {words} words (in distinct terms), more than {MAX_QUERY_WORDS}")
    return distinct


def _words(term: str) -> int:
    """How many words `term` holds, counted so that neither database's parser finds
    more: runs of letters, decimal digits and marks, and each other character that is
    neither a space nor ASCII punctuation (`²`, a Roman numeral, an emoji) as a word of
    its own, which one parser may take as part of a word and the other as a break."""
    count = 0
    inside = False
    for character in term:
        if (
            character.isalpha()
            or character.isdecimal()
            or unicodedata.category(character).startswith("M")
        ):
            # Letters, digits and the marks written on them (vowel signs, accents).
            count += not inside
            inside = True
        else:
            inside = False
            count += not (character.isspace() or character.isascii())
    return count


def check_roles(roles: Any) -> tuple[Role, ...] | None:
    """A `roles` argument: None (every role), one `Role` (or its name), or a non-empty
    collection of them; else `ValueError` naming `roles`."""
    if roles is None:
        return None
    if isinstance(roles, str):
        roles = (roles,)
    if isinstance(roles, Mapping) or not isinstance(roles, Iterable):
        raise ValueError(
            f"roles: must be a Role or a collection of them, not {type(roles).__name__}"
        )
    found: list[Role] = []
    for role in roles:
        try:
            member = parse_enum(Role, role)
        except ValueError as exc:
            raise ValueError(f"roles: {exc}") from None
        if member not in found:
            found.append(member)
    if not found:
        raise ValueError("roles: must name at least one role (None for every role)")
    return tuple(found)


def check_meta_filter(meta: Any) -> dict[str, Any] | None:
    """`SessionFilter.meta`: a mapping of top-level metadata keys (strings) to the JSON
    values they must hold; an empty one is no condition (None). Else `ValueError`
    naming `meta` and the place inside it."""
    if meta is None:
        return None
    if not isinstance(meta, Mapping):
        raise ValueError(f"meta: must be a mapping, not {type(meta).__name__}")
    value = dict(check_json("meta", dict(meta)))
    # PostgreSQL's jsonb cannot hold a NUL: refused on both databases, so a filter means
    # the same on each.
    path = first_nul(value)
    if path is not None:
        raise ValueError(f"meta: the string at meta{path} holds a NUL character")
    check_text_size("meta", dump_json(value))
    return value or None


def check_page_limit(limit: Any) -> int:
    """A page size: an int >= 1; else `ValueError` naming `limit`."""
    check_int("limit", limit, minimum=1)
    return int(limit)
