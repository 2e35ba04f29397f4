"""Full-text search over stored log lines: one small query language, two engines.

The language (parse_query): bare words must all match, "a quoted phrase" must match as a
phrase, -word and -"a phrase" exclude. Nothing else is syntax: OR, NEAR(, *, ^, col: and
parentheses are plain text. User text never reaches an engine's own query syntax: FTS5
gets each term as a string literal, PostgreSQL gets it as a bound parameter.

The engines (picked by connection.vendor) use what migration 0003_logline_search made:
SQLite an FTS5 table kept in sync by triggers, PostgreSQL a GIN expression index.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from html import escape
from typing import Any

from django.db import connection
from django.db.models import Q
from django.db.models.expressions import RawSQL
from django.utils import timezone

from instances.models import LogLine

MAX_QUERY_CHARS = 1000
MAX_TERMS = 32
MAX_TERM_CHARS = 200
MAX_LIMIT = 1000
MAX_FTS5_INSTANCES = 100
# order="rank" ranks the newest this-many matches. Both engines' rank functions cost a
# little per matching line, so ranking every line that says "GET" in a million took
# 0.5 s (SQLite) to 2 s (PostgreSQL); fewer matches than this are all ranked.
RANK_WINDOW = 10_000
TIME_BOUND_ROWS = 50_000
ORDERS = ("rank", "newest")
# Snippets we make (all but SQLite's) show this much of a line around the first match.
SNIPPET_CHARS = 240

FTS = "instances_logline_fts"
# FTS5's snippet() wraps matches in these; we escape the rest, then swap them for
# <mark>. A line that itself contains one is highlighted by _highlight instead.
OPEN, CLOSE = "\x02", "\x03"
# Control characters (NUL ends an FTS5 string early; PostgreSQL text cannot hold it) and
# lone surrogates (not encodable) in a query are separators, like spaces.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# An optional "-", then a quoted phrase (an unclosed one runs to the end) or a bare word.
_TOKEN = re.compile(r'(-?)(?:"([^"]*)"?|([^\s"]+))')
# Neither tokenizer indexes punctuation, symbols or "_": a term without a letter or digit
# could never match (in FTS5 an empty phrase even makes the whole AND match nothing).
_SEARCHABLE = re.compile(r"[^\W_]")
_WORD = re.compile(r"[^\W_]+")
_SQLITE_MATCHES = f"FROM {FTS} f JOIN instances_logline l ON l.id = f.rowid WHERE {FTS} MATCH %s"
# The punctuation that PostgreSQL's parser reads as part of a bigger token: a URL, path,
# e-mail, host, number, hyphenated word or tag ("/api/notes" is one token, and the text of
# "<script>...</script>" is skipped). Made spaces, lines split into words as in FTS5 and
# "notes" finds "/api/notes"; other punctuation already splits words. replace(), not
# translate() or a regex: about 1 us a line against 10. The migration spells the index's
# expression with this: a change needs a new migration.
PG_PUNCTUATION = "/.@:<>-&\\~+"


class SearchError(ValueError):
    """A query or filter that cannot be searched; the message is fit for an API 400."""


@dataclass(frozen=True)
class Query:
    """Each term is a word or a phrase: every `include` must match, no `exclude` may."""

    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hit:
    id: int  # the LogLine's
    instance_id: int  # the Instance's primary key, like LogLine.instance_id
    stream: str
    time: datetime
    text: str
    # HTML: the text is escaped, matches are wrapped in <mark>...</mark>.
    snippet: str


@dataclass(frozen=True)
class _Filters:
    instance_ids: tuple[int, ...] | None
    stream: str | None
    since: datetime | None
    until: datetime | None
    before_id: int | None
    # Id bounds implied by since/until, where cheap to find (SQLite: _with_id_bounds).
    min_id: int | None = None
    max_id: int | None = None


def parse_query(q: str) -> Query:
    """Parse the search box; raise SearchError for anything that cannot be searched."""
    if len(q) > MAX_QUERY_CHARS:
        raise SearchError(f"The query is too long: at most {MAX_QUERY_CHARS} characters.")
    include: list[str] = []
    exclude: list[str] = []
    for negated, term in _terms(_UNSAFE.sub(" ", q)):
        bucket = exclude if negated else include
        if term not in bucket:
            bucket.append(term)
    if len(include) + len(exclude) > MAX_TERMS:
        raise SearchError(f"Too many search terms: at most {MAX_TERMS}.")
    if not include:
        raise SearchError(
            "Nothing to search for: give at least one word or phrase that is not excluded."
        )
    return Query(tuple(include), tuple(exclude))


def _terms(q: str) -> Iterable[tuple[bool, str]]:
    for m in _TOKEN.finditer(q):
        term = " ".join((m[2] if m[2] is not None else m[3]).split())
        if len(term) > MAX_TERM_CHARS:
            raise SearchError(f"A search term is too long: at most {MAX_TERM_CHARS} characters.")
        if _SEARCHABLE.search(term):
            yield bool(m[1]), term


def fts5_match(query: Query) -> str:
    """The FTS5 MATCH expression: every term a string literal, so nothing in it is syntax.

    Confined to the text column: the table also indexes instance_id and stream.
    """
    match = " AND ".join(map(_fts5_string, query.include))
    if query.exclude:
        match = f"({match}) NOT ({' OR '.join(map(_fts5_string, query.exclude))})"
    return f"text : ({match})"


def _fts5_filters(f: _Filters) -> str:
    """The instance and stream filters as FTS5 tokens, for FTS5 to intersect cheaply.

    They only narrow the candidates: the SQL filters still decide, so past
    MAX_FTS5_INSTANCES ids (a long OR costs more than it saves) they are left out.
    """
    ids = f.instance_ids
    parts = []
    if ids is not None and len(ids) <= MAX_FTS5_INSTANCES:
        parts.append(f"instance_id : ({' OR '.join(_fts5_string(str(i)) for i in ids)})")
    if f.stream is not None:
        parts.append(f"stream : {_fts5_string(f.stream)}")
    return "".join(f" AND {p}" for p in parts)


def _fts5_string(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


def pg_tsquery(query: Query) -> tuple[str, list[str]]:
    """SQL for the tsquery, and its parameters: user text is only ever a parameter."""
    # phraseto_tsquery for single words too, as FTS5 treats a quoted word: "user_id" is
    # the phrase user <-> id in both engines.
    term = f"phraseto_tsquery('simple', {_pg_words('%s')})"
    parts = [term] * len(query.include) + [f"!!{term}"] * len(query.exclude)
    return f"({' && '.join(parts)})", [*query.include, *query.exclude]


def pg_vector(column: str) -> str:
    """The indexed expression, exactly: the planner only uses the index for this."""
    return f"to_tsvector('simple'::regconfig, {_pg_words(column)})"


def _pg_words(value: str) -> str:
    for mark in PG_PUNCTUATION:
        value = f"replace({value}, '{mark}', ' ')"
    return value


def search(
    q: str | None,
    *,
    instance_ids: Collection[int] | None = None,
    stream: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    order: str = "rank",
    before_id: int | None = None,
) -> list[Hit]:
    """Lines matching `q` (None or blank: all lines, newest first) and every filter.

    order="rank" puts the best matches first, among the newest RANK_WINDOW matches;
    "newest" the newest first. since is inclusive, until exclusive. before_id pages
    newest-first results: pass the last id of the previous page. limit is capped at
    MAX_LIMIT. Raises SearchError for a query or argument that cannot be searched.
    """
    filters = _filters(instance_ids, stream, since, until, before_id)
    limit = _limit(limit)
    if order not in ORDERS:
        raise SearchError(f"order must be one of {', '.join(ORDERS)}, not {order!r}.")
    if before_id is not None and order == "rank" and q and q.strip():
        raise SearchError('before_id pages newest-first results only: use order="newest".')
    if filters.instance_ids == ():
        return []
    query = parse_query(q) if q is not None and q.strip() else None
    vendor = connection.vendor
    if vendor == "sqlite" and (filters := _with_id_bounds(filters)) is None:
        return []
    if query is None:
        return _listing(filters, limit)
    if vendor == "sqlite":
        return _search_sqlite(query, filters, order, limit)
    if vendor == "postgresql":
        return _search_postgresql(query, filters, order, limit)
    # No full-text index on other engines (the migration makes none): a substring scan
    # finds the same lines, slowly and unranked, rather than failing.
    return _search_fallback(query, filters, limit)


def _filters(
    instance_ids: Collection[int] | None,
    stream: str | None,
    since: datetime | None,
    until: datetime | None,
    before_id: int | None,
) -> _Filters:
    if stream is not None and stream not in LogLine.Stream.values:
        raise SearchError(f"stream must be one of {', '.join(LogLine.Stream.values)}.")
    for name, value in (("since", since), ("until", until)):
        if value is not None and timezone.is_naive(value):
            raise SearchError(f"{name} must include a time zone.")
    try:
        ids = None if instance_ids is None else tuple(sorted({int(i) for i in instance_ids}))
        before_id = None if before_id is None else int(before_id)
    except (TypeError, ValueError):
        raise SearchError("instance_ids and before_id must be integers.") from None
    # Both engines' ids are 64-bit: a bigger number would fail in the driver, not here.
    if any(abs(i) >= 2**63 for i in (*(ids or ()), before_id or 0)):
        raise SearchError("instance_ids and before_id must be below 2**63.")
    return _Filters(ids, stream, since, until, before_id)


def _limit(limit: int) -> int:
    if not isinstance(limit, int) or limit < 1:
        raise SearchError("limit must be a whole number of at least 1.")
    return min(limit, MAX_LIMIT)


def _where(f: _Filters, id_column: str = "l.id") -> tuple[str, list[object]]:
    """The filters as SQL on instances_logline aliased `l`, for the raw engine queries."""
    ops = connection.ops
    clauses, params = [], []
    if f.instance_ids is not None:
        # One parameter however many ids: SQLite allows at most 32,766 per statement.
        if connection.vendor == "postgresql":
            clauses.append("l.instance_id = ANY(%s)")
            params.append(list(f.instance_ids))
        else:
            clauses.append("l.instance_id IN (SELECT value FROM json_each(%s))")
            params.append(json.dumps(f.instance_ids))
    for clause, value in (
        ("l.stream = %s", f.stream),
        ("l.time >= %s", ops.adapt_datetimefield_value(f.since)),
        ("l.time < %s", ops.adapt_datetimefield_value(f.until)),
        # SQLite does not carry an inequality across the join: on f.rowid, FTS5 uses it.
        (f"{id_column} < %s", f.before_id),
        (f"{id_column} >= %s", f.min_id),
        (f"{id_column} <= %s", f.max_id),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return "".join(f" AND {c}" for c in clauses), params


def _with_id_bounds(f: _Filters) -> _Filters | None:
    """Add the id range the since/until window spans, if small; None if it is empty.

    FTS5 and the primary key can then range over ids instead of checking the time of
    every candidate: "errors in the last hour" need not look at last week's. The bounds
    are exact (min and max over the whole window, via the time index, not assumed from
    id order), so they are only taken when the window holds at most TIME_BOUND_ROWS lines.
    """
    clauses, params = [], []
    for clause, value in (("time >= %s", f.since), ("time < %s", f.until)):
        if value is not None:
            clauses.append(clause)
            params.append(connection.ops.adapt_datetimefield_value(value))
    if not clauses:
        return f
    window = f"SELECT id FROM instances_logline WHERE {' AND '.join(clauses)} LIMIT %s"
    sql = f"SELECT count(*), min(id), max(id) FROM ({window})"
    count, low, high = _rows(sql, [*params, TIME_BOUND_ROWS + 1])[0]
    if count == 0:
        return None
    return f if count > TIME_BOUND_ROWS else replace(f, min_id=low, max_id=high)


def _orm_filters(f: _Filters) -> Q:
    q = Q() if f.instance_ids is None else _instances_q(f.instance_ids)
    if f.stream is not None:
        q &= Q(stream=f.stream)
    if f.since is not None:
        q &= Q(time__gte=f.since)
    if f.until is not None:
        q &= Q(time__lt=f.until)
    if f.before_id is not None:
        q &= Q(id__lt=f.before_id)
    if f.min_id is not None:
        q &= Q(id__gte=f.min_id)
    if f.max_id is not None:
        q &= Q(id__lte=f.max_id)
    return q


def _instances_q(ids: tuple[int, ...]) -> Q:
    if len(ids) > 1000 and connection.vendor == "sqlite":
        # SQLite allows at most 32,766 parameters per statement: one JSON array instead.
        return Q(instance_id__in=RawSQL("SELECT value FROM json_each(%s)", [json.dumps(ids)]))
    return Q(instance_id__in=ids)


def _listing(f: _Filters, limit: int) -> list[Hit]:
    rows = LogLine.objects.filter(_orm_filters(f)).order_by("-id")[:limit]
    return [_hit(line, _highlight(line.text, (), whole_words=False)) for line in rows]


def _search_sqlite(query: Query, f: _Filters, order: str, limit: int) -> list[Hit]:
    match = fts5_match(query) + _fts5_filters(f)
    where, params = _where(f, id_column="f.rowid")
    if order == "rank" and (floor := _sqlite_rank_floor(match, where, params)) is not None:
        where, params = f"{where} AND f.rowid >= %s", [*params, floor]
    # Orders FTS5 itself delivers, so the LIMIT stops the scan and snippet() runs for the
    # returned rows only. A tie-breaker (", l.id DESC") would sort every match instead.
    by = "f.rank" if order == "rank" else "f.rowid DESC"
    sql = (
        f"SELECT l.id, snippet({FTS}, 0, %s, %s, '…', 24) {_SQLITE_MATCHES}{where}"
        f" ORDER BY {by} LIMIT %s"
    )
    marked = dict(_rows(sql, [OPEN, CLOSE, match, *params, limit]))
    lines = LogLine.objects.in_bulk(list(marked))
    # A line trimmed between the two queries is simply left out.
    found = [lines[i] for i in marked if i in lines]
    return [_hit(line, _snippet(line.text, marked[line.id], query)) for line in found]


def _sqlite_rank_floor(match: str, where: str, params: list[object]) -> int | None:
    """The id of the RANK_WINDOW-th newest match, or None when there are fewer."""
    sql = f"SELECT f.rowid {_SQLITE_MATCHES}{where} ORDER BY f.rowid DESC LIMIT 1 OFFSET %s"
    rows = _rows(sql, [match, *params, RANK_WINDOW - 1])
    return rows[0][0] if rows else None


def _search_postgresql(query: Query, f: _Filters, order: str, limit: int) -> list[Hit]:
    where, params = _where(f)
    tsquery, terms = pg_tsquery(query)
    vector = pg_vector("l.text")
    matches = f"SELECT l.id, l.text FROM instances_logline l WHERE {vector} @@ {tsquery}"
    if order == "newest":
        sql = f"{matches}{where} ORDER BY l.id DESC LIMIT %s"
        args = [*terms, *params, limit]
    else:
        # "l.id + 0": take the window from the index's bitmap, which needs no to_tsvector
        # per row, rather than walk the primary key re-parsing every line on the way.
        # ts_rank re-parses each line of the window; normalisation 1 divides by the log of
        # its length, so a short line beats a 16 KiB one that mentions the word once.
        sql = (
            f"SELECT c.id FROM ({matches}{where} ORDER BY l.id + 0 DESC LIMIT %s) c"
            f" ORDER BY ts_rank({pg_vector('c.text')}, {tsquery}, 1) DESC,"
            " c.id DESC LIMIT %s"
        )
        args = [*terms, *params, RANK_WINDOW, *terms, limit]
    ids = [row[0] for row in _rows(sql, args)]
    lines = LogLine.objects.in_bulk(ids)
    # Not ts_headline: it re-parses the raw line, dropping what looks like a tag ("<nil>",
    # "<module>"). Lines split at punctuation and 'simple' only lower-cases, so marking
    # whole words case-insensitively marks what matched.
    return [
        _hit(lines[i], _highlight(lines[i].text, query.include, whole_words=True))
        for i in ids
        if i in lines
    ]


def _search_fallback(query: Query, f: _Filters, limit: int) -> list[Hit]:
    q = _orm_filters(f)
    for term in query.include:
        q &= Q(text__icontains=term)
    for term in query.exclude:
        q &= ~Q(text__icontains=term)
    rows = LogLine.objects.filter(q).order_by("-id")[:limit]
    return [_hit(line, _highlight(line.text, query.include, whole_words=False)) for line in rows]


def _rows(sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _snippet(text: str, marked: str | None, query: Query) -> str:
    """FTS5's snippet made safe: escaped, then its markers turned into <mark>."""
    if not marked or OPEN in text or CLOSE in text:
        return _highlight(text, query.include, whole_words=True)
    return escape(marked).replace(OPEN, "<mark>").replace(CLOSE, "</mark>")


