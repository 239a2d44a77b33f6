"""Reading prompts into records, reporting every malformed row by number and field.

Row numbers are 1-based positions in the source (line numbers for JSONL). A row with a missing, empty
or wrongly typed prompt, or a duplicate id, becomes an :class:`InputError`; the executor skips or stops
on these per the recipe's ``on_error`` setting.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
from pydantic import ValidationError

from synthpref.errors import DataError
from synthpref.recipes.schema import Recipe, SourceSpec
from synthpref.records import Message, Record


@dataclass(frozen=True)
class InputError:
    row: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"row {self.row}, field '{self.field}': {self.message}"


class SourceError(DataError, ValueError):
    """The source as a whole cannot be read; the message names the recipe key and the file."""


class RowError(DataError):
    """One row is malformed: ``field`` names the field at fault (``<row>`` for the row itself) and
    ``message`` what is wrong with it. Raised by a row converter and collected by
    :func:`convert_rows` as that row's :class:`InputError`; never raised out of a read."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field '{field}': {message}")
        self.field, self.message = field, message


def load_records(recipe: Recipe) -> tuple[list[Record], list[InputError]]:
    if recipe.source.seeds is not None:
        return seed_records(recipe.source.seeds, recipe.source.limit), []
    rows, columns = _read_source(recipe.source, recipe)
    if columns is not None:
        _check_columns(recipe.source, columns, _where(recipe.source, recipe))
    if recipe.source.limit:
        rows = rows[: recipe.source.limit]
    return rows_to_records(rows, recipe.source)


def seed_records(n: int, limit: int | None = None) -> list[Record]:
    """``source.seeds``: records with no prompt yet, ``seed-000000`` ..., for a prompt-writing stage
    to fill; ``metadata.seed`` is the record's number, which such stages derive their seeds from."""
    count = min(n, limit) if limit else n
    return [
        Record(id=f"seed-{k:06d}", prompt=[], source_row=k, metadata={"seed": k})
        for k in range(count)
    ]


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

    ``convert`` raises :class:`RowError` for a malformed row; ``duplicate(row, item, first_row)`` names
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
        except RowError as exc:
            errors.append(InputError(row_no, exc.field, exc.message))
            continue
        if item.id in seen:
            errors.append(InputError(row_no, *duplicate(row, item, seen[item.id])))
            continue
        seen[item.id] = row_no
        items.append(item)
    return items, errors


def _record(row_no: int, row: Any, source: SourceSpec) -> Record:
    if not isinstance(row, dict):
        raise RowError(
            "<row>",
            f"expected an object with a '{source.prompt_field}' field, got {type(row).__name__}",
        )
    field = source.prompt_field
    if field not in row or row[field] is None:
        raise RowError(field, "missing" if field in row else f"missing (the row has: {_keys(row)})")
    prompt = prompt_messages(row[field], field)
    if source.id_field:
        if row.get(source.id_field) in (None, ""):
            raise RowError(source.id_field, "missing")
        record_id = str(row[source.id_field])
    else:
        blob = json.dumps([m.model_dump() for m in prompt], sort_keys=True)
        record_id = hashlib.sha256(blob.encode()).hexdigest()[:16]
    metadata = {k: v for k, v in row.items() if k not in (field, source.id_field)}
    return Record(id=record_id, prompt=prompt, source_row=row_no, metadata=metadata)


def _keys(row: dict) -> str:
    keys = [str(k) for k in row]
    return (
        ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "") or "none"
    )


