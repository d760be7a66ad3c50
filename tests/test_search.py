"""Full-text search over history (`search_messages`): which text is searched, how a
query matches, filters and confinement, hits gone as soon as their messages are, hostile
query text, rows written by others, and the index built for a store's existing rows."""

from __future__ import annotations

import sqlite3
import sys
import unicodedata
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine

from aisopod_session import (
    SNIPPET_MARKS,
    NewMessage,
    Role,
    SearchHit,
    SessionKey,
    SessionRepository,
    open_database,
)
from aisopod_session.validation import MAX_QUERY_WORDS, _words, search_terms
from tests.dbtools import before_io, no_statements, run_sql
from tests.test_hostile_input import examples

OPEN, CLOSE = SNIPPET_MARKS
ALICE = SessionKey("agent-1", "telegram", "bot-A", "dm", "alice")
BOB = SessionKey("agent-1", "slack", "T1", "channel", "bob")
OTHER = SessionKey("agent-2", "telegram", "bot-A", "dm", "alice")


@pytest.fixture
def repo(store_repo: SessionRepository) -> SessionRepository:
    """SQLite and PostgreSQL, sync and async API (see conftest)."""
    return store_repo


def ids(hits: list[SearchHit]) -> list[int]:
    return [hit.message.id or 0 for hit in hits]


def test_every_plain_word_must_match_in_any_order_and_case(repo: SessionRepository) -> None:
    repo.get_or_create(ALICE)
    both = repo.append_message(ALICE, Role.USER, "Book a table for two in Oslo tomorrow")
    repo.append_message(ALICE, Role.ASSISTANT, "Which restaurant in Bergen?")
    repo.append_message(ALICE, Role.USER, "a TABLE, please")
    assert ids(repo.search_messages("oslo TABLE")) == [both.id]
    assert ids(repo.search_messages("tomorrow oslo book")) == [both.id]
    assert len(repo.search_messages("table")) == 2
    assert repo.search_messages("oslo bergen") == []


def test_a_quoted_phrase_matches_its_words_together_in_order(repo: SessionRepository) -> None:
    repo.get_or_create(ALICE)
    together = repo.append_message(ALICE, Role.USER, "I live in New York now")
    repo.append_message(ALICE, Role.USER, "York is not new to me")
    assert ids(repo.search_messages('"new york"')) == [together.id]
    assert len(repo.search_messages("new york")) == 2
    assert ids(repo.search_messages('"new york" live')) == [together.id]
    assert repo.search_messages('"york new"') == []


def test_a_hit_carries_its_message_key_snippet_and_rank_best_first(
    repo: SessionRepository,
) -> None:
    repo.get_or_create(ALICE)
    repo.get_or_create(BOB)
    once = repo.append_message(ALICE, Role.USER, "pizza " + "filler words here " * 20)
    often = repo.append_message(BOB, Role.ASSISTANT, "pizza pizza pizza, more pizza")
    hits = repo.search_messages("pizza")
    assert ids(hits) == [often.id, once.id]  # more of the word in less text ranks higher
    assert hits[0].rank >= hits[1].rank
    assert (hits[0].key, hits[1].key) == (BOB, ALICE)
    assert hits[0].message == often
    assert f"{OPEN}pizza{CLOSE}" in hits[0].snippet
    assert hits[1].snippet.startswith(f"{OPEN}pizza{CLOSE}")
    assert len(hits[1].snippet) < len(str(once.content))  # cut around the hit
    assert repo.search_messages("pizza", limit=1) == hits[:1]
    assert repo.search_messages("pizza", limit=0) == []


def test_the_searched_text_is_string_content_or_the_strings_of_text_blocks(
    repo: SessionRepository,
) -> None:
    repo.get_or_create(ALICE)
    found = [
        repo.append_message(ALICE, Role.USER, "alpha in a string"),
        repo.append_message(
            ALICE,
            Role.USER,
            [
                {"type": "text", "text": "alpha in a text block"},
                {"type": "image_url", "image_url": {"url": "https://x/beta.png"}},
                "alpha as a bare string block",
            ],
        ),
        repo.append_message(ALICE, Role.ASSISTANT, {"type": "output_text", "text": "alpha"}),
    ]
    not_searched = [
        repo.append_message(ALICE, Role.TOOL, {"result": "alpha"}),  # no `text` member
        repo.append_message(ALICE, Role.TOOL, 12345),
        repo.append_message(ALICE, Role.TOOL, None),
        repo.append_message(
            ALICE, Role.ASSISTANT, "", tool_calls=[{"name": "alpha"}], meta={"note": "alpha"}
        ),
        repo.append_message(ALICE, Role.USER, [{"type": "text", "text": ["alpha"]}]),
    ]
    assert sorted(ids(repo.search_messages("alpha"))) == [m.id or 0 for m in found]
    assert not set(ids(repo.search_messages("alpha"))) & {m.id for m in not_searched}
    assert repo.search_messages("beta") == []  # an image's url is not text
    assert ids(repo.search_messages('"text block" bare')) == [found[1].id]  # one text


