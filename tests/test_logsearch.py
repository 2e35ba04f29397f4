"""Log search: the query parser, and search() on whichever engine the suite runs on.

The suite runs on SQLite; test_the_same_tests_pass_on_postgresql runs this whole module
again in a subprocess against a throwaway PostgreSQL cluster (tests/postgres.py).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection

from instances.logsearch import (
    MAX_LIMIT,
    MAX_TERMS,
    PG_PUNCTUATION,
    Query,
    SearchError,
    fts5_match,
    parse_query,
    pg_tsquery,
    pg_vector,
    search,
)
from instances.models import Instance, LogLine, Service
from instances.supervisor.logs import LogCollector
from tests import postgres
from tests.conftest import REPO

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(60)]

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs"]
HOSTILE = [
    '"',
    '""',
    '"""',
    '"unbalanced phrase',
    'un"balanced',
    "*",
    "foo*",
    "NEAR(",
    "NEAR(a b, 3)",
    "OR",
    "AND",
    "NOT",
    "a OR b",
    "a AND NOT b",
    "^start",
    "text:foo",
    "instance_id:1",
    "{text stream}: foo",
    "(",
    ")",
    "(a",
    "-",
    "--",
    '-"',
    "-foo",
    "x" * 10_000,
    "a " * 5_000,
    "\x00",
    "a\x00b",
    "\x01\x02\x03\x1b[31m",
    "🚀",
    "🔥 fire",
    "\ud800 lone surrogate",
    "'; DROP TABLE instances_logline; --",
    "%s %(x)s %% %",
    "\\",
    "a:b:c",
    "\u202e reversed",
    "x" * 201,
    "a\tb\nc",
]


@pytest.fixture
def alice() -> Instance:
    return make_instance("alice")


@pytest.fixture
def bob() -> Instance:
    return make_instance("bob")


def make_instance(instance_id: str) -> Instance:
    service, _ = Service.objects.get_or_create(
        name="app", defaults={"command": "true", "data_dir": "/tmp"}
    )
    return Instance.objects.create(service=service, instance_id=instance_id)


def add(instance: Instance, *texts: str, stream: str = "stdout", at: datetime = T0) -> list[int]:
    """Store lines one minute apart from `at`, like the log writer does; their ids."""
    rows = [
        LogLine(instance=instance, stream=stream, time=at + timedelta(minutes=i), text=text)
        for i, text in enumerate(texts)
    ]
    return [row.id for row in LogLine.objects.bulk_create(rows)]


def texts(q: str | None, **kwargs: Any) -> list[str]:
    return [hit.text for hit in search(q, **kwargs)]


def assert_index_consistent() -> None:
    """SQLite: FTS5 checks its index against instances_logline (PostgreSQL's is its own)."""
    if connection.vendor == "sqlite":
        with connection.cursor() as c:
            c.execute(
                "INSERT INTO instances_logline_fts(instances_logline_fts, rank)"
                " VALUES ('integrity-check', 1)"
            )


# -- the parser: pure ----------------------------------------------------------------------


def test_parse_words_phrases_and_exclusions() -> None:
    q = parse_query('error  "connection refused" -timeout -"db 2" error')
    assert q == Query(("error", "connection refused"), ("timeout", "db 2"))


def test_parse_keeps_operators_as_text() -> None:
    assert parse_query("a OR b").include == ("a", "OR", "b")
    assert parse_query("NEAR(a b)").include == ("NEAR(a", "b)")
    assert parse_query("text:foo").include == ("text:foo",)
    assert parse_query('"unclosed phrase').include == ("unclosed phrase",)
    assert parse_query('say "a""b"').include == ("say", "a", "b")


def test_parse_drops_terms_no_engine_indexes() -> None:
    assert parse_query("error * 🚀 -- ( -_").include == ("error",)


def test_parse_turns_control_characters_into_spaces() -> None:
    assert parse_query("a\x00b\x1bc\ud800d").include == ("a", "b", "c", "d")


@pytest.mark.parametrize("q", ["", "   ", "-foo", '-"a b"', "*", '"', "🚀", "\x00"])
def test_parse_needs_something_to_find(q: str) -> None:
    with pytest.raises(SearchError, match="Nothing to search for"):
        parse_query(q)


