"""Full-text search over stored log lines: one small query language, two engines.

The language (parse_query): bare words must all match, "a quoted phrase" must match as a
phrase, -word and -"a phrase" exclude. Nothing else is syntax: OR, NEAR(, *, ^, col: and
parentheses are plain text. User text never reaches an engine's own query syntax: FTS5
gets each term as a string literal, PostgreSQL gets it as a bound parameter.

The engines (picked by connection.vendor) use what migration 0002_logline_search made:
SQLite an FTS5 table kept in sync by triggers, PostgreSQL a GIN expression index.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

from django.db import connection
from django.db.models import Q, QuerySet
from django.db.models.expressions import RawSQL
from django.utils import timezone

from instances.models import LogLine

MAX_QUERY_CHARS = 1000
MAX_TERMS = 32
MAX_TERM_CHARS = 200
MAX_LIMIT = 1000
ORDERS = ("rank", "newest")
# Listings and the fallback engine show this much of a line around the first match.
SNIPPET_CHARS = 240

FTS = "instances_logline_fts"
# The engines' highlighters wrap matches in these; we escape the rest, then swap them
# for <mark>. A line that itself contains one is highlighted by _highlight instead.
OPEN, CLOSE = "\x02", "\x03"
# Control characters (NUL ends an FTS5 string early; PostgreSQL text cannot hold it) and
# lone surrogates (not encodable) in a query are separators, like spaces.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# An optional "-", then a quoted phrase (an unclosed one runs to the end) or a bare word.
_TOKEN = re.compile(r'(-?)(?:"([^"]*)"?|([^\s"]+))')
# Neither tokenizer indexes punctuation, symbols or "_": a term without a letter or digit
# could never match (in FTS5 an empty phrase even makes the whole AND match nothing).
_SEARCHABLE = re.compile(r"[^\W_]")
_PG_VECTOR = "to_tsvector('simple'::regconfig, l.text)"  # exactly the indexed expression
_PG_HEADLINE = f'StartSel={OPEN}, StopSel={CLOSE}, MaxWords=30, MinWords=12, MaxFragments=2, FragmentDelimiter=" … "'  # noqa: E501


class SearchError(ValueError):
    """A query or filter that cannot be searched; the message is fit for an API 400."""


@dataclass(frozen=True)
class Query:
    """Each term is a word or a phrase: every `include` must match, no `exclude` may."""

    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hit:
    id: int
    instance_id: int
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
    """The FTS5 MATCH expression: every term a string literal, so nothing in it is syntax."""
    match = " AND ".join(map(_fts5_string, query.include))
    if query.exclude:
        match = f"({match}) NOT ({' OR '.join(map(_fts5_string, query.exclude))})"
    return match


def _fts5_string(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


def pg_tsquery(query: Query) -> tuple[str, list[str]]:
    """SQL for the tsquery, and its parameters: user text is only ever a parameter."""
    # phraseto_tsquery for single words too, as FTS5 treats a quoted word: "user_id" is
    # the phrase user <-> id in both engines.
    parts = ["phraseto_tsquery('simple', %s)"] * len(query.include)
    parts += ["!!phraseto_tsquery('simple', %s)"] * len(query.exclude)
    return f"({' && '.join(parts)})", [*query.include, *query.exclude]


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

    since is inclusive, until exclusive. before_id pages newest-first results: pass the
    last id of the previous page. limit is capped at MAX_LIMIT.
    """
    filters = _filters(instance_ids, stream, since, until, before_id)
    limit = _limit(limit)
    if order not in ORDERS:
        raise SearchError(f"order must be one of {', '.join(ORDERS)}, not {order!r}.")
    if before_id is not None and order == "rank" and q and q.strip():
        raise SearchError('before_id pages newest-first results only: use order="newest".')
    if filters.instance_ids == ():
        return []
    if q is None or not q.strip():
        return _listing(filters, limit)
    query = parse_query(q)
    vendor = connection.vendor
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
    ids = None if instance_ids is None else tuple(sorted({int(i) for i in instance_ids}))
    return _Filters(ids, stream, since, until, before_id)


def _limit(limit: int) -> int:
    if limit < 1:
        raise SearchError("limit must be at least 1.")
    return min(limit, MAX_LIMIT)