def test_filters_roles_and_confinement_narrow_the_hits(repo: SessionRepository) -> None:
    for key in (ALICE, BOB, OTHER):
        repo.get_or_create(key)
    repo.update_metadata(BOB, {"tags": ["vip"], "title": "Oslo trip"})
    mine = repo.append_message(ALICE, Role.USER, "weather report please")
    bobs = repo.append_message(BOB, Role.ASSISTANT, "the weather is fine")
    theirs = repo.append_message(OTHER, Role.USER, "weather again")
    assert sorted(ids(repo.search_messages("weather"))) == [
        mine.id or 0,
        bobs.id or 0,
        theirs.id or 0,
    ]
    assert ids(repo.search_messages("weather", filter={"channel": "slack"})) == [bobs.id]
    assert ids(repo.search_messages("weather", filter={"meta": {"tags": ["vip"]}})) == [bobs.id]
    assert repo.search_messages("weather", filter={"meta": {"tags": "vip"}}) == []
    assert ids(repo.search_messages("weather", roles=["assistant"])) == [bobs.id]
    assert ids(repo.search_messages("weather", roles="USER", filter={"peer_id": "alice"})) in (
        [mine.id, theirs.id],
        [theirs.id, mine.id],
    )
    confined = repo.for_agent("agent-2")
    assert ids(confined.search_messages("weather")) == [theirs.id]
    # The filter cannot widen a confined view.
    assert confined.search_messages("weather", filter={"agent_id": "agent-1"}) == []


def test_deleting_compacting_resetting_and_pruning_remove_hits_at_once(
    repo: SessionRepository,
) -> None:
    for key in (ALICE, BOB, OTHER):
        repo.get_or_create(key)
    repo.append_messages(ALICE, [NewMessage("user", f"kiwi {i}") for i in range(4)])
    repo.append_message(BOB, Role.USER, "kiwi bob")
    repo.append_message(OTHER, Role.USER, "kiwi other")
    assert len(repo.search_messages("kiwi")) == 6
    repo.compact(ALICE, keep_last=1, summary="earlier: fruit talk")
    assert sorted(str(hit.message.content) for hit in repo.search_messages("kiwi")) == [
        "kiwi 3",
        "kiwi bob",
        "kiwi other",
    ]
    assert [hit.key for hit in repo.search_messages("fruit")] == [ALICE]  # the summary
    repo.reset(ALICE)
    assert len(repo.search_messages("kiwi")) == 2
    assert repo.search_messages("fruit") == []
    assert repo.delete(BOB)
    assert [hit.key for hit in repo.search_messages("kiwi")] == [OTHER]
    assert repo.prune(updated_before=repo.now() + timedelta(days=1)) == 2
    assert repo.search_messages("kiwi") == []


HOSTILE_QUERIES = [
    'kiwi OR "',
    "NEAR(kiwi apple)",
    "kiwi AND NOT apple",
    "body:kiwi",
    "{body}: kiwi",
    "kiwi*",
    "^kiwi",
    "+kiwi -apple",
    "(kiwi",
    "kiwi)",
    '""',
    '"""',
    "'kiwi'",
    "kiwi & !apple | <->",
    "kiwi:*",
    "\\kiwi\\",
    "kiwi\x00apple",
    "\x00",
    "",
    " \t\n",
    "%s %(x)s ? :x $1",
    "kiwi; DROP TABLE messages; --",
    "kiwi" + " " * 5000 + "apple",
    "k" * 10_000,
    "kiwi " * 2_000,
]