def test_parse_bounds_terms_and_length() -> None:
    parse_query(" ".join(f"w{i}" for i in range(MAX_TERMS)))
    with pytest.raises(SearchError, match="Too many search terms"):
        parse_query(" ".join(f"w{i}" for i in range(MAX_TERMS + 1)))
    with pytest.raises(SearchError, match="term is too long"):
        parse_query("x" * 201)
    with pytest.raises(SearchError, match="query is too long"):
        parse_query("x " * 5_000)


def test_fts5_expression_is_string_literals_only() -> None:
    q = Query(('a"b', "NEAR(c"), ("OR",))
    assert fts5_match(q) == 'text : (("a""b" AND "NEAR(c") NOT ("OR"))'


def test_index_and_queries_split_words_alike() -> None:
    migration = importlib.import_module("instances.migrations.0003_logline_search")
    assert migration.PG_PUNCTUATION == PG_PUNCTUATION
    assert pg_vector("text") in migration.POSTGRESQL_CREATE[0]


def test_tsquery_takes_user_text_as_parameters_only() -> None:
    sql, params = pg_tsquery(Query(("it's", "a b"), ("c",)))
    assert params == ["it's", "a b", "c"]
    assert "it's" not in sql and sql.count("%s") == 3 and "!!" in sql


# -- search on the suite's engine ----------------------------------------------------------


def test_runs_on_the_engine_asked_for() -> None:
    """Guards the PostgreSQL run: it must not silently fall back to SQLite."""
    assert connection.vendor == os.environ.get("LOGSEARCH_EXPECT_VENDOR", connection.vendor)


def test_words_must_all_match(alice: Instance) -> None:
    add(alice, "connection refused by db", "connection ok", "refused entry")
    assert texts("connection refused") == ["connection refused by db"]
    assert sorted(texts("CONNECTION")) == ["connection ok", "connection refused by db"]
    assert texts("missing") == []


def test_phrase_needs_adjacent_words(alice: Instance) -> None:
    add(alice, "connection refused by db", "refused connection", "connection was refused")
    assert texts('"connection refused"') == ["connection refused by db"]
    assert texts('"refused connection"') == ["refused connection"]


def test_exclusions(alice: Instance) -> None:
    add(alice, "error timeout db1", "error refused db2", "error refused db1", "warning only")
    assert texts("error -timeout", order="newest") == ["error refused db1", "error refused db2"]
    assert sorted(texts('error -"refused db1"')) == ["error refused db2", "error timeout db1"]
    assert texts("error -db1 -db2") == []


def test_operators_in_queries_are_plain_words(alice: Instance) -> None:
    add(alice, "foo alone", "text: foo bar", "a or b", "a only", "near a b")
    assert texts("text:foo") == ["text: foo bar"]  # not a column filter
    assert texts("a OR b") == ["a or b"]  # OR is a word that must be there
    assert texts("NEAR(a b)") == ["near a b"]
    assert sorted(texts('"foo')) == ["foo alone", "text: foo bar"]  # unclosed quote


def test_words_split_at_punctuation_on_every_engine(alice: Instance) -> None:
    add(
        alice,
        '10.0.0.7 "GET /api/notes/4821 HTTP/1.1" 200',
        "KeyError: 'owner' in notes.views.get_note",
        "mail to bob@example.com failed",
        'File "app.py", line 3, in <module>',
        "<script>alert(1)</script>",
        "user_id=42 trimmed-or-kept",
    )
    assert texts("4821") == ['10.0.0.7 "GET /api/notes/4821 HTTP/1.1" 200']
    assert texts("/api/notes/4821") == texts("api notes 4821") == texts("4821")
    assert texts("10.0.0.7") == texts("4821")
    assert texts("views") == ["KeyError: 'owner' in notes.views.get_note"]
    assert texts("example") == ["mail to bob@example.com failed"]
    assert texts("module") == ['File "app.py", line 3, in <module>']
    assert texts("alert") == ["<script>alert(1)</script>"]
    assert texts("user_id") == texts('"id 42"') == ["user_id=42 trimmed-or-kept"]
    assert texts("or") == ["user_id=42 trimmed-or-kept"]
    assert len(texts("notes")) == 2


