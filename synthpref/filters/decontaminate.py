"""Decontamination: drop prompts that overlap a user-given set of evaluation prompts.

Training on benchmark prompts inflates benchmark scores, so prompts that share long word sequences
with evaluation prompts are removed (the n-gram overlap test of GPT-3, Llama and Tulu decontamination).
Texts are compared as folded word tokens (case, Unicode NFKC forms and punctuation aside).

Overlap is measured against each evaluation item in both directions, and the larger share counts:

- how much of the *item* is inside the prompt (the share of the item's word ``ngram``-grams that occur
  in the prompt): an item pasted after a long instruction is caught, though it is a small part of the
  prompt;
- how much of the *prompt* is inside the item (the share of the prompt's ``ngram``-grams that occur in
  the item): a prompt that copies part of an item is caught, though it holds little of the item.

An item shorter than ``ngram`` words has no ``ngram``-gram, so it is matched as a whole: it counts as
inside a prompt (overlap 1.0) when its words occur in the prompt as one contiguous run, provided it has
at least ``short_min_words`` words; shorter items (a one-word answer is in too many prompts) and
prompts shorter than ``ngram`` words count only when equal to an item. A prompt is contaminated when
its overlap with some item reaches ``min_overlap``; the item with the highest overlap (the first in
the files on a tie) is the one reported, by its index in the evaluation set, when flagging.

A prompt is its user turns. In a conversation (several user turns) the test runs on all of them
together (an item split across turns is found) and on each turn alone (a turn that copies part of an
item is caught though the rest of the conversation dilutes it), and the highest overlap counts; a
single-turn prompt is tested once, as before. Assistant turns and system prompts are not compared:
they are model output or the recipe's, not the prompt a benchmark could have leaked.

``eval_prompts`` lists files of evaluation prompts, relative to the recipe: ``.txt`` (one prompt per
line), ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` with a ``prompt_field`` column (a string or a
list of chat messages). Their normalised content is part of the stage fingerprint, so editing the
evaluation set re-runs this stage (and everything after it) on resume.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from synthpref.filters._common import keep_flagged, ngrams, prompt_text, resolve, words
from synthpref.records import Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage

_SHOWN_CHARS = 80


class DecontaminateParams(StageParams):
    eval_prompts: list[str] = Field(
        min_length=1,
        description="files of evaluation prompts (.txt one per line, or .jsonl/.json/.parquet/.csv), "
        "relative to the recipe",
    )
    prompt_field: str = Field("prompt", description="the prompt column of structured files")
    ngram: int = Field(8, ge=1, description="words per n-gram")
    min_overlap: float = Field(
        0.5,
        gt=0,
        le=1,
        description="overlap with one evaluation item from which a prompt is contaminated: the larger "
        "of the share of the item's n-grams inside the prompt and the share of the prompt's n-grams "
        "inside the item",
    )
    short_min_words: int = Field(
        3,
        ge=1,
        description="an evaluation item shorter than ngram words is looked for inside prompts if it "
        "has at least this many words; a shorter one only matches an equal prompt",
    )
    action: Literal["drop", "flag"] = Field(
        "drop", description="drop contaminated prompts, or keep them marked in annotations['flags']"
    )


class Match(BaseModel):
    """The evaluation item a prompt overlaps most, and by how much."""

    overlap: float
    item: int | None = None


class _EvalIndex:
    """The evaluation items, indexed for both directions of the overlap test."""

    def __init__(self, items: list[list[str]], n: int, short_min_words: int) -> None:
        self.n = n
        self.grams_per_item: list[int] = []
        self.by_gram: dict[tuple[str, ...], list[int]] = {}
        self.short: dict[int, dict[tuple[str, ...], int]] = {}  # length -> words -> first item
        self.whole: dict[tuple[str, ...], int] = {}
        for i, tokens in enumerate(items):
            self.whole.setdefault(tuple(tokens), i)
            grams = ngrams(tokens, n)
            self.grams_per_item.append(len(grams))
            for gram in grams:
                self.by_gram.setdefault(gram, []).append(i)
            if not grams and len(tokens) >= short_min_words:
                self.short.setdefault(len(tokens), {}).setdefault(tuple(tokens), i)

    def match(self, tokens: list[str]) -> Match:
        best = Match(overlap=0.0)
        equal = self.whole.get(tuple(tokens))
        if equal is not None:
            return Match(overlap=1.0, item=equal)
        for size, items in sorted(self.short.items()):
            for gram in ngrams(tokens, size):
                if gram in items:
                    best = _better(best, Match(overlap=1.0, item=items[gram]))
        grams = ngrams(tokens, self.n)
        hits: Counter[int] = Counter()
        for gram in grams:
            for i in self.by_gram.get(gram, ()):
                hits[i] += 1
        for i, shared in hits.items():
            share = max(shared / self.grams_per_item[i], shared / len(grams))
            best = _better(best, Match(overlap=share, item=i))
        return best


def _better(a: Match, b: Match) -> Match:
    if b.overlap > a.overlap or (
        b.overlap == a.overlap and b.item is not None and (a.item is None or b.item < a.item)
    ):
        return b
    return a


@register_stage
class Decontaminate(Stage):
    """Drops prompts that contain, or are contained in, an evaluation prompt (word n-gram overlap)."""

    type_name = "decontaminate"
    kind = "filter"
    Params = DecontaminateParams
    params: DecontaminateParams

    def __init__(self, name: str, params: DecontaminateParams, ctx=None) -> None:
        super().__init__(name, params, ctx)
        self._texts: list[str] = []
        self._index: _EvalIndex | None = None
        self._hash: str | None = None

    prepare_streams = True  # its pre-pass loads the evaluation prompts and reads no record

    def prepare(self, records: Iterable[Record], recipe=None) -> None:
        self.load([resolve(p, recipe) for p in self.params.eval_prompts])

    def load(self, paths: list[Path]) -> None:
        texts: list[str] = []
        for path in paths:
            texts += read_prompts(path, self.params.prompt_field)
        if not texts:
            raise ValueError(f"eval_prompts: no prompt in {', '.join(map(str, paths))}")
        items = [words(t) for t in texts]
        self._texts = texts
        self._index = _EvalIndex(items, self.params.ngram, self.params.short_min_words)
        self._hash = hashlib.sha256("\n".join(" ".join(t) for t in items).encode()).hexdigest()

    def fingerprint(self) -> dict:
        return {"eval_prompts": self._hash} if self._hash else {}

    def match(self, text: str) -> Match:
        """The evaluation item ``text`` overlaps most (1.0: one holds the other entirely)."""
        if self._index is None:
            self.load([Path(p).expanduser() for p in self.params.eval_prompts])
        return self._index.match(words(text))

    def overlap(self, text: str) -> float:
        return self.match(text).overlap

    def match_record(self, record: Record) -> Match:
        """The evaluation item a record's prompt overlaps most: its user turns together and, in a
        conversation, each user turn alone (see the module docstring)."""
        turns = [m.content for m in record.prompt if m.role == "user"]
        texts = [prompt_text(record), *turns] if len(turns) > 1 else [prompt_text(record)]
        best = Match(overlap=0.0)
        for text in texts:
            best = _better(best, self.match(text))
        return best

    async def process(self, records: list[Record]) -> list[Record]:
        out = []
        for record in records:
            found = self.match_record(record)
            if found.overlap < self.params.min_overlap:
                self.counters["kept"] += 1
                out.append(record)
            elif self.params.action == "drop":
                self.counters["dropped:contaminated"] += 1
            else:
                keep_flagged(
                    self,
                    record,
                    "contaminated",
                    overlap=round(found.overlap, 3),
                    eval_item=found.item,
                    eval_text=_shown(self._texts[found.item]),
                )
                out.append(record)
        return out


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def read_prompts(path: Path, field: str = "prompt") -> list[str]:
    """Prompt texts of a file (user turns of message lists); raises ValueError on bad input."""
    if not path.is_file():
        raise ValueError(f"eval_prompts: no such file {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [
            line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"eval_prompts: {path} line {n} is not valid JSON: {exc.msg}"
                    ) from None
    elif suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"eval_prompts: {path} must hold a JSON list")
    elif suffix in (".parquet", ".csv"):
        import polars as pl

        frame = pl.read_parquet(path) if suffix == ".parquet" else pl.read_csv(path)
        rows = frame.to_dicts()
    else:
        raise ValueError(
            f"eval_prompts: unsupported file type {suffix!r} (use .txt, .jsonl, .json, .parquet, .csv)"
        )
    return [_text(row, field, path, i) for i, row in enumerate(rows, start=1)]


def _text(row: Any, field: str, path: Path, i: int) -> str:
    value = row if isinstance(row, str) else row.get(field) if isinstance(row, dict) else None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(
            m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "user"
        )
    raise ValueError(f"eval_prompts: {path} row {i} has no string or message-list '{field}'")
