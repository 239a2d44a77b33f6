"""Human-labelled preference pairs: reading, validating, selecting, and turning them into records.

A pair row has ``prompt`` (a string or a list of chat messages), ``chosen`` and ``rejected`` (the
response humans preferred and the other one; strings, or message lists whose last message is the
assistant's reply, as in TRL's conversational format, where a missing ``prompt`` is then read from the
messages before the reply), and optionally ``subset`` and ``id``. Every other column is kept as record
metadata, so judges that read an input column (a reference answer, a checklist) find it.

Malformed rows are reported by row number (1-based; the line number for JSONL) and field, like prompt
sources (:mod:`synthpref.sources`). An empty response is allowed: it is a legitimate, easy pair.

Each pair becomes a :class:`~synthpref.records.Record` with two candidates, ``A`` (listed first) and
``B``. Which of them is the chosen response is decided by a seeded shuffle that is balanced (half the
pairs list the chosen response first, within every subset), because source sets often list the correct
answer first and a judge with a position preference would otherwise look better or worse than it is.
The label never enters the record: it is returned beside it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthpref.recipes.schema import SourceSpec
from synthpref.records import Candidate, Message, Record
from synthpref.sources import (
    InputError,
    RowError,
    SourceError,
    convert_rows,
    prompt_messages,
    read_rows,
)

NO_SUBSET = "(none)"
FIRST, SECOND = "A", "B"
_RESERVED = ("prompt", "chosen", "rejected", "id")
_FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class LabelledPair:
    id: str
    row: int
    prompt: list[Message]
    chosen: str
    rejected: str
    subset: str = NO_SUBSET
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalItem:
    """One pair as judged: its record and where the chosen response was listed."""

    pair: LabelledPair
    record: Record
    chosen_id: str  # "A" (listed first) or "B"

    @property
    def rejected_id(self) -> str:
        return SECOND if self.chosen_id == FIRST else FIRST

    @property
    def chosen_first(self) -> bool:
        return self.chosen_id == FIRST


# reading ----------------------------------------------------------------------------------------


class _Base:
    """What :func:`synthpref.sources.read_rows` needs of a recipe: resolving a relative path."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def read_pair_rows(
    data: str | Path,
    *,
    split: str = "train",
    config: str | None = None,
    base_dir: Path | None = None,
) -> list[tuple[int, Any]]:
    """Rows of a .jsonl/.json/.parquet/.csv file, a saved ``datasets`` directory or a Hub dataset."""
    base = _Base(base_dir or Path.cwd())
    resolved = base.resolve(str(data))
    if resolved.suffix.lower() in _FILE_TYPES or resolved.is_file():
        spec = SourceSpec(path=str(resolved))
    else:
        spec = SourceSpec(dataset=str(data), split=split, config=config)
    return read_rows(spec, base, key="--data")


def load_pairs(
    data: str | Path,
    *,
    split: str = "train",
    config: str | None = None,
    base_dir: Path | None = None,
) -> tuple[list[LabelledPair], list[InputError]]:
    return rows_to_pairs(read_pair_rows(data, split=split, config=config, base_dir=base_dir))


def rows_to_pairs(rows: Sequence[tuple[int, Any]]) -> tuple[list[LabelledPair], list[InputError]]:
    def duplicate(row: Any, pair: LabelledPair, first: int) -> tuple[str, str]:
        where = "id" if isinstance(row, dict) and row.get("id") not in (None, "") else "<row>"
        what = f"id {pair.id!r}" if where == "id" else "the same prompt, chosen and rejected"
        return where, f"duplicate of row {first} ({what})"

    return convert_rows(rows, _pair, duplicate)


def _pair(row_no: int, row: Any) -> LabelledPair:
    if not isinstance(row, dict):
        raise RowError(
            "<row>",
            f"expected an object with 'prompt', 'chosen' and 'rejected', got {type(row).__name__}",
        )
    chosen, chosen_ctx = _response(row, "chosen")
    rejected, rejected_ctx = _response(row, "rejected")
    if row.get("prompt") is not None:
        prompt = prompt_messages(row["prompt"], "prompt")
    elif chosen_ctx:
        if chosen_ctx != rejected_ctx:
            raise RowError(
                "prompt",
                "missing, and the messages before 'chosen' and 'rejected' differ, so they do not "
                "give one prompt",
            )
        prompt = prompt_messages([m.model_dump() for m in chosen_ctx], "chosen")
    else:
        raise RowError("prompt", "missing")
    if chosen == rejected:
        raise RowError("rejected", "identical to 'chosen': there is nothing to judge")
    subset = row.get("subset")
    if subset is None or subset == "":
        subset = NO_SUBSET
    elif isinstance(subset, str | int | float | bool):
        subset = str(subset)
    else:
        raise RowError("subset", f"expected a string, got {type(subset).__name__}")
    if row.get("id") not in (None, ""):
        if not isinstance(row["id"], str | int):
            raise RowError("id", f"expected a string or an integer, got {type(row['id']).__name__}")
        pair_id = str(row["id"])
    else:
        blob = json.dumps(
            [[m.model_dump() for m in prompt], chosen, rejected], sort_keys=True, ensure_ascii=False
        )
        pair_id = hashlib.sha256(blob.encode()).hexdigest()[:16]
    metadata = {k: v for k, v in row.items() if k not in _RESERVED}
    return LabelledPair(pair_id, row_no, prompt, chosen, rejected, subset, metadata)