def test_filters_instance_stream_and_time(alice: Instance, bob: Instance) -> None:
    add(alice, "disk full", "disk ok", at=T0)
    add(alice, "disk warning", stream="stderr", at=T0 + timedelta(hours=1))
    add(bob, "disk full", at=T0 + timedelta(hours=2))
    assert len(texts("disk")) == 4
    on_alice = ["disk full", "disk ok", "disk warning"]
    assert sorted(texts("disk", instance_ids=[alice.pk])) == on_alice
    assert texts("disk", instance_ids=[bob.pk]) == ["disk full"]
    assert texts("disk", instance_ids=[]) == []
    assert texts("disk", stream="stderr") == ["disk warning"]
    assert texts("disk", instance_ids=[bob.pk], stream="stderr") == []
    since, until = T0 + timedelta(minutes=30), T0 + timedelta(hours=2)
    assert texts("disk", since=since, order="newest") == ["disk full", "disk warning"]
    assert texts("disk", until=since, order="newest") == ["disk ok", "disk full"]
    assert texts("disk", since=since, until=until) == ["disk warning"]
    assert texts("disk", since=T0 + timedelta(days=1)) == []
    assert texts(None, since=since, until=until) == ["disk warning"]


def test_time_filters_do_not_assume_ids_follow_time(alice: Instance) -> None:
    """Lines arrive out of time order (clock steps, late flushes): since/until stay exact."""
    for minutes in (30, 10, 50, 20, 40):
        add(alice, f"tick at {minutes}", at=T0 + timedelta(minutes=minutes))
    since, until = T0 + timedelta(minutes=20), T0 + timedelta(minutes=45)
    found = texts("tick", since=since, until=until, order="newest")
    assert found == ["tick at 40", "tick at 20", "tick at 30"]
    assert texts(None, since=since, until=until) == found


def test_many_instance_ids(alice: Instance, bob: Instance) -> None:
    add(alice, "shared word")
    add(bob, "shared word")
    for many in ([bob.pk, *range(10_000, 10_200)], [bob.pk, *range(10_000, 50_000)]):
        assert [h.instance_id for h in search("shared", instance_ids=many)] == [bob.pk]
        assert [h.instance_id for h in search(None, instance_ids=many)] == [bob.pk]


def test_rank_and_newest_orders(alice: Instance) -> None:
    best = add(alice, "panic panic panic")[0]
    middle = add(alice, "panic in a much longer line that says many other things as well")[0]
    newest = add(alice, "something else then panic and more words in this line too")[0]
    assert [h.id for h in search("panic", order="newest")] == [newest, middle, best]
    assert search("panic")[0].id == best


def test_keyset_pagination_newest_first(alice: Instance) -> None:
    ids = add(alice, *(f"page line {i}" for i in range(25)))
    other = add(alice, "unrelated")
    for q, expected in (("page", ids), (None, ids + other)):
        seen, sizes, before = [], [], None
        while page := search(q, order="newest", limit=10, before_id=before):
            seen += [h.id for h in page]
            sizes.append(len(page))
            before = page[-1].id
        assert seen == sorted(expected, reverse=True)
        assert sizes == [10, 10, len(expected) - 20]


def test_limit(alice: Instance) -> None:
    add(alice, *(f"many {i}" for i in range(30)))
    assert len(search("many", limit=7)) == 7
    assert len(search(None, limit=10**9)) == 30  # capped at MAX_LIMIT, not an error
    assert MAX_LIMIT == 1000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"order": "best"}, "order must be one of"),
        ({"stream": "stdin"}, "stream must be one of"),
        ({"limit": 0}, "limit must be"),
        ({"since": datetime(2026, 1, 1)}, "since must include a time zone"),
        ({"until": datetime(2026, 1, 1)}, "until must include a time zone"),
        ({"instance_ids": ["x"]}, "must be integers"),
        ({"before_id": 5}, "before_id pages newest-first results only"),
        ({"before_id": 10**30, "order": "newest"}, "below 2\\*\\*63"),
        ({"instance_ids": [-(2**63)]}, "below 2\\*\\*63"),
    ],
)
def test_bad_arguments_are_search_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SearchError, match=message):
        search("word", **kwargs)


