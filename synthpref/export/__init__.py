"""Dataset formats written at the end of a run, streamed shard by shard from the final checkpoints.

Each format is a :class:`Format` (a row builder, a pyarrow schema and a one-line description) found
by the name a recipe's ``output.formats`` uses in ``FORMATS`` (a :class:`synthpref.registry.Registry`):
the shipped ones from a lazy table, others from the ``synthpref.formats`` entry-point group of an
installed package. Every format is written as Parquet and JSONL under ``<run>/data/``.

A candidate's ``text`` is its answer alone, so a reasoning model's reasoning is left out of every
format by default. ``output.include_reasoning: true`` puts it back, for every format (plugins
included): each candidate that has reasoning is handed to the row builders with the text
``<think>{reasoning}</think>\n{answer}`` (:func:`with_reasoning`). ``data/records.parquet`` always
keeps the two apart, in the candidates' ``text`` and ``reasoning`` fields.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from synthpref.errors import ConfigError
from synthpref.executor import checkpoints as ck
from synthpref.records import Record
from synthpref.registry import Registry, UnknownName

RowBuilder = Callable[[Record], Iterable[dict]]

_FORMAT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
#: names whose files the export step writes itself
RESERVED_NAMES = frozenset({"records"})


@dataclass(frozen=True)
class Format:
    """A dataset format: ``rows`` turns one record into rows of ``schema`` (zero or more), written to
    ``data/<name>.parquet`` and ``data/<name>.jsonl``; ``description`` is the line that
    ``synthpref formats`` prints. A plugin package declares an instance under the
    ``synthpref.formats`` entry-point group, the entry point named as the format."""

    name: str
    rows: RowBuilder
    schema: pa.Schema
    description: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _FORMAT_NAME.fullmatch(self.name):
            raise ValueError(
                f"a format name is letters, digits, '_' and '-' (it names files), not {self.name!r}"
            )
        if self.name in RESERVED_NAMES:
            raise ValueError(f"the format name {self.name!r} is taken by data/{self.name}.parquet")
        if not callable(self.rows):
            raise TypeError(f"format {self.name!r}: rows must be callable (record -> rows)")
        if not isinstance(self.schema, pa.Schema):
            raise TypeError(
                f"format {self.name!r}: schema must be a pyarrow.Schema, not "
                f"{type(self.schema).__name__}"
            )
        if not isinstance(self.description, str) or len(self.description.strip().splitlines()) != 1:
            raise ValueError(f"format {self.name!r}: description must be one line of text")

    def __call__(self, record: Record) -> Iterable[dict]:
        return self.rows(record)

    def columns(self) -> dict[str, str]:
        """Column name -> Arrow type, in schema order."""
        return {field.name: str(field.type) for field in self.schema}


class ExportError(ConfigError, ValueError):
    """An output format that is not registered."""


class UnknownFormat(UnknownName, ExportError):
    """An output format name that does not resolve, or a format plugin that is not a Format."""


def _checked_format(obj: object, where: str, name: str) -> Format:
    if not isinstance(obj, Format):
        what = f"the class {obj.__name__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
        raise UnknownFormat(
            f"{where} is {what}, not a synthpref.export.Format (name, rows, schema, description)"
        )
    if obj.name != name:
        raise UnknownFormat(f"{where}: the Format is named {obj.name!r}, not {name!r}")
    return obj


def _origin(fmt: Format) -> str:
    rows = fmt.rows
    qualname = getattr(rows, "__qualname__", type(rows).__qualname__)
    return f"{getattr(rows, '__module__', '?')}:{qualname}"


#: the shipped formats, imported only when named
BUILTIN_FORMATS = {
    "preference": "synthpref.export.preference:preference_rows",
    "kto": "synthpref.export.kto:kto_rows",
    "reward": "synthpref.export.reward:reward_rows",
    "listwise": "synthpref.export.listwise:listwise_rows",
    "pointwise": "synthpref.export.pointwise:pointwise_rows",
}

FORMATS: Registry[Format] = Registry(
    "format",
    ("synthpref.formats",),
    validate=_checked_format,
    name_of=lambda fmt: fmt.name,
    builtins=BUILTIN_FORMATS,
    error=UnknownFormat,
    origin_of=_origin,
)


def register_format(name: str, schema: pa.Schema, description: str | None = None):
    """Decorator: a row builder becomes the :class:`Format` ``name``, registered at run time.

    ``description`` defaults to the first line of the function's docstring, else its module's."""

    def wrap(fn: RowBuilder) -> Format:
        doc = fn.__doc__ or getattr(sys.modules.get(fn.__module__), "__doc__", None) or ""
        line = description or (doc.strip().splitlines() or ["(no description)"])[0]
        return FORMATS.register(Format(name, fn, schema, line))

    return wrap


def get_format(name: str) -> Format:
    """The format ``name``; UnknownFormat (an ExportError) says why there is none."""
    return FORMATS.get(name)


class _FormatTable(Mapping[str, tuple[RowBuilder, pa.Schema]]):
    """name -> (rows, schema) over ``FORMATS``, for callers written before :class:`Format`.

    Keys are every known name; nothing is imported until a name is looked up. A known name that
    fails to load (a broken plugin) raises its UnknownFormat rather than pass for unknown."""

    def __getitem__(self, name: str) -> tuple[RowBuilder, pa.Schema]:
        try:
            fmt = FORMATS.get(name)
        except UnknownName:
            if name in FORMATS.names():
                raise
            raise KeyError(name) from None
        return fmt.rows, fmt.schema

    def __iter__(self) -> Iterator[str]:
        return iter(FORMATS.names())

    def __len__(self) -> int:
        return len(FORMATS.names())


def formats() -> Mapping[str, tuple[RowBuilder, pa.Schema]]:
    """Every format by name, as (rows, schema); new code uses ``FORMATS`` / ``get_format``."""
    return _FormatTable()


def with_reasoning(record: Record) -> Record:
    """``record`` with each candidate that has reasoning (not None) written as
    ``<think>{reasoning}</think>\n{answer}``, the form ``output.include_reasoning`` exports."""
    if all(c.reasoning is None for c in record.candidates):
        return record
    candidates = [
        c
        if c.reasoning is None
        else c.model_copy(update={"text": f"<think>{c.reasoning}</think>\n{c.text}"})
        for c in record.candidates
    ]
    return record.model_copy(update={"candidates": candidates})


def export_all(
    names: list[str], shard_files: list[Path], out_dir: Path, *, include_reasoning: bool = False
) -> dict[str, Path]:
    """Write each format ``names`` lists, and ``records.parquet``, into ``out_dir``;
    ``include_reasoning`` is the recipe's ``output.include_reasoning``."""
    chosen: dict[str, Format] = {}
    problems: list[UnknownName] = []
    for name in names:
        try:
            chosen[name] = FORMATS.get(name)
        except UnknownName as exc:
            problems.append(exc)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise UnknownFormat("; ".join(map(str, problems)), kind="format", known=FORMATS.names())
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, fmt in chosen.items():
        written[name] = _write(name, fmt.rows, fmt.schema, shard_files, out_dir, include_reasoning)
    written["records"] = _write_records(shard_files, out_dir)
    return written


