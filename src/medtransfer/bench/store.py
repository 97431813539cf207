"""The benchmark results store: one SQLite file, one row per run of the grid.

A benchmark grid (initialisations x tasks x label fractions x seeds) takes hours and is often killed, split across
machines (``--shard i/n``) or partly failed. The store is what makes that safe:

* every change is one SQLite transaction, so a killed process leaves each row either before or after the change,
  never half-written (SQLite's rollback journal gives the atomic commit; no WAL, which leaves side files);
* :meth:`ResultStore.todo` tells a restarted grid exactly which runs remain: a row left ``running`` by a killed
  process is run again and its incomplete attempt replaced, a ``done`` row is never repeated;
* :meth:`ResultStore.claim_next` lets several processes share one store: checking that a run is free and marking it
  ``running`` is one transaction, so two processes never start one run, and a running row is held by a *lease*
  (owner ``host:pid`` plus a random token, ``lease_until``) that its owner renews (:meth:`ResultStore.renew`);
  another process takes the row over only once the lease has expired, or at once when the owner is a process of
  this host that no longer runs;
* :meth:`ResultStore.merge_from` folds a shard's store into another, preferring finished results;
* :func:`shard_of` splits the run ids into disjoint parts whose union is the whole grid.

Rows are plain dicts in the shared row format (``run_id, init, task, fraction, seed, status, metric_name,
higher_is_better, metric, metrics, steps, duration, run_dir, error, attempts, shard, host, updated, preset``) so
that the statistics and report code need nothing from this module but :meth:`ResultStore.rows`. ``preset`` is the
intensity preset the run prepared its data with (from its ``contract.json``), None when unknown.

Schema versions and the migration of older stores: :mod:`.store_schema`; claimants, leases and when a running row
is free: :mod:`.leases` (their names are importable from here too).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medtransfer.errors import MedTransferError

from . import store_schema as _schema
# the leases live in .leases; their names stay importable from here
from .leases import HEARTBEAT_SECONDS, LEASE_SECONDS, Claimant, _alive_here, _free  # noqa: F401
from .store_schema import COLUMNS as _COLUMNS
from .store_schema import SCHEMA_VERSION as _SCHEMA_VERSION

__all__ = ["StoreError", "LeaseLost", "Claimant", "ResultStore", "shard_of", "STATUSES", "LEASE_SECONDS",
           "HEARTBEAT_SECONDS"]

STATUSES = ("pending", "running", "done", "failed")
# Which row survives a merge: the higher rank wins (a finished result beats an error beats an unfinished attempt).
_MERGE_RANK = {"pending": 0, "running": 1, "failed": 2, "done": 3}
# The fields that name a grid cell; two rows with one run id must agree on them or the grids differ.
_IDENTITY = ("init", "task", "fraction", "seed", "metric_name", "higher_is_better")
class StoreError(MedTransferError):
    """A results store that cannot be used: unreadable, not a store, or at odds with the grid or another store."""


class LeaseLost(StoreError):
    """The run was taken over by another process after this one's lease expired; this attempt's result is not
    recorded (the other attempt's is)."""


class ResultStore:
    """Run rows of one benchmark grid in the SQLite file ``path`` (created with its schema if absent).

    Several ``ResultStore`` objects, in one process or several on one machine, may share a file: each write takes
    the database lock for the length of one transaction and waits up to 30 s for another writer.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"results store {self.path} is a folder; pass the path of the store file, e.g. "
                             f"{self.path / 'results.sqlite'}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the module never opens transactions behind our back; _write() opens them explicitly.
        self._conn: sqlite3.Connection | None = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StoreError(
                f"results store {self.path} cannot be read as SQLite ({exc}); it is corrupt or not a results store. "
                f"Move it aside (or delete it) to start a new store, or pass the right file"
            ) from exc
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        conn = self._connection
        check = conn.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check[0] if check else 'no answer'}")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "runs" not in tables:
            raise StoreError(f"{self.path} is an SQLite file of something else (tables {sorted(tables)}), not a "
                             f"results store; pass a new path or the store written by `medtransfer benchmark`")
        with self._write() as conn:
            _schema.create(conn)
        if _schema.migratable(self.get_meta("store_schema")):
            with self._write() as conn:
                _schema.migrate(conn)
        columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(runs)"))
        version = self.get_meta("store_schema")
        if set(columns) != set(_COLUMNS) or version != _SCHEMA_VERSION:
            raise StoreError(f"results store {self.path} has schema {version!r} with columns {columns}; this "
                             f"medtransfer reads schema {_SCHEMA_VERSION}. Use the medtransfer version that wrote "
                             f"it, or start a new store")

    @property
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"results store {self.path} is closed; open a new ResultStore({str(self.path)!r})")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One atomic transaction. IMMEDIATE takes the write lock up front: a deferred transaction that reads and
        then writes can fail at once with 'database is locked' when another writer holds the lock (no busy wait)."""
        conn = self._connection
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- meta -----------------------------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        """Store ``value`` (anything JSON can hold) under ``key``, replacing the old value."""
        try:
            text = json.dumps(value, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"set_meta({key!r}): value must be JSON-serialisable (dict, list, str, finite number, "
                             f"bool, None): {exc}") from exc
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, text))

    def get_meta(self, key: str, default: Any = None) -> Any:
        found = self._connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if found is None else json.loads(found[0])

    def _all_meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._connection.execute("SELECT key, value FROM meta")}

    # -- rows -----------------------------------------------------------------------------------------------------
    def ensure(self, cells: Iterable[dict]) -> int:
        """Add a ``pending`` row (attempts 0) for each cell whose ``run_id`` is not stored yet; returns how many.

        A cell needs ``run_id, init, task, fraction, seed, metric_name, higher_is_better``. Existing rows are left
        as they are, so calling this at every (re)start of a grid is safe; a stored row whose cell differs
        (another init, fraction, metric ...) means the store belongs to another grid and raises StoreError.
        """
        prepared = [_cell_values(cell) for cell in cells]
        added = 0
        now = time.time()
        with self._write() as conn:
            for values in prepared:
                stored = self._row(values["run_id"])
                if stored is not None:
                    _check_same_cell(stored, values, self.path, "the grid you passed")
                    continue
                conn.execute(
                    "INSERT INTO runs (run_id, init, task, fraction, seed, status, metric_name, higher_is_better, "
                    "metrics, attempts, updated) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, '{}', 0, ?)",
                    (values["run_id"], values["init"], values["task"], values["fraction"], values["seed"],
                     values["metric_name"], int(values["higher_is_better"]), now),
                )
                added += 1
        return added

    def mark_running(self, run_id: str, *, shard: str | None = None, host: str | None = None) -> None:
        """Start an attempt (attempts += 1) whatever holds the row, with no lease: for one process alone on a store.
        Processes that share a store use :meth:`claim_next`. A row left ``running`` by a killed process may be
        started again; its partial results are cleared so the new attempt replaces it. A ``done`` row is never
        re-run."""
        with self._write() as conn:
            self._require(run_id, ("pending", "running", "failed"), "mark_running")
            self._start(conn, run_id, shard=shard, host=host, token=None, lease_until=None, now=time.time())

    @staticmethod
    def _start(conn: sqlite3.Connection, run_id: str, *, shard: str | None, host: str | None, token: str | None,
               lease_until: float | None, now: float) -> None:
        conn.execute(
            "UPDATE runs SET status = 'running', attempts = attempts + 1, shard = ?, host = ?, token = ?, "
            "lease_until = ?, metric = NULL, metrics = '{}', steps = NULL, duration = NULL, run_dir = NULL, "
            "error = NULL, preset = NULL, updated = ? WHERE run_id = ?",
            (shard, host, token, lease_until, now, run_id),
        )

    # -- sharing a store between processes ------------------------------------------------------------------------
    def claim_next(self, run_ids: Iterable[str], claimant: Claimant, *, retry: Mapping[str, int] | None = None,
                   shard: str | None = None, now: float | None = None) -> str | None:
        """Start the first of ``run_ids`` that is free, for ``claimant``, and return its id; None when none is.

        Checking and marking are one transaction (the write lock is taken first), so of several processes asking
        at once each run goes to exactly one. Free are: ``pending`` rows; ``failed`` rows named in ``retry`` whose
        attempt count is still the one given there (a failure another process has retried since is not retried
        again); ``running`` rows whose lease has expired or been released, whose owner is a process of this host
        that no longer runs, or that have no lease and no live owner on this host (written by :meth:`mark_running`
        or an older medtransfer). A ``running`` row with a fresh lease of another claim is held, and a ``done`` row
        is never claimed. Ids unknown to the store are skipped. The claim holds the row until
        ``now + claimant.lease``; :meth:`renew` extends it. ``now`` (default ``time.time()``) is for tests."""
        now = time.time() if now is None else float(now)
        with self._write() as conn:
            state = {r[0]: r[1:] for r in conn.execute(
                "SELECT run_id, status, attempts, host, token, lease_until FROM runs")}
            for run_id in run_ids:
                if run_id in state and _free(run_id, *state[run_id], claimant=claimant, retry=retry, now=now):
                    self._start(conn, run_id, shard=shard, host=claimant.host, token=claimant.token,
                                lease_until=now + claimant.lease, now=now)
                    return run_id
        return None

    def claim(self, run_id: str, claimant: Claimant, *, retry: Mapping[str, int] | None = None,
              shard: str | None = None, now: float | None = None) -> bool:
        """:meth:`claim_next` for one run: True when ``claimant`` now holds it, False when it is not free."""
        if self.row(run_id) is None:
            raise StoreError(f"claim({run_id!r}): no such run in {self.path}; add it with ensure() first")
        return self.claim_next([run_id], claimant, retry=retry, shard=shard, now=now) == run_id

    def renew(self, run_id: str, claimant: Claimant, *, now: float | None = None) -> bool:
        """Extend ``claimant``'s lease on its running ``run_id`` to ``now + claimant.lease``; False when the row is
        no longer its claim (finished, or taken over after the lease expired)."""
        now = time.time() if now is None else float(now)
        with self._write() as conn:
            cursor = conn.execute("UPDATE runs SET lease_until = ? WHERE run_id = ? AND status = 'running' AND "
                                  "token = ?", (now + claimant.lease, run_id, claimant.token))
        return cursor.rowcount == 1

    def release(self, run_id: str, claimant: Claimant) -> bool:
        """End ``claimant``'s lease on ``run_id`` without a result (an interrupted attempt): the row stays
        ``running`` and any process may claim it at once. False when it was not ``claimant``'s running claim."""
        with self._write() as conn:
            cursor = conn.execute("UPDATE runs SET lease_until = 0 WHERE run_id = ? AND status = 'running' AND "
                                  "token = ?", (run_id, claimant.token))
        return cursor.rowcount == 1

    def mark_done(self, run_id: str, *, metric: float, metrics: dict, steps: int | None, duration: float,
                  run_dir: str, preset: str | None = None, claimant: Claimant | None = None) -> None:
        """Finish the running attempt of ``run_id`` with its primary test ``metric``, every test metric and the
        intensity ``preset`` its data was prepared with. With ``claimant``, the row must still be its claim, else
        :class:`LeaseLost` is raised and nothing is written."""
        metric = _finite(metric, "metric", run_id)
        metrics_json = json.dumps({str(k): _finite(v, f"metrics[{k!r}]", run_id) for k, v in metrics.items()},
                                  sort_keys=True)
        with self._write() as conn:
            self._require(run_id, ("running",), "mark_done", claimant)
            conn.execute(
                "UPDATE runs SET status = 'done', metric = ?, metrics = ?, steps = ?, duration = ?, run_dir = ?, "
                "error = NULL, preset = ?, lease_until = NULL, updated = ? WHERE run_id = ?",
                (metric, metrics_json, None if steps is None else int(steps), float(duration), str(run_dir),
                 None if preset is None else str(preset), time.time(), run_id),
            )

    def mark_failed(self, run_id: str, *, error: str, duration: float | None = None,
                    run_dir: str | None = None, claimant: Claimant | None = None) -> None:
        """Record that the running attempt of ``run_id`` failed with ``error`` (retried only when asked). With
        ``claimant``, the row must still be its claim, else :class:`LeaseLost` is raised and nothing is written."""
        with self._write() as conn:
            self._require(run_id, ("running",), "mark_failed", claimant)
            conn.execute(
                "UPDATE runs SET status = 'failed', error = ?, duration = ?, run_dir = ?, metric = NULL, "
                "metrics = '{}', lease_until = NULL, updated = ? WHERE run_id = ?",
                (str(error), None if duration is None else float(duration),
                 None if run_dir is None else str(run_dir), time.time(), run_id),
            )

    def rows(self, *, status: str | Sequence[str] | None = None) -> list[dict]:
        """Every row (or those with the given status or statuses), ordered by run id."""
        query = "SELECT * FROM runs"
        params: tuple[str, ...] = ()
        if status is not None:
            params = (status,) if isinstance(status, str) else tuple(status)
            bad = [s for s in params if s not in STATUSES]
            if bad:
                raise ValueError(f"rows(status=...): unknown status {bad}; use one or more of {list(STATUSES)}")
            query += f" WHERE status IN ({', '.join('?' * len(params))})"
        cursor = self._connection.execute(query + " ORDER BY run_id", params)
        return [_row_dict(cursor, r) for r in cursor.fetchall()]

    def row(self, run_id: str) -> dict | None:
        return self._row(run_id)

    def _row(self, run_id: str) -> dict | None:
        cursor = self._connection.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        found = cursor.fetchone()
        return None if found is None else _row_dict(cursor, found)

    def _require(self, run_id: str, allowed: tuple[str, ...], action: str, claimant: Claimant | None = None) -> dict:
        row = self._row(run_id)
        if row is None:
            raise StoreError(f"{action}({run_id!r}): no such run in {self.path}; add it with ensure() first")
        if claimant is not None and row["token"] != claimant.token:
            raise LeaseLost(f"{action}({run_id!r}): the run is no longer this process's claim (its lease expired and "
                            f"{row['host']} took it over, now {row['status']!r}); this attempt's result is dropped")
        if row["status"] not in allowed:
            hint = "call mark_running first" if action != "mark_running" else "a done run is never repeated"
            raise StoreError(f"{action}({run_id!r}): the run is {row['status']!r} (expected one of {list(allowed)}); "
                             f"{hint}")
        return row

    def todo(self, run_ids: Iterable[str], *, retry_failed: bool = False) -> list[str]:
        """Those of ``run_ids`` (order kept, duplicates dropped) still to run: pending, running (left by a killed
        process), unknown to the store, and failed when ``retry_failed``. Done runs never come back."""
        status = dict(self._connection.execute("SELECT run_id, status FROM runs").fetchall())
        skip = {"done"} if retry_failed else {"done", "failed"}
        out: list[str] = []
        seen: set[str] = set()
        for run_id in run_ids:
            if run_id not in seen and status.get(run_id) not in skip:
                out.append(run_id)
            seen.add(run_id)
        return out

    def counts(self) -> dict[str, int]:
        """Rows per status; every status is present, zero when none."""
        found = dict(self._connection.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
        return {s: int(found.get(s, 0)) for s in STATUSES}

    # -- merging shards -------------------------------------------------------------------------------------------
    def merge_from(self, other: str | Path | ResultStore) -> dict[str, int]:
        """Copy the rows of ``other`` (a shard's store) into this one, in one transaction.

        A row this store lacks is added. Otherwise the better row stays: done beats failed beats running beats
        pending; of two done rows the one here is kept (one run id is one run); of two rows with the same unfinished
        status the one with more attempts wins (ties keep this store's). Meta keys this store lacks are copied;
        both stores must agree on ``grid_hash`` if both have it. Returns ``{"added", "updated", "unchanged"}`` counts.
        """
        if isinstance(other, ResultStore):
            return self._merge(other)
        other_path = Path(other)
        if not other_path.is_file():
            raise StoreError(f"merge_from({str(other_path)!r}): no such store file; pass the results store a shard "
                             f"wrote")
        with ResultStore(other_path) as source:
            return self._merge(source)

    def _merge(self, source: ResultStore) -> dict[str, int]:
        theirs_meta = source._all_meta()
        incoming = source.rows()
        result = {"added": 0, "updated": 0, "unchanged": 0}
        with self._write() as conn:
            ours_meta = self._all_meta()
            if "grid_hash" in ours_meta and "grid_hash" in theirs_meta and \
                    ours_meta["grid_hash"] != theirs_meta["grid_hash"]:
                raise StoreError(
                    f"cannot merge {source.path} into {self.path}: they come from different grids (grid_hash "
                    f"{theirs_meta['grid_hash']!r} vs {ours_meta['grid_hash']!r}); merge only shards of one config")
            for key, value in theirs_meta.items():
                if key not in ours_meta:
                    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))
            for row in incoming:
                mine = self._row(row["run_id"])
                if mine is not None:
                    _check_same_cell(mine, row, self.path, str(source.path))
                    if not _replaces(row, mine):
                        result["unchanged"] += 1
                        continue
                result["added" if mine is None else "updated"] += 1
                values = dict(row, higher_is_better=int(row["higher_is_better"]),
                              metrics=json.dumps(row["metrics"], sort_keys=True))
                conn.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) VALUES "
                             f"({', '.join('?' * len(_COLUMNS))})", tuple(values[c] for c in _COLUMNS))
        return result

    # -- lifetime -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"


