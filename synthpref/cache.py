"""Content-addressed request cache: no completed model call is ever made twice.

Keys are hashes of (backend identity, request); values are the backend's JSON result. The identity
covers what the model is, not only its name (:mod:`synthpref.backends.identity`), so results of
weights rewritten in place or of other result-affecting engine settings are never served. Results are
committed as the backend reports them, batch by batch, so a run killed mid-shard keeps every call that
finished. A journal table logs each computation, which is how tests (and curious users) check that
nothing was computed twice.

A paid call's dollars are committed in the same transaction as its result (the ``spend`` table), so
a run directory's spending is known after any kill (:mod:`synthpref.backends.cost`). Provider batch
jobs are recorded in the same file (:mod:`synthpref.backends.batch`), through :meth:`transaction`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fetch_results(db: sqlite3.Connection, keys: list[str]) -> dict[str, str]:
    """The cached values of ``keys`` found in ``db``'s results table.

    Queried 500 keys at a time: SQLite caps the number of bound parameters per statement.
    """
    out: dict[str, str] = {}
    for k in range(0, len(keys), 500):
        chunk = keys[k : k + 500]
        marks = ",".join("?" * len(chunk))
        rows = db.execute(f"SELECT key, value FROM results WHERE key IN ({marks})", chunk)
        out.update(rows.fetchall())
    return out


class RequestCache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, kind TEXT, value TEXT, created REAL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS journal (key TEXT, pid INTEGER, created REAL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spend (key TEXT, model TEXT, dollars REAL, created REAL)"
        )

    def get_many(self, keys: list[str]) -> dict[str, str]:
        with self._lock:
            return fetch_results(self._db, keys)

    def put(self, key: str, kind: str, value: str, dollars: float = 0.0, model: str = "") -> None:
        """Store a result; ``dollars`` (what the call cost, billed to ``model``) with it, atomically."""
        now = time.time()
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?)", (key, kind, value, now))
            db.execute("INSERT INTO journal VALUES (?, ?, ?)", (key, os.getpid(), now))
            if dollars:
                db.execute("INSERT INTO spend VALUES (?, ?, ?, ?)", (key, model, dollars, now))

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection, inside one committed transaction (rolled back if the block raises)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def spent(self) -> float:
        """Dollars this cache's calls have cost, over every run that wrote to it."""
        with self._lock:
            return float(
                self._db.execute("SELECT COALESCE(SUM(dollars), 0) FROM spend").fetchone()[0]
            )

    def journal_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT key, COUNT(*) FROM journal GROUP BY key").fetchall()
        return dict(rows)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