def test_query_syntax_in_user_text_is_taken_literally_and_never_raises(
    repo: SessionRepository,
) -> None:
    repo.get_or_create(ALICE)
    text = "NEAR(kiwi apple) OR body:kiwi +kiwi -apple"
    kiwi = repo.append_message(ALICE, Role.USER, text)
    for query in HOSTILE_QUERIES:
        assert isinstance(repo.search_messages(query), list), repr(query[:40])
    # FTS5's and tsquery's operators are plain words (NEAR, OR, body) or separators.
    for query in ("NEAR(kiwi apple)", "kiwi OR", "body:kiwi", "+kiwi -apple", 'kiwi OR "'):
        assert ids(repo.search_messages(query)) == [kiwi.id], query
    assert ids(repo.search_messages("kiwi\x00apple")) == [kiwi.id]
    assert ids(repo.search_messages(text)) == [kiwi.id]
    assert repo.search_messages("kiwi AND NOT apple") == []  # AND, NOT: words not in it
    assert repo.search_messages("k" * 10_000) == []
    assert [m.content for m in repo.get_history(ALICE)] == [text]  # nothing was changed


def one_of_each_category() -> str:
    """A character of every Unicode general category but surrogates (which UTF-8 cannot
    encode) and unassigned ones, in code point order."""
    seen: dict[str, str] = {}
    for point in range(sys.maxunicode + 1):
        char = chr(point)
        category = unicodedata.category(char)
        if category not in seen and category not in ("Cs", "Cn"):
            seen[category] = char
    return "".join(seen.values())


EVERY_CATEGORY = one_of_each_category()


def test_a_query_of_every_unicode_category_finds_the_message_holding_it(
    repo: SessionRepository,
) -> None:
    repo.get_or_create(ALICE)
    text = EVERY_CATEGORY.replace("\x00", "")  # PostgreSQL cannot store NUL
    assert len(text) >= 27
    message = repo.append_message(ALICE, Role.USER, f"marker {text} end")
    repo.append_message(ALICE, Role.USER, "marker alone")
    assert ids(repo.search_messages(f"marker {text}")) == [message.id]
    assert ids(repo.search_messages(f'"marker {text} end"')) == [message.id]
    assert ids(repo.search_messages(f"{EVERY_CATEGORY} end")) == [message.id]


@pytest.mark.parametrize("term", ["..", "../x", "./run.sh", "~/projects", "~1", "a..b", ".5", "x."])
def test_a_term_finds_its_message_wherever_it_stands(repo: SessionRepository, term: str) -> None:
    """PostgreSQL's parser reads a token by what surrounds it (`..` alone is a file name,
    after a space nothing; `../x` alone one name, after a space `/x`): a query's term
    finds a message holding it first, in the middle and last (Hypothesis found `zq ..`
    not finding `zq .. qz`)."""
    repo.get_or_create(ALICE)
    first = repo.append_message(ALICE, Role.USER, f"{term} zq qz")
    middle = repo.append_message(ALICE, Role.USER, f"zq {term} qz")
    last = repo.append_message(ALICE, Role.USER, f"zq qz {term}")
    repo.append_message(ALICE, Role.USER, "zq alone")
    assert {first.id, middle.id} <= set(ids(repo.search_messages(f"{term} zq")))
    assert {middle.id, last.id} <= set(ids(repo.search_messages(f"zq {term}")))
    assert middle.id in ids(repo.search_messages(f'"zq {term} qz"'))
    assert first.id in ids(repo.search_messages(f'"{term} zq"'))


@given(query=st.text(st.characters(exclude_categories=["Cs"]), max_size=60))
@examples(40)
def test_any_query_text_runs_and_a_message_holding_it_is_found(
    repo: SessionRepository, query: str
) -> None:
    repo.get_or_create(ALICE)
    if not query.replace("\x00", " ").strip():
        assert repo.search_messages(query) == []  # no word: nothing to find
        return
    content = f"zq {query.replace(chr(0), ' ')} qz"
    message = repo.append_message(ALICE, Role.USER, content)
    hits = repo.search_messages(query, limit=1000)
    assert all(isinstance(hit, SearchHit) for hit in hits)
    found = repo.search_messages(f"zq {query}", limit=1000)
    if query.count('"') % 2 == 0:
        assert message.id in ids(found), repr(query)


