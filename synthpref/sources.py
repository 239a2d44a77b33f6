"""Reading prompts into records, reporting every malformed row by number and field.

Row numbers are 1-based positions in the source (line numbers for JSONL). A row with a missing, empty
or wrongly typed prompt, or a duplicate id, becomes an :class:`InputError`; the executor skips or stops
on these per the recipe's ``on_error`` setting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
from pydantic import ValidationError

from synthpref.recipes.schema import Recipe, SourceSpec
from synthpref.records import Message, Record


@dataclass(frozen=True)
class InputError:
    row: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"row {self.row}, field '{self.field}': {self.message}"


class SourceError(ValueError):
    pass


def load_records(recipe: Recipe) -> tuple[list[Record], list[InputError]]:
    rows = _read_rows(recipe.source, recipe)
    if recipe.source.limit:
        rows = rows[: recipe.source.limit]
    return rows_to_records(rows, recipe.source)


def rows_to_records(
    rows: list[tuple[int, Any]], source: SourceSpec
) -> tuple[list[Record], list[InputError]]:
    field = source.id_field or source.prompt_field

    def duplicate(row: Any, record: Record, first: int) -> tuple[str, str]:
        return field, f"duplicate of row {first} (id {record.id!r})"

    return convert_rows(rows, lambda n, row: _record(n, row, source), duplicate)


T = TypeVar("T")


def convert_rows(
    rows: Sequence[tuple[int, Any]],
    convert: Callable[[int, Any], T],
    duplicate: Callable[[Any, T, int], tuple[str, str]],
) -> tuple[list[T], list[InputError]]:
    """Turn numbered rows into items with an ``id``, collecting every bad row instead of stopping.

    ``convert`` raises ``_RowError`` for a malformed row; ``duplicate(row, item, first_row)`` names
    the field and message for an item whose id an earlier row already took (the first one is kept).
    """
    items: list[T] = []
    errors: list[InputError] = []
    seen: dict[str, int] = {}
    for row_no, row in rows:
        if isinstance(row, InputError):
            errors.append(row)
            continue
        try:
            item = convert(row_no, row)
        except _RowError as exc:
            errors.append(InputError(row_no, exc.field, exc.message))
            continue
        if item.id in seen:
            errors.append(InputError(row_no, *duplicate(row, item, seen[item.id])))
            continue
        seen[item.id] = row_no
        items.append(item)
    return items, errors


class _RowError(Exception):
    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message


def _record(row_no: int, row: Any, source: SourceSpec) -> Record:
    if not isinstance(row, dict):
        raise _RowError(
            "<row>",
            f"expected an object with a '{source.prompt_field}' field, got {type(row).__name__}",
        )
    field = source.prompt_field
    if field not in row or row[field] is None:
        raise _RowError(field, "missing")
    prompt = _messages(row[field], field)
    if source.id_field:
        if row.get(source.id_field) in (None, ""):
            raise _RowError(source.id_field, "missing")
        record_id = str(row[source.id_field])
    else:
        blob = json.dumps([m.model_dump() for m in prompt], sort_keys=True)
        record_id = hashlib.sha256(blob.encode()).hexdigest()[:16]
    metadata = {k: v for k, v in row.items() if k not in (field, source.id_field)}
    return Record(id=record_id, prompt=prompt, source_row=row_no, metadata=metadata)


def _messages(value: Any, field: str) -> list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(field, "empty prompt")
        return [Message(role="user", content=value)]
    if isinstance(value, list) and value:
        try:
            messages = [Message.model_validate(m) for m in value]
        except ValidationError as exc:
            err = exc.errors()[0]
            raise _RowError(
                field, f"message {err['loc'][0] if err['loc'] else ''}: {err['msg']}"
            ) from None
        if messages[-1].role != "user":
            raise _RowError(
                field, "the last message must be from the user (it is what gets answered)"
            )
        if any(not m.content.strip() for m in messages):
            raise _RowError(field, "a message has empty content")
        return messages
    kind = "empty list" if isinstance(value, list) else type(value).__name__
    raise _RowError(field, f"expected a string or a list of {{role, content}} messages, got {kind}")


def _read_rows(source: SourceSpec, recipe: Recipe) -> list[tuple[int, Any]]:
    if source.path is not None:
        path = recipe.resolve(source.path)
        if not path.is_file():
            raise SourceError(f"source.path: no such file {path}")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, list):
                raise SourceError(f"source.path: {path} must hold a JSON list of objects")
            return list(enumerate(data, start=1))
        if suffix == ".parquet":
            return _frame_rows(pl.read_parquet(path))
        if suffix == ".csv":
            return _frame_rows(pl.read_csv(path, infer_schema_length=0))
        raise SourceError(
            f"source.path: unsupported file type {suffix!r} (use .jsonl, .json, .parquet or .csv)"
        )
    return _frame_rows(_read_dataset(source, recipe))


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append((line_no, json.loads(line)))
            except json.JSONDecodeError as exc:
                rows.append((line_no, InputError(line_no, "<line>", f"not valid JSON: {exc.msg}")))
    return rows


def _frame_rows(frame: pl.DataFrame) -> list[tuple[int, Any]]:
    return list(enumerate(frame.to_dicts(), start=1))


def _read_dataset(source: SourceSpec, recipe: Recipe) -> pl.DataFrame:
    import datasets

    local = recipe.resolve(source.dataset) if source.dataset else None
    try:
        if (local is not None and (local / "dataset_info.json").exists()) or (
            local is not None and (local / "state.json").exists()
        ):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[source.split]
        else:
            name = str(local) if local is not None and local.exists() else source.dataset
            ds = datasets.load_dataset(name, source.config, split=source.split)
    except Exception as exc:  # datasets raises many types; all mean "could not load"
        raise SourceError(f"source.dataset: cannot load {source.dataset!r}: {exc}") from exc
    return ds.to_polars()