def test_snippets_are_marked_and_escaped(alice: Instance) -> None:
    add(alice, 'user sent <script>alert("pwned")</script> & left', "in <module> Alert raised")
    hits = {h.text: h.snippet for h in search("alert")}
    assert len(hits) == 2
    for snippet in hits.values():
        assert "<script" not in snippet and "<module>" not in snippet
        assert re.sub(r"</?mark>", "", snippet).count("<") == 0
    script = hits['user sent <script>alert("pwned")</script> & left']
    assert "&lt;script&gt;<mark>alert</mark>(&quot;pwned&quot;)&lt;/script&gt; &amp; left" in script
    assert "&lt;module&gt; <mark>Alert</mark> raised" in hits["in <module> Alert raised"]


def test_snippet_of_a_line_holding_the_marker_characters(alice: Instance) -> None:
    add(alice, "odd \x02 bytes \x03 around needle")
    [hit] = search("needle")
    assert hit.snippet.count("<mark>") == hit.snippet.count("</mark>") == 1
    assert "<mark>needle</mark>" in hit.snippet


def test_snippet_of_a_long_line_shows_the_match(alice: Instance) -> None:
    add(alice, "lorem ipsum " * 500 + "the needle is here " + "dolor sit " * 500)
    [hit] = search("needle")
    assert "<mark>needle</mark>" in hit.snippet
    assert len(hit.snippet) < 1000 and "…" in hit.snippet


def test_listing_without_a_query(alice: Instance, bob: Instance) -> None:
    add(alice, "first <b>", "second")
    add(bob, "third")
    hits = search(None)
    assert [h.text for h in hits] == ["third", "second", "first <b>"]
    assert hits[2].snippet == "first &lt;b&gt;"
    assert texts("   ", instance_ids=[alice.pk]) == ["second", "first <b>"]
    assert texts("", stream="stderr") == []


@pytest.mark.parametrize("q", HOSTILE)
def test_hostile_queries_are_literal_or_search_errors(alice: Instance, q: str) -> None:
    add(alice, "a or b", "text: foo", "near a b 3", "fire 🔥", "lone surrogate")
    for order in ("rank", "newest"):
        try:
            hits = search(q, order=order, instance_ids=[alice.pk], stream="stdout")
        except SearchError as e:
            assert str(e).endswith(".")
            continue
        for hit in hits:
            assert re.sub(r"</?mark>", "", hit.snippet).count("<") == 0


def test_the_index_follows_trimming_deletes_and_updates(alice: Instance, bob: Instance) -> None:
    collector = LogCollector()
    collector.retention[alice.pk] = 10
    for i in range(30):
        collector.add(alice.pk, "stdout", f"entry {i} trimmed-or-kept")
    collector._write(collector.buffer)
    kept = LogLine.objects.filter(instance=alice).count()
    assert 10 <= kept <= 11
    assert len(search("trimmed", limit=100)) == kept
    assert texts('"entry 0"') == [] and texts('"entry 29"') == ["entry 29 trimmed-or-kept"]
    add(bob, "secret token abc", "public note")
    LogLine.objects.filter(text__contains="secret").delete()
    assert texts("secret") == [] and texts("public") == ["public note"]
    LogLine.objects.filter(text="public note").update(text="renamed note")
    assert texts("public") == [] and texts("renamed") == ["renamed note"]
    assert_index_consistent()


def test_deleting_an_instance_removes_its_lines_from_search(alice: Instance, bob: Instance) -> None:
    add(alice, "alice only words")
    add(bob, "bob words")
    alice.delete()
    assert texts("words") == ["bob words"]
    assert texts("alice") == []
    assert_index_consistent()


def test_unicode_and_diacritics(alice: Instance) -> None:
    add(alice, "Café au lait", "naïve résumé", "Ошибка соединения", "deploy 🚀 done", "日志 行")
    assert texts("café") == ["Café au lait"]
    assert texts("CAFÉ") == ["Café au lait"]
    assert texts("ошибка") == ["Ошибка соединения"]
    [hit] = search("deploy")
    assert "🚀" in hit.snippet and "<mark>deploy</mark>" in hit.snippet
    # SQLite's tokenizer folds diacritics (remove_diacritics 2); PostgreSQL's 'simple'
    # configuration does not (that would take the unaccent extension).
    folded = ["Café au lait"] if connection.vendor == "sqlite" else []
    assert texts("cafe") == folded