@before_io
@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"query": None}, "query"),
        ({"query": 42}, "query"),
        ({"query": b"kiwi"}, "query"),
        ({"query": "k" * 100_001}, "query"),
        ({"query": " ".join(f"w{n}" for n in range(4_097))}, "query"),
        ({"query": '"' + "hi " * 4_097 + '"'}, "query"),
        ({"query": "a-" * 4_097}, "query"),
        ({"query": '"' + "\u2160 " * 4_097 + '"'}, "query"),  # Roman numeral one
        ({"query": "x\u00b2" * 4_097}, "query"),  # superscript two splits words
        ({"query": '"' + "\u0301 " * 4_097 + '"'}, "query"),  # lone marks, a word each
        ({"query": "kiwi", "limit": -1}, "limit"),
        ({"query": "kiwi", "limit": 1.5}, "limit"),
        ({"query": "kiwi", "limit": True}, "limit"),
        ({"query": "kiwi", "roles": "robot"}, "roles"),
        ({"query": "kiwi", "roles": []}, "roles"),
        ({"query": "kiwi", "roles": 3}, "roles"),
        ({"query": "kiwi", "filter": {"meta": "x"}}, "meta"),
        ({"query": "kiwi", "filter": {"meta": {"x": float("nan")}}}, "meta"),
        ({"query": "kiwi", "filter": {"colour": "red"}}, "colour"),
        ({"query": "kiwi", "filter": 7}, "filter"),
    ],
)
def test_bad_arguments_are_refused_naming_the_field_before_any_io(
    repo: SessionRepository, arguments: dict[str, Any], field: str
) -> None:
    with no_statements(), pytest.raises(ValueError, match=field):
        repo.search_messages(**arguments)


def test_words_written_with_marks_count_once_toward_the_limit() -> None:
    """Vowel signs and accents are part of their word, as both databases read them:
    a vocalised Arabic or a decomposed Vietnamese passage of 600 words is far from the
    limit, where counting each mark as a word came near it."""
    arabic = "\u0643\u064e\u062a\u064e\u0628\u064e"  # kataba, with its three vowel signs
    vietnamese = unicodedata.normalize("NFD", "Vi\u1ec7t")
    for word in (arabic, vietnamese):
        assert search_terms(" ".join([word] * 600) + f' "{word} {word}"') != []
        assert _words(" ".join([word] * 600)) == 600


def test_a_query_of_the_most_words_runs_and_finds_its_phrase(repo: SessionRepository) -> None:
    """`MAX_QUERY_WORDS` words in one quoted phrase: PostgreSQL refused about 15 000 as
    a query tree deeper than its stack; repeated terms count once."""
    repo.get_or_create(ALICE)
    words = [f"w{number}" for number in range(MAX_QUERY_WORDS)]
    message = repo.append_message(ALICE, Role.USER, " ".join(words))
    assert ids(repo.search_messages('"' + " ".join(words) + '"')) == [message.id]
    assert ids(repo.search_messages("w1 w2 " * MAX_QUERY_WORDS)) == [message.id]


def test_a_word_too_long_for_postgresql_to_index_finds_nothing_there(
    repo: SessionRepository, store_url: str
) -> None:
    """PostgreSQL leaves a word of over 2 047 bytes out of its index and out of a
    query: a query requiring one finds nothing there, instead of matching without it.
    SQLite indexes it and finds the message holding it."""
    repo.get_or_create(ALICE)
    long_word = "é" * 1_024  # 2 048 bytes of UTF-8
    holding = repo.append_message(ALICE, Role.USER, f"hello {long_word} there")
    repo.append_message(ALICE, Role.USER, "hello world")
    found = ids(repo.search_messages(f"hello {long_word}"))
    assert found == ([] if "://" in store_url else [holding.id])
    assert repo.search_messages(f"world {'x' * 2_048}") == []
    shorter = repo.append_message(ALICE, Role.USER, f"hello {'é' * 1_023}")  # 2 046 bytes
    assert ids(repo.search_messages(f"hello {'é' * 1_023}")) == [shorter.id]
    # PostgreSQL reads a URL (an e-mail address, a path) as one token: too long, it is
    # left out of the query too, which must not then find every message of the host.
    url = "http://example.com/" + "p" * 3_000
    with_url = repo.append_message(ALICE, Role.USER, f"see {url}")
    repo.append_message(ALICE, Role.USER, "see http://example.com/other")
    found = ids(repo.search_messages(url))
    assert found == ([] if "://" in store_url else [with_url.id])
    # Words joined by characters PostgreSQL splits words at (², ½), though Python counts
    # them as word characters: each word is short, and the message is found on both.
    joined = "²".join(f"w{number}" for number in range(500))
    holding_joined = repo.append_message(ALICE, Role.USER, joined)
    assert ids(repo.search_messages(joined)) == [holding_joined.id]