def _write(name, builder, schema, shard_files, out_dir: Path, include_reasoning=False) -> Path:
    parquet_path = out_dir / f"{name}.parquet"
    tmp_parquet = parquet_path.with_suffix(".parquet.tmp")
    tmp_jsonl = out_dir / f".{name}.jsonl.tmp"
    with (
        pq.ParquetWriter(tmp_parquet, schema) as writer,
        tmp_jsonl.open("w", encoding="utf-8") as js,
    ):
        for path in shard_files:
            records, _ = ck.read_shard(path)
            if include_reasoning:
                records = [with_reasoning(r) for r in records]
            rows = [row for r in records for row in builder(r)]
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            for row in rows:
                js.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp_parquet.replace(parquet_path)
    tmp_jsonl.replace(out_dir / f"{name}.jsonl")
    return parquet_path


def _write_records(shard_files: list[Path], out_dir: Path) -> Path:
    """Every record with all candidates and judgments, for inspection and re-use; a checkpoint
    written before a column was added (e.g. candidates' ``reasoning``) is read and rewritten in the
    current schema."""
    from synthpref.records import RECORD_SCHEMA, records_from_arrow, records_to_arrow

    path = out_dir / "records.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    with pq.ParquetWriter(tmp, RECORD_SCHEMA) as writer:
        for shard in shard_files:
            table = pq.read_table(shard).replace_schema_metadata(None)
            if not table.schema.equals(RECORD_SCHEMA):
                table = records_to_arrow(records_from_arrow(table))
            writer.write_table(table)
    tmp.replace(path)
    return path
