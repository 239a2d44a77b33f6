"""Reading prompts into records, reporting every malformed row by number and field.

Row numbers are 1-based positions in the source (line numbers for JSONL). A row with a missing, empty
or wrongly typed prompt, or a duplicate id, becomes an :class:`InputError`; the executor skips or stops
on these per the recipe's ``on_error`` setting.

Sources are read as a stream, never whole, so a source of any size fits in memory: JSONL line by
line, Parquet by row-group batches, CSV in batches (polars' streaming reader), a saved ``datasets``
directory or local dataset folder in batches of its memory-mapped Arrow table, and a Hub dataset
with ``streaming=True``. A ``.json`` file (one JSON list) is the exception: it is parsed whole. Each
read starts from the beginning, so a run reads its source more than once (see
``executor/common.py``); a Hub dataset is streamed from the Hub each time. ``source.limit`` stops
reading once that many usable rows have been read. What stays in memory per row is the
duplicate-id index (:class:`IdIndex`).
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import json
import os
import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
from pydantic import ValidationError

from synthpref.errors import DataError
from synthpref.recipes.schema import Recipe, SourceSpec
from synthpref.records import Message, Record

#: rows per batch read from a table (Parquet, CSV, dataset): small enough that a batch of wide rows
#: stays a few MiB, large enough that reading is not dominated by per-batch overhead
BATCH_ROWS = 1024


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
    """Every record and every malformed row of the recipe's source, in memory: for small inputs
    and tests; a run streams them (:func:`iter_records`)."""
    records: list[Record] = []
    errors: list[InputError] = []
    for item in iter_records(recipe):
        (errors if isinstance(item, InputError) else records).append(item)
    return records, errors


def iter_records(
    recipe: Recipe, known: Mapping[int, InputError] | None = None
) -> Iterator[Record | InputError]:
    """The recipe's input in source order: a :class:`Record` per usable row and an
    :class:`InputError` per malformed or duplicate one, read lazily from the start of the source at
    each call; stops once ``source.limit`` usable rows have been read. :class:`SourceError` (at the
    first ``next``, or where a damaged part of a file is reached) when the source cannot be read.

    ``known``: the errors, by row, of an earlier read of the same source. Those rows are yielded as
    those errors without being converted again, and no duplicate-id index is kept: the earlier read
    found every duplicate (a source changed since may hold new ones, which the caller must detect,
    as ``executor.common.RunInput`` does)."""
    source = recipe.source
    limit = source.limit
    if source.seeds is not None:
        count = min(source.seeds, limit) if limit else source.seeds
        yield from (_seed_record(k) for k in range(count))
        return
    where = _where(source, recipe)
    rows = iter_rows(source, recipe, check=lambda columns: _check_columns(source, columns, where))
    usable = 0
    try:
        for item in iter_converted(
            rows, lambda n, row: _record(n, row, source), _duplicate(source), known
        ):
            yield item
            if not isinstance(item, InputError):
                usable += 1
                if limit and usable >= limit:
                    return
    finally:
        rows.close()


def count_records(recipe: Recipe) -> int:
    """How many usable records the source holds, from one streaming read."""
    return sum(1 for item in iter_records(recipe) if not isinstance(item, InputError))


def seed_records(n: int, limit: int | None = None) -> list[Record]:
    """``source.seeds``: records with no prompt yet, ``seed-000000`` ..., for a prompt-writing stage
    to fill; ``metadata.seed`` is the record's number, which such stages derive their seeds from."""
    count = min(n, limit) if limit else n
    return [_seed_record(k) for k in range(count)]


def _seed_record(k: int) -> Record:
    return Record(id=f"seed-{k:06d}", prompt=[], source_row=k, metadata={"seed": k})


def rows_to_records(
    rows: Iterable[tuple[int, Any]], source: SourceSpec
) -> tuple[list[Record], list[InputError]]:
    return convert_rows(rows, lambda n, row: _record(n, row, source), _duplicate(source))


def _duplicate(source: SourceSpec) -> Callable[[Any, Record, int], tuple[str, str]]:
    field = source.id_field or source.prompt_field

    def duplicate(row: Any, record: Record, first: int) -> tuple[str, str]:
        return field, f"duplicate of row {first} (id {record.id!r})"

    return duplicate