def _response(row: dict, field_: str) -> tuple[str, list[Message]]:
    """The response text, and the messages before it when the row gives a conversation."""
    if field_ not in row or row[field_] is None:
        raise RowError(field_, "missing")
    value = row[field_]
    if isinstance(value, str):
        return value, []
    if isinstance(value, list) and value:
        try:
            messages = [Message.model_validate(m) for m in value]
        except Exception as exc:  # pydantic's ValidationError; the first problem is enough
            raise RowError(field_, f"not a list of {{role, content}} messages: {exc}") from None
        if messages[-1].role != "assistant":
            raise RowError(field_, "the last message must be the assistant's response")
        return messages[-1].content, messages[:-1]
    kind = "empty list" if isinstance(value, list) else type(value).__name__
    raise RowError(field_, f"expected a string or a list of {{role, content}} messages, got {kind}")


# selecting --------------------------------------------------------------------------------------


def select_pairs(
    pairs: list[LabelledPair], *, subsets: Sequence[str] | None = None, limit: int | None = None
) -> list[LabelledPair]:
    """Pairs of the given subsets (all when none given), then the first ``limit`` of them."""
    if subsets:
        known = sorted({p.subset for p in pairs})
        unknown = [s for s in subsets if s not in known]
        if unknown:
            raise SourceError(
                f"--subset: no pair has subset {', '.join(map(repr, unknown))}; the data has: "
                + ", ".join(map(repr, known))
            )
        wanted = set(subsets)
        pairs = [p for p in pairs if p.subset in wanted]
    return pairs[:limit] if limit is not None else pairs


def chosen_first_flags(pairs: Sequence[LabelledPair], seed: int) -> list[bool]:
    """For each pair, whether its chosen response is listed first: a seeded, balanced shuffle.

    Within every subset exactly half of the pairs (rounded, alternately up and down across subsets with
    an odd count, so the total is off by at most one) list the chosen response first; which ones is a
    seeded random permutation.
    """
    rng = random.Random(f"synthpref-eval:{seed}")
    by_subset: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_subset.setdefault(p.subset, []).append(i)
    flags = [False] * len(pairs)
    extra_first = True
    for subset in sorted(by_subset):
        idx = by_subset[subset]
        n_first = len(idx) // 2
        if len(idx) % 2:
            n_first += int(extra_first)
            extra_first = not extra_first
        marks = [True] * n_first + [False] * (len(idx) - n_first)
        rng.shuffle(marks)
        for i, mark in zip(idx, marks, strict=True):
            flags[i] = mark
    return flags


def to_items(pairs: Sequence[LabelledPair], seed: int = 0) -> list[EvalItem]:
    """One record per pair with candidates ``A`` and ``B`` in the seeded, balanced order."""
    items = []
    for pair, first in zip(pairs, chosen_first_flags(pairs, seed), strict=True):
        a, b = (pair.chosen, pair.rejected) if first else (pair.rejected, pair.chosen)
        record = Record(
            id=pair.id,
            prompt=pair.prompt,
            source_row=pair.row,
            metadata=pair.metadata,
            candidates=[
                Candidate(id=FIRST, model="dataset", text=a, stage="eval-judges"),
                Candidate(id=SECOND, model="dataset", text=b, stage="eval-judges"),
            ],
        )
        items.append(EvalItem(pair, record, FIRST if first else SECOND))
    return items


def data_stem(data: str | Path) -> str:
    """A directory name for a data set: the file's stem, prefixed with its folder's name when the
    stem alone says nothing (``pandalm/pairs.jsonl`` -> ``pandalm-pairs``); a Hub name's slashes
    become ``__``."""
    text = str(data).rstrip("/")
    path = Path(text)
    if path.suffix.lower() in _FILE_TYPES:
        stem = path.stem
        generic = {"pairs", "data", "test", "train", "validation", "eval", "dev"}
        if stem.lower() in generic and path.parent.name not in ("", ".", ".."):
            return f"{path.parent.name}-{stem}"
        return stem
    if path.exists():
        return path.name
    return text.replace("/", "__")
