"""``run.json`` and ``summary.json``: what a run directory says about itself, typed at the boundary.

``run.json`` is written when a run is planned and names the run it belongs to (its fingerprint);
``summary.json`` is written when that run has exported its dataset and records the fingerprint it was
written for and a SHA-256 of every exported file. Anything that publishes or reports a run compares
the three: a rerun of an edited recipe that was killed before it finished leaves a ``run.json`` of the
new run next to the data and summary of the old one, and must not be mistaken for a finished run.

Both files carry ``synthpref_run`` (the layout version): it is what marks a directory as a synthpref
run, which ``--fresh`` requires before deleting anything. ``run.json`` files written before the marker
existed are recognised by their shape (fingerprint, input, stages and recipe).

Model calls and money, in ``summary.json``: each stage records the calls, cache hits, tokens and
dollars of the invocation that wrote it (a resumed invocation whose answers all came from the cache
records 0 calls and $0), per model too (billed tokens by kind, batch calls, dollars). What the run
directory has spent over every invocation is not a sum of summaries (a killed invocation writes
none): it is ``cache.sqlite``'s record of every paid call (:func:`read_spend`), which ``summary.json``
copies as ``spend`` when it is written. Summaries written before any of this read back with zeros.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synthpref.errors import DataError

RUN_LAYOUT = 1
_LEGACY_KEYS = {"fingerprint", "input", "stages", "recipe"}


class RunMetaError(DataError, ValueError):
    """A run.json or summary.json that is missing, not JSON, or not shaped as synthpref writes it."""


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StageEntry(_Lenient):
    name: str
    fingerprint: str


class RunInfo(_Lenient):
    synthpref_run: int | None = None
    fingerprint: str | None = Field(None, description="None while the run is being planned")
    input: str | None = None
    stages: list[StageEntry] = Field(default_factory=list)
    recipe: dict[str, Any] = Field(default_factory=dict)

    def written_by_synthpref(self) -> bool:
        return self.synthpref_run is not None or _LEGACY_KEYS <= self.model_fields_set


@dataclass
class StageSummary:
    """One stage's numbers, summed shard by shard from checkpoint infos: what a run writes into
    ``summary.json`` (read back as :class:`StageRecord`), and what the report recounts from every
    checkpoint of the run."""

    name: str
    type: str
    records_in: int = 0
    records_out: int = 0
    shards_resumed: int = 0
    counters: Counter = field(default_factory=Counter)
    tokens: int = 0
    calls: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    dollars: float = 0.0
    #: model name -> :data:`MODEL_COUNTS` of this invocation's calls (cache hits cost nothing)
    models: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, info: dict, resumed: bool) -> None:
        """Count one shard's checkpoint info (computed now or read back from a checkpoint)."""
        self.records_in += info["records_in"]
        self.records_out += info["records_out"]
        self.counters.update(info.get("counters", {}))
        self.seconds += info.get("seconds", 0.0)
        self.shards_resumed += int(resumed)

    def add_calls(self, stats: dict[str, Any]) -> None:
        """Add one set of clients' calls (``client_stats`` of an executor, or a summary read back);
        keys it lacks count as 0, so older summaries read back too."""
        self.calls += stats.get("calls", 0)
        self.cache_hits += stats.get("cache_hits", 0)
        self.tokens += stats.get("tokens", 0)
        self.dollars += stats.get("dollars", 0.0)
        for name, counts in (stats.get("models") or {}).items():
            mine = self.models.setdefault(name, {k: 0 for k in MODEL_COUNTS})
            for key in MODEL_COUNTS:
                mine[key] += counts.get(key, 0)
            mine["dollars"] = float(mine["dollars"])


#: what is counted per model of a stage: calls sent, cache hits, tokens (the client's count), the
#: prompt tokens as billed (uncached, read from and written to the provider's cache), output tokens,
#: calls answered by provider batch jobs, and US dollars
MODEL_COUNTS = (
    "calls",
    "cache_hits",
    "tokens",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "batch_calls",
    "dollars",
)