def _where(f: _Filters) -> tuple[str, list[object]]:
    """The filters as SQL on instances_logline aliased `l`, for the raw engine queries."""
    ops = connection.ops
    clauses, params = [], []
    if f.instance_ids is not None:
        clauses.append(f"l.instance_id IN ({', '.join(['%s'] * len(f.instance_ids))})")
        params += f.instance_ids
    for clause, value in (
        ("l.stream = %s", f.stream),
        ("l.time >= %s", ops.adapt_datetimefield_value(f.since)),
        ("l.time < %s", ops.adapt_datetimefield_value(f.until)),
        ("l.id < %s", f.before_id),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return "".join(f" AND {c}" for c in clauses), params


def _orm_filters(f: _Filters) -> Q:
    q = Q()
    if f.instance_ids is not None:
        q &= Q(instance_id__in=f.instance_ids)
    if f.stream is not None:
        q &= Q(stream=f.stream)
    if f.since is not None:
        q &= Q(time__gte=f.since)
    if f.until is not None:
        q &= Q(time__lt=f.until)
    if f.before_id is not None:
        q &= Q(id__lt=f.before_id)
    return q


def _listing(f: _Filters, limit: int) -> list[Hit]:
    rows = LogLine.objects.filter(_orm_filters(f)).order_by("-id")[:limit]
    return [_hit(line, _highlight(line.text, ())) for line in rows]


def _search_sqlite(query: Query, f: _Filters, order: str, limit: int) -> list[Hit]:
    where, params = _where(f)
    # FTS5 returns rowids in either order cheaply, so newest-first stops after `limit`.
    by = "f.rank, l.id DESC" if order == "rank" else "f.rowid DESC"
    sql = (
        f"SELECT l.id FROM {FTS} f JOIN instances_logline l ON l.id = f.rowid"
        f" WHERE {FTS} MATCH %s{where} ORDER BY {by} LIMIT %s"
    )
    match = fts5_match(query)
    ids = _ids(sql, [match, *params, limit])
    # snippet() needs the MATCH cursor, hence a subquery per hit (a rowid lookup each).
    snippet = RawSQL(
        f"SELECT snippet({FTS}, 0, %s, %s, '…', 24) FROM {FTS}"
        f" WHERE {FTS} MATCH %s AND rowid = instances_logline.id",
        [OPEN, CLOSE, match],
    )
    return _hits(ids, LogLine.objects.annotate(marked=snippet), query)


def _search_postgresql(query: Query, f: _Filters, order: str, limit: int) -> list[Hit]:
    where, params = _where(f)
    tsquery, terms = pg_tsquery(query)
    # Normalisation 1 divides by the line's log length: a short line that matches beats
    # a 16 KiB one that mentions the word once, as with FTS5's bm25.
    by = f"ts_rank({_PG_VECTOR}, {tsquery}, 1) DESC, l.id DESC" if order == "rank" else "l.id DESC"
    sql = (
        f"SELECT l.id FROM instances_logline l WHERE {_PG_VECTOR} @@ {tsquery}{where}"
        f" ORDER BY {by} LIMIT %s"
    )
    rank_terms = terms if order == "rank" else []
    ids = _ids(sql, [*terms, *params, *rank_terms, limit])
    headline = RawSQL(
        f"ts_headline('simple', instances_logline.text, {tsquery}, %s)", [*terms, _PG_HEADLINE]
    )
    return _hits(ids, LogLine.objects.annotate(marked=headline), query)


def _search_fallback(query: Query, f: _Filters, limit: int) -> list[Hit]:
    q = _orm_filters(f)
    for term in query.include:
        q &= Q(text__icontains=term)
    for term in query.exclude:
        q &= ~Q(text__icontains=term)
    rows = LogLine.objects.filter(q).order_by("-id")[:limit]
    return [_hit(line, _highlight(line.text, query.include)) for line in rows]


def _ids(sql: str, params: Sequence[object]) -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [row[0] for row in cursor.fetchall()]


def _hits(ids: list[int], annotated: QuerySet[LogLine], query: Query) -> list[Hit]:
    """Hits in the order of `ids`; only these few rows pay for the engine's highlighter."""
    rows = annotated.in_bulk(ids)
    return [_hit(rows[i], _snippet(rows[i], query)) for i in ids if i in rows]


def _snippet(line: LogLine, query: Query) -> str:
    marked = getattr(line, "marked", None)
    if not marked or OPEN in line.text or CLOSE in line.text:
        return _highlight(line.text, query.include)
    return escape(marked).replace(OPEN, "<mark>").replace(CLOSE, "</mark>")


def _hit(line: LogLine, snippet: str) -> Hit:
    return Hit(line.id, line.instance_id, line.stream, line.time, line.text, snippet)


def _highlight(text: str, terms: Sequence[str]) -> str:
    """Escaped text around the first case-insensitive occurrence of a term, marked.

    For engines without a highlighter, and lines the engine's markers would be ambiguous in.
    """
    pattern = "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
    found = re.compile(pattern, re.IGNORECASE) if pattern else None
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
