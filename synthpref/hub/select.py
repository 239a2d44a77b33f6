"""What of a run leaves the machine: the dataset formats always, the full records only when asked.

``data/records.parquet`` holds everything a run saw, including every column of the prompt source
kept as ``metadata`` (user ids, emails, internal labels...). So a push uploads it only with
``records=True`` (``--records``), and even then with ``metadata`` emptied unless ``keep_metadata``
(``--keep-metadata``). ``drop_columns`` removes named columns from every uploaded table and, as
``metadata.KEY``, single source columns from the kept metadata. Each uploaded file is described by
:class:`UploadedFile`, which the dataset card lists column by column.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, field_validator, model_validator

from synthpref.hub.errors import PushError

METADATA = "metadata"
_BATCH = 1024


class UploadSelection(BaseModel):
    records: bool = Field(False, description="also upload data/records.parquet")
    keep_metadata: bool = Field(False, description="keep the source's columns in records' metadata")
    drop_columns: list[str] = Field(
        default_factory=list, description="columns to leave out; metadata.KEY for a source column"
    )

    @field_validator("drop_columns", mode="before")
    @classmethod
    def _split(cls, value):
        items = [value] if isinstance(value, str) else list(value or [])
        return [part.strip() for item in items for part in str(item).split(",") if part.strip()]

    @model_validator(mode="after")
    def _consistent(self) -> UploadSelection:
        if self.keep_metadata and not self.records:
            raise ValueError("--keep-metadata applies to records.parquet: add --records")
        for key in self.metadata_drops:
            if not self.records:
                raise ValueError(
                    f"{METADATA}.{key} applies to records.parquet, uploaded only with --records"
                )
            if not self.keep_metadata:
                raise ValueError(
                    f"{METADATA}.{key}: the source's columns are left out anyway unless "
                    "--keep-metadata; add it to keep the other ones"
                )
        return self

    @property
    def column_drops(self) -> set[str]:
        return {c for c in self.drop_columns if not c.startswith(f"{METADATA}.")}

    @property
    def metadata_drops(self) -> set[str]:
        return {
            c.removeprefix(f"{METADATA}.")
            for c in self.drop_columns
            if c.startswith(f"{METADATA}.")
        }


def selection(**options) -> UploadSelection:
    """An UploadSelection, with PushError for a contradictory choice."""
    try:
        return UploadSelection(**options)
    except ValueError as exc:
        errors = getattr(exc, "errors", None)
        message = errors()[0]["msg"].removeprefix("Value error, ") if errors else str(exc)
        raise PushError(message) from None


class UploadedFile(BaseModel):
    path: str = Field(description="path inside the uploaded repository")
    config: str
    rows: int
    columns: list[str]
    note: str = ""


def check_columns(choice: UploadSelection, schemas: dict[str, pa.Schema]) -> None:
    """Refuse a column to drop that none of the uploaded tables has (a typo would upload it)."""
    present = {name for schema in schemas.values() for name in schema.names}
    unknown = sorted(choice.column_drops - present)
    if unknown:
        raise PushError(
            f"unknown column {unknown[0]!r} in --drop-column; the uploaded files have: "
            f"{', '.join(sorted(present))}"
        )


def write_table(
    src: Path,
    dst: Path,
    repo_path: str,
    config: str,
    choice: UploadSelection,
    *,
    records: bool = False,
) -> UploadedFile:
    """Copy ``src`` to ``dst`` leaving out the chosen columns (and, for the records, the source's
    metadata as chosen); a table nothing is removed from is copied byte for byte."""
    parquet = pq.ParquetFile(src)
    drop = [c for c in parquet.schema_arrow.names if c in choice.column_drops]
    rewrite_metadata = records and METADATA not in drop  # also to list the kept source columns
    if not drop and not rewrite_metadata:
        shutil.copyfile(src, dst)
        return UploadedFile(
            path=repo_path, config=config, rows=parquet.metadata.num_rows,
            columns=parquet.schema_arrow.names, note=_note(records, choice, set()),
        )  # fmt: skip
    schema = pa.schema([f for f in parquet.schema_arrow if f.name not in drop])
    seen: set[str] = set()
    with pq.ParquetWriter(dst, schema) as writer:
        for batch in parquet.iter_batches(batch_size=_BATCH):
            table = pa.Table.from_batches([batch]).drop_columns(drop)
            if rewrite_metadata:
                table = _metadata_selected(table, choice, seen)
            writer.write_table(table.replace_schema_metadata(None))
    unknown = sorted(choice.metadata_drops - seen) if rewrite_metadata else []
    if unknown:
        raise PushError(
            f"unknown source column {METADATA}.{unknown[0]} in --drop-column; the records' "
            f"metadata has: {', '.join(sorted(seen)) or 'no column'}"
        )
    return UploadedFile(
        path=repo_path, config=config, rows=parquet.metadata.num_rows, columns=schema.names,
        note=_note(records, choice, seen - choice.metadata_drops),
    )  # fmt: skip


def _metadata_selected(table: pa.Table, choice: UploadSelection, seen: set[str]) -> pa.Table:
    values = []
    for text in table.column(METADATA).to_pylist():
        meta = json.loads(text) if text else {}
        seen.update(meta)
        kept = (
            {k: v for k, v in meta.items() if k not in choice.metadata_drops}
            if choice.keep_metadata
            else {}
        )
        values.append(json.dumps(kept, ensure_ascii=False, sort_keys=True))
    index = table.column_names.index(METADATA)
    return table.set_column(index, METADATA, pa.array(values, pa.string()))


def _note(records: bool, choice: UploadSelection, kept: set[str]) -> str:
    if not records or METADATA in choice.column_drops:
        return ""
    if not choice.keep_metadata:
        return "`metadata` is empty: the source columns were left out"
    listed = ", ".join(f"`{k}`" for k in sorted(kept)) or "none"
    some = "; some source columns were left out" if choice.metadata_drops else ""
    return f"`metadata` holds the source columns {listed}{some}"
