"""``run.json`` and ``summary.json``: what a run directory says about itself, typed at the boundary.

``run.json`` is written when a run is planned and names the run it belongs to (its fingerprint);
``summary.json`` is written when that run has exported its dataset and records the fingerprint it was
written for and a SHA-256 of every exported file. Anything that publishes or reports a run compares
the three: a rerun of an edited recipe that was killed before it finished leaves a ``run.json`` of the
new run next to the data and summary of the old one, and must not be mistaken for a finished run.

Both files carry ``synthpref_run`` (the layout version): it is what marks a directory as a synthpref
run, which ``--fresh`` requires before deleting anything. ``run.json`` files written before the marker
existed are recognised by their shape (fingerprint, input, stages and recipe).
"""

from __future__ import annotations

import hashlib
import json
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

    def add(self, info: dict, resumed: bool) -> None:
        """Count one shard's checkpoint info (computed now or read back from a checkpoint)."""
        self.records_in += info["records_in"]
        self.records_out += info["records_out"]
        self.counters.update(info.get("counters", {}))
        self.seconds += info.get("seconds", 0.0)
        self.shards_resumed += int(resumed)

    def add_calls(self, stats: dict[str, int]) -> None:
        self.calls += stats["calls"]
        self.cache_hits += stats["cache_hits"]
        self.tokens += stats["tokens"]


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