T = TypeVar("T")


def convert_rows(
    rows: Iterable[tuple[int, Any]],
    convert: Callable[[int, Any], T],
    duplicate: Callable[[Any, T, int], tuple[str, str]],
) -> tuple[list[T], list[InputError]]:
    """Turn numbered rows into items with an ``id``, collecting every bad row instead of stopping.

    ``convert`` raises :class:`RowError` for a malformed row; ``duplicate(row, item, first_row)`` names
    the field and message for an item whose id an earlier row already took (the first one is kept).
    """
    items: list[T] = []
    errors: list[InputError] = []
    for item in iter_converted(rows, convert, duplicate):
        (errors if isinstance(item, InputError) else items).append(item)
    return items, errors


def iter_converted(
    rows: Iterable[tuple[int, Any]],
    convert: Callable[[int, Any], T],
    duplicate: Callable[[Any, T, int], tuple[str, str]],
    known: Mapping[int, InputError] | None = None,
) -> Iterator[T | InputError]:
    """:func:`convert_rows` as a stream: each row's item or :class:`InputError`, in order. What it
    keeps per row is an :class:`IdIndex` entry, so any number of rows may pass through; nothing
    with ``known`` (see :func:`iter_records`)."""
    seen = IdIndex() if known is None else None
    for row_no, row in rows:
        if known is not None and row_no in known:
            yield known[row_no]
            continue
        if isinstance(row, InputError):
            yield row
            continue
        try:
            item = convert(row_no, row)
        except RowError as exc:
            yield InputError(row_no, exc.field, exc.message)
            continue
        record_id: str = item.id  # type: ignore[attr-defined]
        first = None if seen is None else seen.first_row(record_id, row_no)
        yield item if first is None else InputError(row_no, *duplicate(row, item, first))


#: tables an :class:`IdIndex` spreads its ids over
_PARTS = 64


class IdIndex:
    """The ids seen so far, each with the row that first had it, in about 25 bytes per id.

    Ids are kept as 64-bit BLAKE2b hashes, not as strings (a Python ``dict`` of ids would cost a few
    hundred bytes per row, gigabytes for a large source), in :data:`_PARTS` open-addressing tables
    of staggered sizes: each grows by doubling, but not all at once, so the index is on average
    half full and its memory grows smoothly with the ids instead of by steps that briefly hold the
    old table and the new one. Two different ids share a hash with probability about
    ``n**2 / 2**65`` over ``n`` ids (3 in a million for ten million rows); the later one would then
    be reported as a duplicate of the earlier one's row. The hash is keyed by nothing, so the same
    source gives the same decisions in every process (a resumed run plans the same records)."""

    def __init__(self) -> None:
        self._parts = [_Slots(round(64 * 2 ** (i / _PARTS))) for i in range(_PARTS)]

    def __len__(self) -> int:
        return sum(part.count for part in self._parts)

    @staticmethod
    def _hash(record_id: str) -> int:
        blob = record_id.encode("utf-8", "surrogatepass")
        # 0 marks an empty slot, so the one id that hashes to it is moved to 1
        return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") or 1

    def first_row(self, record_id: str, row: int) -> int | None:
        """The row that first had ``record_id``; None when the id is new, which records ``row``."""
        key = self._hash(record_id)
        return self._parts[key % _PARTS].first_row(key, row)