def _hit(line: LogLine, snippet: str) -> Hit:
    return Hit(line.id, line.instance_id, line.stream, line.time, line.text, snippet)


def _highlight(text: str, terms: Sequence[str], *, whole_words: bool) -> str:
    """The line, escaped, around the first occurrence of a term; occurrences marked.

    whole_words: a term matches as a run of whole words, case-insensitively, whatever
    separates them ("user id" marks "user_id"), as the engines' tokenizers see it.
    Otherwise a plain case-insensitive substring, as icontains sees it.
    """
    found = _term_pattern(terms, whole_words)
    first = found.search(text) if found else None
    start = max(0, first.start() - SNIPPET_CHARS // 4) if first else 0
    window = text[start : start + SNIPPET_CHARS]
    out, pos = [], 0
    for m in found.finditer(window) if found else ():
        out += [escape(window[pos : m.start()]), "<mark>", escape(m[0]), "</mark>"]
        pos = m.end()
    out.append(escape(window[pos:]))
    more = start + SNIPPET_CHARS < len(text)
    return ("…" if start else "") + "".join(out) + ("…" if more else "")


def _term_pattern(terms: Sequence[str], whole_words: bool) -> re.Pattern[str] | None:
    terms = sorted(terms, key=len, reverse=True)  # the longest of overlapping terms wins
    if whole_words:
        words = [_WORD.findall(t) for t in terms]
        alts = [r"[\W_]+".join(map(re.escape, w)) for w in words if w]
        pattern = rf"(?<![^\W_])(?:{'|'.join(alts)})(?![^\W_])" if alts else ""
    else:
        pattern = "|".join(map(re.escape, terms))
    return re.compile(pattern, re.IGNORECASE) if pattern else None