def test_queries_use_the_search_index(alice: Instance) -> None:
    """The engine's plan for a search goes through the index the migration made."""
    add(alice, "indexed needle")
    with captured_sql() as queries:
        assert texts("needle") == ["indexed needle"]
    sql, params = next((s, p) for s, p in queries if "MATCH" in s or "@@" in s)
    with connection.cursor() as c:
        if connection.vendor == "postgresql":
            # A table this small is cheaper to scan: leave the planner only bitmap scans,
            # which the GIN index is the one index here able to drive.
            c.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_indexscan = off")
            c.execute(f"EXPLAIN {sql}", params)
            assert "instances_logline_text_fts" in str(c.fetchall())
        else:
            c.execute(f"EXPLAIN QUERY PLAN {sql}", params)
            assert "VIRTUAL TABLE INDEX" in str(c.fetchall())


@contextmanager
def captured_sql() -> Iterator[list[tuple[str, Any]]]:
    queries: list[tuple[str, Any]] = []

    def capture(execute: Callable[..., Any], sql: str, params: Any, many: bool, ctx: Any) -> Any:
        queries.append((sql, params))
        return execute(sql, params, many, ctx)

    with connection.execute_wrapper(capture):
        yield queries


def test_other_engines_fall_back_to_substring_search(
    alice: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    add(alice, "Connection refused <x>", "connection ok", "reconnection refused")
    monkeypatch.setattr(connection, "vendor", "other")
    assert texts("refused -ok", order="newest") == [
        "reconnection refused",
        "Connection refused <x>",
    ]
    [hit] = search("connection refused", instance_ids=[alice.pk], limit=1)
    assert hit.snippet == "re<mark>connection</mark> <mark>refused</mark>"


@pytest.mark.django_db(transaction=True)
def test_migration_reverses_and_reapplies(alice: Instance) -> None:
    add(alice, "kept across the round trip")
    migration = importlib.import_module("instances.migrations.0003_logline_search").Migration
    call_command("migrate", *migration.dependencies[0], verbosity=0, skip_checks=True)
    assert search_objects() == set()
    call_command("migrate", "instances", verbosity=0, skip_checks=True)
    if connection.vendor == "sqlite":
        fts = "instances_logline_fts"
        made = {fts, f"{fts}_ai", f"{fts}_ad", f"{fts}_au", "instances_logline_time"}
    else:
        made = {"instances_logline_text_fts", "instances_logline_time"}
    assert search_objects() == made
    assert texts("round trip") == ["kept across the round trip"]  # rebuilt from the table
    assert_index_consistent()


def search_objects() -> set[str]:
    with connection.cursor() as c:
        if connection.vendor == "postgresql":
            c.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'instances_logline'"
                " AND indexname IN ('instances_logline_text_fts', 'instances_logline_time')"
            )
        else:
            c.execute(
                "SELECT name FROM sqlite_master WHERE name IN"
                " ('instances_logline_fts', 'instances_logline_time')"
                " OR (type = 'trigger' AND tbl_name = 'instances_logline')"
            )
        return {row[0] for row in c.fetchall()}


# -- the same module on PostgreSQL ---------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_same_tests_pass_on_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run this module again with DATABASE_URL on a throwaway cluster; all must pass."""
    if connection.vendor == "postgresql":
        pytest.fail("already on PostgreSQL: this test must be deselected in the child run")
    # A UTF-8 cluster (in the C locale initdb picks SQL_ASCII): accents are letters.
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    with postgres.cluster() as base:
        env = {
            **os.environ,
            "DATABASE_URL": f"{base}/postgres",
            "LOGSEARCH_EXPECT_VENDOR": "postgresql",
        }
        out = subprocess.run(
            [*PYTEST, __file__, "-k", "not test_the_same_tests_pass_on_postgresql"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    summary = report.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, report
