"""Decontamination: drop prompts that overlap a user-given set of evaluation prompts.

Training on benchmark prompts inflates benchmark scores, so prompts that share long word sequences
with evaluation prompts are removed (the n-gram overlap test of GPT-3, Llama and Tulu decontamination).
Texts are compared as lower-cased word tokens. A prompt is contaminated when at least ``min_overlap``
of its word ``ngram``-grams occur in some evaluation prompt; a prompt shorter than ``ngram`` words is
contaminated only if it equals an evaluation prompt.

``eval_prompts`` lists files of evaluation prompts, relative to the recipe: ``.txt`` (one prompt per
line), ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` with a ``prompt_field`` column (a string or a
list of chat messages). Their normalised content is part of the stage fingerprint, so editing the
evaluation set re-runs this stage (and everything after it) on resume.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from synthpref.filters._common import flag, ngrams, prompt_text, resolve, words
from synthpref.records import Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage


class DecontaminateParams(StageParams):
    eval_prompts: list[str] = Field(
        min_length=1,
        description="files of evaluation prompts (.txt one per line, or .jsonl/.json/.parquet/.csv), "
        "relative to the recipe",
    )
    prompt_field: str = Field("prompt", description="the prompt column of structured files")
    ngram: int = Field(8, ge=1, description="words per n-gram")
    min_overlap: float = Field(
        0.5, gt=0, le=1, description="share of a prompt's n-grams found in the evaluation set"
    )
    action: Literal["drop", "flag"] = "drop"


@register_stage
class Decontaminate(Stage):
    """Drops prompts whose word n-grams overlap a given set of evaluation prompts."""

    type_name = "decontaminate"
    kind = "filter"
    Params = DecontaminateParams
    params: DecontaminateParams

    def __init__(self, name: str, params: DecontaminateParams, ctx=None) -> None:
        super().__init__(name, params, ctx)
        self._eval: list[list[str]] | None = None
        self._grams: set[tuple[str, ...]] = set()
        self._whole: dict[str, int] = {}
        self._hash: str | None = None

    def prepare(self, records: list[Record], recipe=None) -> None:
        self.load([resolve(p, recipe) for p in self.params.eval_prompts])

    def load(self, paths: list[Path]) -> None:
        texts: list[str] = []
        for path in paths:
            texts += read_prompts(path, self.params.prompt_field)
        if not texts:
            raise ValueError(f"eval_prompts: no prompt in {', '.join(map(str, paths))}")
        self._eval = [words(t) for t in texts]
        n = self.params.ngram
        self._grams = set().union(*(ngrams(tokens, n) for tokens in self._eval))
        self._whole = {}
        for i, tokens in enumerate(self._eval):
            self._whole.setdefault(" ".join(tokens), i)
        self._hash = hashlib.sha256("\n".join(" ".join(t) for t in self._eval).encode()).hexdigest()

    def fingerprint(self) -> dict:
        return {"eval_prompts": self._hash} if self._hash else {}

    def overlap(self, text: str) -> float:
        """The share of ``text``'s n-grams that occur in the evaluation prompts (1.0: exact match)."""
        if self._eval is None:
            self.load([Path(p).expanduser() for p in self.params.eval_prompts])
        tokens = words(text)
        if len(tokens) < self.params.ngram:
            return 1.0 if " ".join(tokens) in self._whole else 0.0
        grams = ngrams(tokens, self.params.ngram)
        return len(grams & self._grams) / len(grams)

    async def process(self, records: list[Record]) -> list[Record]:
        out = []
        for record in records:
            share = self.overlap(prompt_text(record))
            if share < self.params.min_overlap:
                self.counters["kept"] += 1
                out.append(record)
            elif self.params.action == "drop":
                self.counters["dropped:contaminated"] += 1
            else:
                self.counters["kept"] += 1
                self.counters["flagged:contaminated"] += 1
                flag(record, self.name, "contaminated", overlap=round(share, 3))
                out.append(record)
        return out


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
