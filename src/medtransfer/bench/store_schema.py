"""The results store's SQLite schema and its versions, and the migration that brings an older store up to date.

Versions: 1 had neither ``preset`` nor the lease columns; 2 added ``preset`` (the intensity preset of a run); 3 added
``token`` and ``lease_until`` (claims of processes sharing a store). Opening an older store adds the missing columns
(NULL for the old rows, read as unknown) and records the current version, in one transaction, so every older store
stays readable. :class:`.store.ResultStore` calls :func:`create` and :func:`migrate` when it opens a file.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

COLUMNS = (
    "run_id", "init", "task", "fraction", "seed", "status", "metric_name", "higher_is_better", "metric", "metrics",
    "steps", "duration", "run_dir", "error", "attempts", "shard", "host", "updated", "preset", "token", "lease_until",
)  # fmt: skip
SCHEMA_VERSION = 3
# version -> the columns it added (nullable, so old rows read as unknown)
ADDED = {2: (("preset", "TEXT"),), 3: (("token", "TEXT"), ("lease_until", "REAL"))}
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    init TEXT NOT NULL,
    task TEXT NOT NULL,
    fraction REAL NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    metric_name TEXT NOT NULL,
    higher_is_better INTEGER NOT NULL,
    metric REAL,
    metrics TEXT NOT NULL DEFAULT '{}',
    steps INTEGER,
    duration REAL,
    run_dir TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    shard TEXT,
    host TEXT,
    updated REAL NOT NULL,
    preset TEXT,
    token TEXT,
    lease_until REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def version(conn: sqlite3.Connection) -> Any:
    """The schema version a store records (None when it records none)."""
    found = conn.execute("SELECT value FROM meta WHERE key = 'store_schema'").fetchone()
    return None if found is None else json.loads(found[0])


def create(conn: sqlite3.Connection) -> None:
    """The tables of :data:`SCHEMA` where they are missing, and the version of a new store; inside the caller's
    transaction (statement by statement: ``executescript`` would commit it)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('store_schema', ?)", (json.dumps(SCHEMA_VERSION),))


def migratable(found: Any) -> bool:
    return isinstance(found, int) and 1 <= found < SCHEMA_VERSION


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a store of an older version to :data:`SCHEMA_VERSION`, one set of added columns per version; inside
    the caller's write transaction, which reads the version again (another process may have migrated it)."""
    found = version(conn)
    if not migratable(found):
        return
    for step in range(found + 1, SCHEMA_VERSION + 1):
        for column, kind in ADDED[step]:
            if column not in {r[1] for r in conn.execute("PRAGMA table_info(runs)")}:
                conn.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'store_schema'", (json.dumps(SCHEMA_VERSION),))