# --- rows written by others, and the index of a store's existing rows -----------------------


def test_rows_written_by_plain_sql_as_the_crate_writes_them_are_found_and_removed(
    repo: SessionRepository, store: Engine
) -> None:
    """The crate's own statements (tests/crate_files.py quotes them): JSON content, a
    compaction that deletes by a subquery, a session deleted by its key."""
    session = repo.get_or_create(ALICE)
    sql = (
        "INSERT INTO messages (session_id, role, content, tool_calls, created_at) "
        "VALUES (?, ?, ?, ?, ?)"
    )
    now = "2026-11-30T12:00:00.000000000+00:00"
    run_sql(store, sql, (session.id, "user", '"mango from rust"', None, now))
    run_sql(store, sql, (session.id, "user", '[{"type":"text","text":"mango block"}]', None, now))
    run_sql(store, sql, (session.id, "user", "mango not json {", None, now))
    assert len(repo.search_messages("mango")) == 3
    assert [hit.message.content for hit in repo.search_messages("rust mango")] == [
        "mango from rust"
    ]
    run_sql(
        store,
        "DELETE FROM messages WHERE session_id = ? AND id IN "
        "(SELECT id FROM messages WHERE session_id = ? ORDER BY id ASC LIMIT ?)",
        (session.id, session.id, 1),
    )
    assert len(repo.search_messages("mango")) == 2
    run_sql(
        store,
        "UPDATE messages SET content = ? WHERE content LIKE ?",
        ('"papaya now"', "%mango block%"),
    )
    assert len(repo.search_messages("mango")) == 1
    assert len(repo.search_messages("papaya")) == 1
    run_sql(
        store,
        "DELETE FROM sessions WHERE agent_id = ? AND channel = ? AND account_id = ? "
        "AND peer_kind = ? AND peer_id = ?",
        ALICE.parts(),
    )
    assert repo.search_messages("mango") == []
    assert repo.search_messages("papaya") == []


def test_the_migration_indexes_a_store_s_existing_messages(store_url: str, tmp_path: Path) -> None:
    from tests.test_migration_3 import version_2_store

    version_2_store(store_url, ["guava one", "two guava", "no fruit", '{"text": "guava"}'])
    engine = open_database(store_url)
    try:
        repo = SessionRepository(engine)
        found = sorted(str(hit.message.content) for hit in repo.search_messages("guava"))
        # Migration 3 made every stored text a JSON string; it is searched as text.
        assert found == ["guava one", "two guava", '{"text": "guava"}']
    finally:
        engine.dispose()


def test_the_sqlite_index_is_an_fts5_table_kept_by_triggers(engine: Engine, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    try:
        found = dict(
            conn.execute("SELECT name, sql FROM sqlite_master WHERE name LIKE 'messages_fts%'")
        )
    finally:
        conn.close()
    assert "fts5" in found["messages_fts"]
    assert {"messages_fts_insert", "messages_fts_delete", "messages_fts_update"} <= set(found)


def test_a_message_of_megabytes_of_distinct_words_is_stored_and_found(
    repo: SessionRepository,
) -> None:
    """PostgreSQL cannot hold a tsvector over 1 MiB: such a message is indexed by its
    start instead of failing its INSERT (SQLite indexes it whole)."""
    repo.get_or_create(ALICE)
    words = " ".join(f"x{number}" for number in range(300_000))  # ~2.3 MB of 300 000 words
    message = repo.append_message(ALICE, Role.TOOL, f"logstart {words} logend")
    assert ids(repo.search_messages("logstart x17")) == [message.id]
    assert repo.get_history(ALICE)[0].content == message.content


def test_ten_thousand_characters_of_distinct_terms_run(repo: SessionRepository) -> None:
    repo.get_or_create(ALICE)
    message = repo.append_message(ALICE, Role.USER, "aa ab ac")
    terms = [
        f"{chr(97 + a)}{chr(97 + b)}{chr(97 + c)}"
        for a in range(26)
        for b in range(26)
        for c in range(4)
    ]
    query = " ".join(terms)[:10_000]
    assert repo.search_messages(query) == []
    assert ids(repo.search_messages("aa ab ac " * 1_100)) == [message.id]  # repeats: one term each