class ModelCalls(_Lenient):
    """One model's calls within one stage, as ``summary.json`` records them."""

    calls: int = 0
    cache_hits: int = 0
    tokens: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    batch_calls: int = 0
    dollars: float = 0.0


class StageRecord(_Lenient):
    name: str
    type: str = ""
    records_in: int = 0
    records_out: int = 0
    shards_resumed: int = 0
    counters: dict[str, int] = Field(default_factory=dict)
    tokens: int = 0
    calls: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    dollars: float = 0.0
    models: dict[str, ModelCalls] = Field(default_factory=dict)


class RunSpend(_Lenient):
    """What a run directory's model calls have cost, over every invocation: US dollars in all and
    per model (the recipe's model names), as billed; answers served from the cache cost nothing."""

    dollars: float = 0.0
    models: dict[str, float] = Field(default_factory=dict)


class FileDigest(_Lenient):
    sha256: str
    bytes: int


class RunSummary(_Lenient):
    synthpref_run: int | None = None
    fingerprint: str = ""
    input_rows: int = 0
    input_errors: int = 0
    stages: list[StageRecord] = Field(default_factory=list)
    outputs: dict[str, str] = Field(default_factory=dict)
    files: dict[str, FileDigest] | None = Field(
        None, description="run-dir-relative path -> digest of every exported file (None: older run)"
    )
    seconds: float = 0.0
    spend: RunSpend | None = Field(
        None, description="the run directory's spending when this was written (None: not recorded)"
    )
    price_table: str | None = Field(
        None, description="the date of the shipped price table the run used (None: not recorded)"
    )


M = TypeVar("M", bound=BaseModel)


def load(path: Path, model: type[M]) -> M:
    """``path`` parsed as ``model``; RunMetaError names the file and the offending field."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunMetaError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunMetaError(f"{path} cannot be read: {exc}") from None
    data = json_object(text, str(path))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise RunMetaError(f"{path}: {where}: {first['msg']}") from None


def json_object(text: str, where: str) -> dict[str, Any]:
    """``text`` parsed as one JSON object; RunMetaError says, after ``where``, what it is instead."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunMetaError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RunMetaError(f"{where} holds a JSON {type(data).__name__}, not an object")
    return data


def file_digest(path: Path) -> FileDigest:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return FileDigest(sha256=h.hexdigest(), bytes=size)


def changed_files(run_dir: Path, files: dict[str, FileDigest]) -> list[str]:
    """The recorded files that are missing or differ from their digest, as ``path (why)``."""
    out = []
    for rel, expected in files.items():
        path = run_dir / rel
        if not path.is_file():
            out.append(f"{rel} (missing)")
        elif path.stat().st_size != expected.bytes or file_digest(path).sha256 != expected.sha256:
            out.append(f"{rel} (changed since the run wrote it)")
    return out


def read_spend(run_dir: Path) -> RunSpend | None:
    """The run directory's spending from ``cache.sqlite`` (every paid call, committed with its
    result, over every invocation), read-only; None if there is no cache or it cannot be read."""
    path = Path(run_dir) / "cache.sqlite"
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        rows = db.execute(
            "SELECT model, SUM(dollars) FROM spend GROUP BY model ORDER BY model"
        ).fetchall()
    except sqlite3.Error:  # a cache written before spending was recorded
        return None
    finally:
        db.close()
    models = {str(m): float(d or 0.0) for m, d in rows}
    return RunSpend(dollars=sum(models.values()), models=models)


def format_usd(dollars: float) -> str:
    """Dollars as every summary shows them: four decimals below $1 (a test run's cents), else two."""
    if dollars == 0:
        return "$0"
    if abs(dollars) < 0.0001:
        return "<$0.0001"
    return f"${dollars:.4f}" if abs(dollars) < 1 else f"${dollars:,.2f}"