def shard_of(run_ids: Sequence[str], shard: str) -> list[str]:
    """The ``i``-th of ``n`` disjoint parts of ``run_ids`` for ``shard = "i/n"`` (1 <= i <= n).

    Part i holds the ids at positions ``k`` of the sorted, de-duplicated list with ``k % n == i - 1``, so every
    machine computes the same split from the same grid, the parts differ in size by at most one, and their union is
    the whole list.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard) if isinstance(shard, str) else None
    if match is None:
        raise ValueError(f"shard {shard!r}: expected the form 'i/n' with 1 <= i <= n, e.g. '1/4'")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ValueError(f"shard {shard!r}: expected the form 'i/n' with 1 <= i <= n, e.g. '1/{max(count, 1)}'")
    return [run_id for k, run_id in enumerate(sorted(set(run_ids))) if k % count == index - 1]


# -- helpers --------------------------------------------------------------------------------------------------------
def _cell_values(cell: dict) -> dict:
    missing = [k for k in ("run_id", *_IDENTITY) if k not in cell]
    if missing:
        raise ValueError(f"ensure(): cell {cell!r} lacks {missing}; each cell needs run_id, "
                         f"{', '.join(_IDENTITY)}")
    fraction = float(cell["fraction"])
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"ensure(): cell {cell['run_id']!r} has fraction {cell['fraction']!r}; a label fraction "
                         f"lies in (0, 1]")
    seed = cell["seed"]
    if isinstance(seed, bool) or int(seed) != seed:
        raise ValueError(f"ensure(): cell {cell['run_id']!r} has seed {seed!r}; a seed is an integer")
    return {"run_id": str(cell["run_id"]), "init": str(cell["init"]), "task": str(cell["task"]),
            "fraction": fraction, "seed": int(seed), "metric_name": str(cell["metric_name"]),
            "higher_is_better": bool(cell["higher_is_better"])}


def _check_same_cell(stored: dict, other: dict, path: Path, source: str) -> None:
    differ = {k: (stored[k], other[k]) for k in _IDENTITY if stored[k] != other[k]}
    if differ:
        raise StoreError(f"run {stored['run_id']!r} differs between {path} and {source} in {differ} (stored, "
                         f"other): they are different grids; use a new store for a changed config")


def _replaces(incoming: dict, existing: dict) -> bool:
    rank_in, rank_ex = _MERGE_RANK[incoming["status"]], _MERGE_RANK[existing["status"]]
    if rank_in != rank_ex:
        return rank_in > rank_ex
    # Attempts, not timestamps: clocks of different shard machines need not agree.
    return incoming["status"] != "done" and incoming["attempts"] > existing["attempts"]


def _finite(value: Any, name: str, run_id: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"mark_done({run_id!r}): {name} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise ValueError(f"mark_done({run_id!r}): {name} is {number}; a run without a finite result should be "
                         f"recorded with mark_failed")
    return number


def _row_dict(cursor: sqlite3.Cursor, values: tuple) -> dict:
    row = dict(zip((d[0] for d in cursor.description), values))
    row["higher_is_better"] = bool(row["higher_is_better"])
    row["metrics"] = json.loads(row["metrics"])
    return {c: row[c] for c in _COLUMNS}