class _Slots:
    """One open-addressing table of (non-zero 64-bit key, row), linearly probed, at most two
    thirds full; a key's home slot comes from the bits above those that chose its table."""

    def __init__(self, capacity: int) -> None:
        self.keys = _zeros("Q", capacity)
        self.rows = _zeros("I", capacity)
        self.count = 0

    def first_row(self, key: int, row: int) -> int | None:
        keys = self.keys
        size = len(keys)
        slot = (key // _PARTS) % size
        while keys[slot]:
            if keys[slot] == key:
                return self.rows[slot]
            slot = slot + 1 if slot + 1 < size else 0
        if row > 0xFFFFFFFF and self.rows.typecode == "I":
            self.rows = array("Q", self.rows)
        keys[slot] = key
        self.rows[slot] = row
        self.count += 1
        if 3 * self.count > 2 * size:
            self._grow()
        return None

    def _grow(self) -> None:
        old_keys, old_rows = self.keys, self.rows
        size = 2 * len(old_keys)
        self.keys = keys = _zeros("Q", size)
        self.rows = rows = _zeros(old_rows.typecode, size)
        for key, row in zip(old_keys, old_rows, strict=True):
            if key:
                slot = (key // _PARTS) % size
                while keys[slot]:
                    slot = slot + 1 if slot + 1 < size else 0
                keys[slot] = key
                rows[slot] = row


def _zeros(typecode: str, size: int) -> array:
    """An array of ``size`` zeros, built in place (from ``bytes`` it would briefly take twice the
    memory, and the index's peak is when it grows)."""
    return array(typecode, [0]) * size


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
    """Numbered rows of the source, all in memory (for small inputs such as labelled pairs; a run
    streams them with :func:`iter_rows`), or :class:`SourceError` when the source as a whole cannot
    be read.

    ``base`` resolves a relative path: a :class:`Recipe`, or anything with ``resolve(str) -> Path``.
    ``key`` is what the messages call the setting that names the data: ``source.path`` or
    ``source.dataset`` by default, a command-line option (``--data``) for data given there."""
    return list(iter_rows(source, base, key=key))


def iter_rows(
    source: SourceSpec,
    base: Any,
    *,
    key: str | None = None,
    check: Callable[[list[str]], None] | None = None,
) -> Iterator[tuple[int, Any]]:
    """Numbered rows of the source (1-based; line numbers for JSONL, where a line that is not UTF-8
    or not JSON stands as its :class:`InputError`), read lazily: the source is opened at the first
    ``next`` and read a batch at a time. ``check`` is given a table's column names (CSV, Parquet,
    dataset) before its first row, to refuse a header that lacks the fields the recipe names."""
    if source.path is None:
        columns, frames = _open_dataset(source, base, key or "source.dataset")
        yield from _frame_rows(columns, frames, check)
        return
    key = key or "source.path"
    path = base.resolve(source.path)
    if not path.is_file():
        if path.is_dir():
            raise SourceError(f"{key}: {path} is a directory; name a file in it")
        raise SourceError(f"{key}: no such file {path}{_near_names(path)}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path, key)
    elif suffix == ".parquet":
        yield from _frame_rows(*_open_parquet(path, key), check)
    elif suffix == ".csv":
        yield from _frame_rows(*_open_csv(path, key), check)
    else:
        raise SourceError(
            f"{key}: unsupported file type {suffix!r} of {path} (use .jsonl, .json, .parquet or "
            ".csv)"
        )


def _frame_rows(
    columns: list[str] | None,
    frames: Iterator[pl.DataFrame],
    check: Callable[[list[str]], None] | None,
) -> Iterator[tuple[int, Any]]:
    """A table's rows numbered from 1 across its batches; its header checked first (known up
    front, or, for a Hub stream that does not declare its features, that of the first batch)."""
    if columns is not None and check is not None:
        check(columns)
    row = 0
    for frame in frames:
        if columns is None:
            columns = frame.columns
            if check is not None:
                check(columns)
        for values in frame.to_dicts():
            row += 1
            yield row, values


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
        raise SourceError(_not_utf8(path, key, data[exc.start], line)) from None


def _not_utf8(path: Path, key: str, byte: int, line: int) -> str:
    return f"{key}: {path} is not UTF-8 text (byte 0x{byte:02x} on line {line}); save it as UTF-8"


def _first_non_utf8(path: Path) -> tuple[int, int] | None:
    """(byte, line) of the first byte that is not UTF-8, reading a line at a time (a multi-byte
    character never holds a newline byte, so lines decode alone)."""
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                return raw[exc.start], line_no
    return None


def _read_json(path: Path, key: str) -> Iterator[tuple[int, Any]]:
    """A JSON list, parsed whole: JSON has no record boundaries to stream by (use JSONL for big
    inputs)."""
    try:
        data = json.loads(_utf8(path, key))
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{key}: {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    if not isinstance(data, list):
        raise SourceError(f"{key}: {path} must hold a JSON list of objects")
    return enumerate(data, start=1)


def _open_parquet(path: Path, key: str) -> tuple[list[str], Iterator[pl.DataFrame]]:
    """The file's columns, and its rows in batches of :data:`BATCH_ROWS` (a row group is read at
    a time), each converted by polars exactly as reading the whole file would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    failures = (pa.ArrowException, OSError, pl.exceptions.PolarsError)

    def unreadable(exc: Exception) -> SourceError:
        return SourceError(f"{key}: {path} is not a readable Parquet file: {exc}")

    try:
        file = pq.ParquetFile(path)
        columns = file.schema_arrow.names
    except failures as exc:
        raise unreadable(exc) from None

    def frames() -> Iterator[pl.DataFrame]:
        try:
            for batch in file.iter_batches(batch_size=BATCH_ROWS):
                yield pl.from_arrow(batch)  # type: ignore[misc]
        except failures as exc:
            raise unreadable(exc) from None
        finally:
            file.close()

    return columns, frames()


def _open_csv(path: Path, key: str) -> tuple[list[str], Iterator[pl.DataFrame]]:
    """The header, and the rows in batches from polars' streaming reader; every column is text,
    as a whole-file read with ``infer_schema_length=0`` gives."""
    if _blank(path):
        raise SourceError(
            f"{key}: {path} is empty; a CSV needs a header row naming its columns, "
            "then one row per prompt"
        )
    failures = (pl.exceptions.PolarsError, OSError)

    def unreadable(exc: Exception) -> SourceError:
        bad = _first_non_utf8(path)
        if bad is not None:
            return SourceError(_not_utf8(path, key, *bad))
        return SourceError(f"{key}: {path} is not a readable CSV file: {exc}")

    try:
        lazy = pl.scan_csv(path, infer_schema_length=0, glob=False)
        columns = lazy.collect_schema().names()
    except failures as exc:
        raise unreadable(exc) from None

    def frames() -> Iterator[pl.DataFrame]:
        try:
            yield from lazy.collect_batches(chunk_size=BATCH_ROWS)
        except failures as exc:
            raise unreadable(exc) from None

    return columns, frames()


def _blank(path: Path) -> bool:
    """Whether the file holds only whitespace (read until the first other character)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 16):
            try:
                if decoder.decode(chunk).strip():
                    return False
            except UnicodeDecodeError:
                return False
    return True


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """One row per non-blank line; a line that is not UTF-8 or not JSON becomes that row's error."""
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                message = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                yield line_no, InputError(line_no, "<line>", message)
                continue
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, InputError(line_no, "<line>", f"not valid JSON: {exc.msg}")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def _open_dataset(
    source: SourceSpec, base: Any, key: str
) -> tuple[list[str] | None, Iterator[pl.DataFrame]]:
    """A saved ``datasets`` directory or a local dataset folder when one exists (its memory-mapped
    Arrow table read in batches); otherwise a Hub dataset, streamed (``streaming=True``: nothing is
    downloaded whole, and each read streams it again), but only for an ``owner/name`` id whose first
    part is not a local folder either, so a mistyped local path fails at once instead of waiting on
    the Hub. The columns are None where a Hub stream does not declare them."""
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
        return ds.column_names, ds.to_polars(batched=True, batch_size=BATCH_ROWS)
    if not _HUB_ID.match(name) or base.resolve(name.split("/")[0]).exists():
        hint = "" if "/" in name else "; a Hugging Face Hub dataset is named owner/name"
        raise SourceError(f"{key}: no such file or directory {local}{_near_names(local)}{hint}")

    def unreachable(exc: Exception) -> SourceError:
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                   if os.environ.get(v, "").upper() in _TRUE]  # fmt: skip
        note = f" (offline: {', '.join(offline)} set)" if offline else ""
        return SourceError(
            f"{key}: {name!r}: there is no local file or directory {local}, and the "
            f"Hugging Face Hub dataset {name!r} could not be loaded{note}: {exc}"
        )

    try:
        stream = datasets.load_dataset(name, source.config, split=source.split, streaming=True)
    except Exception as exc:  # datasets raises many types; all mean "could not load"
        raise unreachable(exc) from exc

    def frames() -> Iterator[pl.DataFrame]:
        try:
            for table in stream.with_format("arrow").iter(batch_size=BATCH_ROWS):
                yield pl.from_arrow(table)  # type: ignore[misc]
        except Exception as exc:  # a connection lost mid-stream, a malformed file on the Hub
            raise unreachable(exc) from exc

    return stream.column_names, frames()


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
