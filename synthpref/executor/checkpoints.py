"""Per-shard, per-stage Parquet checkpoints, written atomically.

A checkpoint is written to a temporary file in the same directory and renamed over its final name, so
a crash leaves either the whole shard or nothing. The stage's counters for that shard travel in the
Parquet metadata, which is what lets a resumed run report the same summary as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from synthpref.records import Record, records_from_arrow, records_to_arrow

_META_KEY = b"synthpref"


def shard_path(stage_dir: Path, shard: int) -> Path:
    return stage_dir / f"shard-{shard:05d}.parquet"


def write_shard(path: Path, records: list[Record], info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = records_to_arrow(records)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(info).encode()})
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_shard(path: Path) -> tuple[list[Record], dict]:
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    info = json.loads(meta.get(_META_KEY, b"{}"))
    return records_from_arrow(table), info


def read_info(path: Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(_META_KEY, b"{}"))


def counters_of(info: dict) -> Counter:
    return Counter(info.get("counters", {}))
