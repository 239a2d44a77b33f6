"""Per-shard, per-stage Parquet checkpoints, written atomically and durably.

A checkpoint is written to a temporary file in the same directory, flushed to the disk and renamed over
its final name (``durable.write_atomic``), so a crash leaves either the whole shard or nothing. The
stage's counters for that shard travel in the Parquet metadata, which is what lets a resumed run
report the same summary as an uninterrupted one. A checkpoint damaged anyway (a disk error, a copy cut
short) is detected on reading (:class:`CheckpointError`) so the executor can recompute that shard.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from synthpref.errors import DataError
from synthpref.executor.durable import write_atomic
from synthpref.records import Record, records_from_arrow, records_to_arrow

_META_KEY = b"synthpref"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(DataError, ValueError):
    """A checkpoint file that cannot be read back: truncated, not Parquet, or without its info."""


def stage_dir_name(index: int, name: str, fingerprint: str) -> str:
    """``NN-<name>-<fp12>``: one path component whatever the stage's name holds (a ``/`` or ``..``
    in a name must not lead checkpoints out of ``checkpoints/``). Safe names map to themselves, so
    existing run dirs keep resuming."""
    return f"{index:02d}-{_UNSAFE.sub('_', name)}-{fingerprint[:12]}"


def shard_path(stage_dir: Path, shard: int) -> Path:
    return stage_dir / f"shard-{shard:05d}.parquet"


def write_shard(path: Path, records: list[Record], info: dict) -> None:
    table = records_to_arrow(records)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(info).encode()})
    write_atomic(path, lambda fh: pq.write_table(table, fh), suffix=".parquet")


def read_shard(path: Path) -> tuple[list[Record], dict]:
    """The shard's records and its info as stored; CheckpointError when the file is not Parquet."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from exc
    return records_from_arrow(table), json.loads(
        (table.schema.metadata or {}).get(_META_KEY, b"{}")
    )


def verify_shard(path: Path) -> tuple[list[Record], dict]:
    """Like :func:`read_shard`, but the info must be there and agree with the rows (what resuming a
    run relies on); CheckpointError names the file otherwise."""
    try:
        table = pq.read_table(path)
        info = _info(table.schema, path)
        records = records_from_arrow(table)
    except CheckpointError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from exc
    if info["records_out"] != len(records):
        raise CheckpointError(
            f"{path} holds {len(records)} records but its info says {info['records_out']}"
        )
    return records, info


def read_info(path: Path) -> dict:
    """The shard's info from the Parquet footer alone (no rows read); CheckpointError if missing."""
    try:
        return _info(pq.read_schema(path), path)
    except CheckpointError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from exc


def _info(schema: pa.Schema, path: Path) -> dict:
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise CheckpointError(f"{path} has no synthpref metadata (record and counter info)")
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: its synthpref metadata is not JSON: {exc}") from None
    if not isinstance(info, dict) or not all(
        isinstance(info.get(k), int) for k in ("records_in", "records_out")
    ):
        raise CheckpointError(f"{path}: its synthpref metadata lacks records_in/records_out")
    return info


def remove_partial_writes(stage_dir: Path) -> None:
    """Delete the temporary files of checkpoint writes that a kill interrupted: never renamed into
    place, so never read, but left behind they would pile up in every stage directory."""
    if stage_dir.is_dir():
        for tmp in stage_dir.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)


def set_aside(path: Path) -> Path:
    """Move a damaged checkpoint out of the way (kept for inspection, ignored by every reader)."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    path.replace(target)
    return target


def counters_of(info: dict) -> Counter:
    return Counter(info.get("counters", {}))