def prompt_messages(value: Any, field: str) -> list[Message]:
    """A prompt as chat messages: a non-empty string becomes one user message; a list must hold
    ``{role, content}`` messages with content, the last one the user's. :class:`RowError` naming
    ``field`` otherwise."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(field, "empty prompt")
        return [Message(role="user", content=value)]
    if isinstance(value, list) and value:
        try:
            messages = [Message.model_validate(m) for m in value]
        except ValidationError as exc:
            err = exc.errors()[0]
            raise RowError(
                field, f"message {err['loc'][0] if err['loc'] else ''}: {err['msg']}"
            ) from None
        if messages[-1].role != "user":
            raise RowError(
                field, "the last message must be from the user (it is what gets answered)"
            )
        if any(not m.content.strip() for m in messages):
            raise RowError(field, "a message has empty content")
        return messages
    kind = "empty list" if isinstance(value, list) else type(value).__name__
    raise RowError(field, f"expected a string or a list of {{role, content}} messages, got {kind}")


def no_usable_prompt(recipe: Recipe, errors: Sequence[InputError], errors_path: Path) -> str:
    """Why a run has nothing to do, naming the source, the field, the row count and where the
    rejected rows are listed (the executor raises this when every row was rejected)."""
    source = recipe.source
    where = _where(source, recipe)
    if not errors:
        return f"{where} holds no rows"
    return (
        f"none of the {len(errors)} row(s) of {where} holds a usable prompt in field "
        f"{source.prompt_field!r} (source.prompt_field); first: {errors[0]}; all listed in "
        f"{errors_path}"
    )


def _where(source: SourceSpec, base: Any) -> str:
    if source.path is not None:
        return str(base.resolve(source.path))
    return f"dataset {source.dataset!r}"


def read_rows(source: SourceSpec, base: Any, *, key: str | None = None) -> list[tuple[int, Any]]:
    """Numbered rows of the source (1-based; line numbers for JSONL, where a line that is not UTF-8
    or not JSON stands as its :class:`InputError`), or :class:`SourceError` when the source as a
    whole cannot be read.

    ``base`` resolves a relative path: a :class:`Recipe`, or anything with ``resolve(str) -> Path``.
    ``key`` is what the messages call the setting that names the data: ``source.path`` or
    ``source.dataset`` by default, a command-line option (``--data``) for data given there."""
    return _read_source(source, base, key)[0]


def _read_source(
    source: SourceSpec, base: Any, key: str | None = None
) -> tuple[list[tuple[int, Any]], list[str] | None]:
    """Numbered rows, and the column names when the source is a table (CSV, Parquet, dataset),
    whose header is then checked against the fields the recipe names."""
    if source.path is None:
        frame = _read_dataset(source, base, key or "source.dataset")
        return _frame_rows(frame), frame.columns
    key = key or "source.path"
    path = base.resolve(source.path)
    if not path.is_file():
        if path.is_dir():
            raise SourceError(f"{key}: {path} is a directory; name a file in it")
        raise SourceError(f"{key}: no such file {path}{_near_names(path)}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path), None
    if suffix == ".json":
        return _read_json(path, key), None
    if suffix in (".parquet", ".csv"):
        frame = _read_frame(path, suffix, key)
        return _frame_rows(frame), frame.columns
    raise SourceError(
        f"{key}: unsupported file type {suffix!r} of {path} (use .jsonl, .json, .parquet or .csv)"
    )


def _check_columns(source: SourceSpec, columns: list[str], where: str) -> None:
    """A table's header must hold the prompt (and id) column: a wrong header would otherwise reject
    every row one by one, which reads as a data problem rather than a naming one."""
    found = ", ".join(columns) if columns else "none"
    for key, name in (("prompt_field", source.prompt_field), ("id_field", source.id_field)):
        if name is not None and name not in columns:
            raise SourceError(
                f"source.{key}: {where} has no column {name!r}; its columns: {found} "
                f"(set source.{key} to the column that holds it)"
            )


def _utf8(path: Path, key: str) -> str:
    """The file's text; a byte that is not UTF-8 is named by line, since tools rarely show bytes."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SourceError(
            f"{key}: {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
            "save it as UTF-8"
        ) from None


def _read_json(path: Path, key: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(_utf8(path, key))
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{key}: {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    if not isinstance(data, list):
        raise SourceError(f"{key}: {path} must hold a JSON list of objects")
    return list(enumerate(data, start=1))


def _read_frame(path: Path, suffix: str, key: str) -> pl.DataFrame:
    kind = "Parquet" if suffix == ".parquet" else "CSV"
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path)
        text = _utf8(path, key)
        if not text.strip():
            raise SourceError(
                f"{key}: {path} is empty; a CSV needs a header row naming its columns, "
                "then one row per prompt"
            )
        return pl.read_csv(io.BytesIO(text.encode()), infer_schema_length=0)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise SourceError(f"{key}: {path} is not a readable {kind} file: {exc}") from None


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """One row per non-blank line; a line that is not UTF-8 or not JSON becomes that row's error."""
    rows: list[tuple[int, Any]] = []
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                message = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                rows.append((line_no, InputError(line_no, "<line>", message)))
                continue
            if not line.strip():
                continue
            try:
                rows.append((line_no, json.loads(line)))
            except json.JSONDecodeError as exc:
                rows.append((line_no, InputError(line_no, "<line>", f"not valid JSON: {exc.msg}")))
    return rows


def _frame_rows(frame: pl.DataFrame) -> list[tuple[int, Any]]:
    return list(enumerate(frame.to_dicts(), start=1))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def _read_dataset(source: SourceSpec, base: Any, key: str) -> pl.DataFrame:
    """A saved ``datasets`` directory or a local dataset folder when one exists; otherwise a Hub
    dataset, but only for an ``owner/name`` id whose first part is not a local folder either, so a
    mistyped local path fails at once instead of waiting on the Hub."""
    import datasets

    name = str(source.dataset)
    local = base.resolve(name)
    if local.exists():
        try:
            if (local / "dataset_info.json").exists() or (local / "state.json").exists():
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[source.split]
            else:
                ds = datasets.load_dataset(str(local), source.config, split=source.split)
        except Exception as exc:  # datasets raises many types; all mean "could not load"
            raise SourceError(f"{key}: cannot load {local}: {exc}") from exc
        return ds.to_polars()
    if not _HUB_ID.match(name) or base.resolve(name.split("/")[0]).exists():
        hint = "" if "/" in name else "; a Hugging Face Hub dataset is named owner/name"
        raise SourceError(f"{key}: no such file or directory {local}{_near_names(local)}{hint}")
    try:
        ds = datasets.load_dataset(name, source.config, split=source.split)
    except Exception as exc:  # datasets raises many types; all mean "could not load"
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                   if os.environ.get(v, "").upper() in _TRUE]  # fmt: skip
        note = f" (offline: {', '.join(offline)} set)" if offline else ""
        raise SourceError(
            f"{key}: {name!r}: there is no local file or directory {local}, and the "
            f"Hugging Face Hub dataset {name!r} could not be loaded{note}: {exc}"
        ) from exc
    return ds.to_polars()


def _near_names(path: Path) -> str:
    """Names beside ``path`` that look like it, for a mistyped path."""
    folder = path.parent
    if not folder.is_dir():
        return ""
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""
