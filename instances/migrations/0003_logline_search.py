"""Full-text search over LogLine.text, per database engine (see instances/logsearch.py).

SQLite: an FTS5 external-content table (the text is stored once, in instances_logline)
kept in sync by triggers. Triggers, not Django signals, because the log writer uses
bulk_create and retention uses queryset .delete(), which send no per-row signals; the
triggers also see cascade deletes and raw SQL.

PostgreSQL: a GIN expression index on to_tsvector('simple', <text, some punctuation
made spaces>). Queries must spell the expression exactly alike for the planner to use
the index (logsearch.pg_vector). 'simple' because log lines are not prose in one
language: no stemming, no stop words, just lower-casing. The punctuation goes because
the default parser keeps "/api/notes", "a.b" or "x@y" whole and skips "<...>" tags,
where FTS5 splits at every punctuation mark: both engines then see the same words.

Neither changes the model. A later migration that makes Django rebuild instances_logline
on SQLite (it copies and drops the table to alter a column) drops the triggers and the
time index with it: such a migration must run SQLITE_DROP and SQLITE_CREATE again after.
"""

from django.db import migrations

FTS = "instances_logline_fts"

SQLITE_CREATE = [
    # instance_id and stream are indexed too, as tokens like "501" and "stderr", so that
    # FTS5 intersects them with the words instead of checking each match's row: on a
    # million lines "error" in one instance takes ~6 ms this way, ~90 ms the other.
    # Queries confine the user's words to the text column, so these never match them.
    # remove_diacritics 2: "cafe" finds "café"; unicode61 also folds case.
    f"""CREATE VIRTUAL TABLE {FTS} USING fts5(
        text, instance_id, stream, content='instances_logline', content_rowid='id',
        tokenize='unicode61 remove_diacritics 2'
    )""",
    # ORDER BY rank: bm25 over the text only; the filter tokens would skew it.
    f"INSERT INTO {FTS}({FTS}, rank) VALUES ('rank', 'bm25(1.0, 0.0, 0.0)')",
    f"""CREATE TRIGGER {FTS}_ai AFTER INSERT ON instances_logline BEGIN
        INSERT INTO {FTS}(rowid, text, instance_id, stream)
        VALUES (new.id, new.text, new.instance_id, new.stream);
    END""",
    # External content: FTS5 needs the old values to find the postings to remove.
    f"""CREATE TRIGGER {FTS}_ad AFTER DELETE ON instances_logline BEGIN
        INSERT INTO {FTS}({FTS}, rowid, text, instance_id, stream)
        VALUES ('delete', old.id, old.text, old.instance_id, old.stream);
    END""",
    f"""CREATE TRIGGER {FTS}_au AFTER UPDATE ON instances_logline BEGIN
        INSERT INTO {FTS}({FTS}, rowid, text, instance_id, stream)
        VALUES ('delete', old.id, old.text, old.instance_id, old.stream);
        INSERT INTO {FTS}(rowid, text, instance_id, stream)
        VALUES (new.id, new.text, new.instance_id, new.stream);
    END""",
    # Lines stored before this migration.
    f"INSERT INTO {FTS}({FTS}) VALUES ('rebuild')",
    # Turns a since/until window into an id range (logsearch._with_id_bounds).
    "CREATE INDEX IF NOT EXISTS instances_logline_time ON instances_logline (time)",
]
SQLITE_DROP = [
    "DROP INDEX IF EXISTS instances_logline_time",
    f"DROP TRIGGER IF EXISTS {FTS}_au",
    f"DROP TRIGGER IF EXISTS {FTS}_ad",
    f"DROP TRIGGER IF EXISTS {FTS}_ai",
    f"DROP TABLE IF EXISTS {FTS}",
]

# logsearch.PG_PUNCTUATION, frozen: a change to it needs a new migration for the index.
PG_PUNCTUATION = "/.@:<>-&\\~+"
PG_WORDS = "text"
for mark in PG_PUNCTUATION:
    PG_WORDS = f"replace({PG_WORDS}, '{mark}', ' ')"
POSTGRESQL_CREATE = [
    "CREATE INDEX IF NOT EXISTS instances_logline_text_fts ON instances_logline"
    f" USING gin (to_tsvector('simple'::regconfig, {PG_WORDS}))",
    # Time-bounded listings and searches ("since 10 minutes ago"): the planner combines
    # it with the other indexes.
    "CREATE INDEX IF NOT EXISTS instances_logline_time ON instances_logline (time)",
]
POSTGRESQL_DROP = [
    "DROP INDEX IF EXISTS instances_logline_time",
    "DROP INDEX IF EXISTS instances_logline_text_fts",
]

SQL = {
    "sqlite": (SQLITE_CREATE, SQLITE_DROP),
    "postgresql": (POSTGRESQL_CREATE, POSTGRESQL_DROP),
}


def _run(schema_editor, statements):
    for sql in statements:
        schema_editor.execute(sql, params=None)


def create(apps, schema_editor):
    # Other engines get no index: logsearch falls back to icontains there.
    _run(schema_editor, SQL.get(schema_editor.connection.vendor, ([], []))[0])


def drop(apps, schema_editor):
    _run(schema_editor, SQL.get(schema_editor.connection.vendor, ([], []))[1])


class Migration(migrations.Migration):
    # Depends on the token migration only to keep one leaf node: the two are unrelated.
    dependencies = [
        ("instances", "0002_apitoken"),
    ]

    operations = [
        migrations.RunPython(create, drop, elidable=False),
    ]
