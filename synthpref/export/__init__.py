"""Dataset formats written at the end of a run, streamed shard by shard from the final checkpoints.

Each format is a function from records to rows, registered under the name a recipe's
``output.formats`` uses; every format is written as Parquet and JSONL under ``<run>/data/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from synthpref.executor import checkpoints as ck
from synthpref.records import Record

RowBuilder = Callable[[Record], Iterable[dict]]
_FORMATS: dict[str, tuple[RowBuilder, pa.Schema]] = {}


def register_format(name: str, schema: pa.Schema):
    def wrap(fn: RowBuilder) -> RowBuilder:
        _FORMATS[name] = (fn, schema)
        return fn

    return wrap


def formats() -> dict[str, tuple[RowBuilder, pa.Schema]]:
    # importing registers the shipped formats
    from synthpref.export import kto, listwise, pointwise, preference, reward  # noqa: F401

    return dict(_FORMATS)


class ExportError(ValueError):
    pass


def export_all(names: list[str], shard_files: list[Path], out_dir: Path) -> dict[str, Path]:
    available = formats()
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ExportError(
            f"unknown output format(s) {unknown}; available: {', '.join(sorted(available))}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names:
        builder, schema = available[name]
        written[name] = _write(name, builder, schema, shard_files, out_dir)
    written["records"] = _write_records(shard_files, out_dir)
    return written


def _write(name, builder, schema, shard_files, out_dir: Path) -> Path:
    parquet_path = out_dir / f"{name}.parquet"
    tmp_parquet = parquet_path.with_suffix(".parquet.tmp")
    tmp_jsonl = out_dir / f".{name}.jsonl.tmp"
    with (
        pq.ParquetWriter(tmp_parquet, schema) as writer,
        tmp_jsonl.open("w", encoding="utf-8") as js,
    ):
        for path in shard_files:
            records, _ = ck.read_shard(path)
            rows = [row for r in records for row in builder(r)]
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            for row in rows:
                js.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp_parquet.replace(parquet_path)
    tmp_jsonl.replace(out_dir / f"{name}.jsonl")
    return parquet_path


def _write_records(shard_files: list[Path], out_dir: Path) -> Path:
    """Every record with all candidates and judgments, for inspection and re-use."""
    from synthpref.records import RECORD_SCHEMA

    path = out_dir / "records.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    with pq.ParquetWriter(tmp, RECORD_SCHEMA) as writer:
        for shard in shard_files:
            writer.write_table(pq.read_table(shard).replace_schema_metadata(None))
    tmp.replace(path)
    return path
