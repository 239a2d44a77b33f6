"""The request cache of distributed workers: read the run's cache, write a file of one's own.

SQLite's WAL mode, which lets several processes share ``cache.sqlite``, needs shared memory, so it
works only for processes on one host; on a network filesystem mounted by several nodes it can corrupt
the database. Workers therefore never write ``cache.sqlite``. Each opens it read-only (``immutable``,
which takes no lock and needs no shared memory) and writes the results it computes to its own file
under ``cache-workers/``; the driver folds those files back into ``cache.sqlite`` when the run ends and,
after a crash, when the next run of either executor starts. ``cache.sqlite`` does not change while
workers read it: only the driver writes it, before the workers start and after they stop.

The limit: during one run a worker does not see what other workers computed, so a request that occurs
in shards handled by different workers (a repeated prompt, a run-level calibration) is computed by each
of them, and the merged journal shows it more than once.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from synthpref.cache import RequestCache, fetch_results

WORKER_CACHE_DIR = "cache-workers"


class WorkerCache:
    """``ModelClient``'s cache interface over the run's cache (read-only) and a worker's own file."""

    def __init__(self, run_cache: Path, own: Path) -> None:
        self._base = _open_immutable(run_cache) if run_cache.exists() else None
        self.own = RequestCache(own)

    def get_many(self, keys: list[str]) -> dict[str, str]:
        found = self.own.get_many(keys)
        missing = [k for k in keys if k not in found]
        if self._base is not None and missing:
            found.update(fetch_results(self._base, missing))
        return found

    def put(self, key: str, kind: str, value: str, dollars: float = 0.0, model: str = "") -> None:
        self.own.put(key, kind, value, dollars, model)

    def close(self) -> None:
        self.own.close()
        if self._base is not None:
            self._base.close()


def _open_immutable(path: Path) -> sqlite3.Connection:
    # check_same_thread=False: backends report results from their own threads
    return sqlite3.connect(
        f"{path.resolve().as_uri()}?immutable=1", uri=True, check_same_thread=False
    )


def merge_worker_caches(run_dir: Path) -> int:
    """Fold every ``cache-workers/*.sqlite`` into ``cache.sqlite`` (results and journal) and delete
    it; then checkpoint the WAL so that workers' immutable readers see every result. Returns the
    number of files merged (results, journal and spending). Only the driver calls this, while no worker runs."""
    folder = run_dir / WORKER_CACHE_DIR
    files = sorted(folder.glob("*.sqlite")) if folder.is_dir() else []
    RequestCache(run_dir / "cache.sqlite").close()  # creates the file and its tables if needed
    db = sqlite3.connect(run_dir / "cache.sqlite", isolation_level=None, timeout=60)
    try:
        for path in files:
            db.execute("ATTACH DATABASE ? AS w", (str(path),))
            try:
                tables = {r[0] for r in db.execute("SELECT name FROM w.sqlite_master")}
                db.execute("BEGIN")
                if "results" in tables:
                    db.execute("INSERT OR IGNORE INTO results SELECT * FROM w.results")
                if "journal" in tables:
                    db.execute("INSERT INTO journal SELECT * FROM w.journal")
                if "spend" in tables:
                    db.execute("INSERT INTO spend SELECT * FROM w.spend")
                db.execute("COMMIT")
            finally:
                db.execute("DETACH DATABASE w")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    for path in files:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return len(files)
