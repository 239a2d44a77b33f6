"""Prompt de-duplication, exact and near-duplicate (MinHash + LSH), across the whole input.

Exact duplicates are prompts whose texts are equal up to case, Unicode compatibility forms (NFKC:
full-width letters, ligatures) and runs of whitespace. Punctuation and symbols are kept: ``Is 5 > 3?``
and ``Is 5 < 3?`` are different questions, and so are ``Hello, world.`` and ``Hello world``.

Near duplicates are prompts whose shingle sets have an (estimated) Jaccard similarity of at least
``threshold``: each prompt gets a MinHash signature, locality-sensitive hashing (``datasketch``) finds
candidate matches, and a candidate counts only if its estimated similarity really reaches the
threshold (the LSH bands favour recall, so few such pairs are missed). Shingles are runs of
``ngram`` tokens, where a token is a folded word or a single punctuation or symbol character. Whitespace does not matter there (``3+4`` and ``3 + 4`` are near
duplicates), but operators do: in a short prompt a changed ``>`` alters most shingles, so prompts that
differ only in an operator stay apart at the default threshold. In a long prompt one changed symbol
touches few shingles, and such prompts are near duplicates by design. Of a group of duplicates the
first in input order is kept.

Across shards: the decision for every prompt is made once per run, in a pre-pass over the whole input
(:meth:`Stage.prepare`) before any shard is processed, and depends only on the input and these
parameters, both of which are part of the stage's checkpoint fingerprint. A resumed run, or a shard
processed in another run, therefore makes exactly the same decisions as an uninterrupted one. Place
this stage first (before generation): it sees the input prompts, not what earlier filters kept.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field

from synthpref.filters._common import (
    exact_text,
    keep_flagged,
    ngrams,
    prompt_text,
    words_and_symbols,
)
from synthpref.records import Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage

# LSH only proposes candidates, each verified against the threshold, so its bands are tuned to miss
# few (false negatives weigh 0.95) at the cost of more candidates to verify. With equal weights a pair
# at exactly the default threshold 0.8 was proposed 40% of the time, and at 0.85 about 75%.
_LSH_WEIGHTS = (0.05, 0.95)


class DedupParams(StageParams):
    near: bool = Field(
        True,
        description="also drop near duplicates (MinHash LSH), not only exact ones (equal up to case, "
        "Unicode NFKC forms and whitespace; punctuation and operators count)",
    )
    threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Jaccard similarity of shingles (words and symbols) from which prompts are near "
        "duplicates",
    )
    ngram: int = Field(
        3, ge=1, description="tokens (words, or punctuation/symbol characters) per shingle"
    )
    num_perm: int = Field(128, ge=16, description="MinHash permutations (more: more exact, slower)")
    seed: int = Field(1, description="seed of the MinHash permutations")
    roles: list[Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: ["user"], description="messages whose text makes up the prompt"
    )
    action: Literal["drop", "flag"] = Field(
        "drop", description="drop duplicates, or keep them marked in annotations['flags']"
    )


class _Index:
    """Prompts seen so far, in order: exact keys and (optionally) a MinHash LSH index."""

    def __init__(self, params: DedupParams) -> None:
        from datasketch import MinHash, MinHashLSH

        self.params = params
        self.exact: dict[str, str] = {}
        self._proto = MinHash(num_perm=params.num_perm, seed=params.seed)
        self._minhash = MinHash
        self.lsh = (
            MinHashLSH(threshold=params.threshold, num_perm=params.num_perm, weights=_LSH_WEIGHTS)
            if params.near
            else None
        )
        self.signatures: dict[str, object] = {}
        self.order: dict[str, int] = {}

    def add(self, record: Record) -> tuple[str, str] | None:
        """None if the record is new (and now indexed), else (kind, id of the prompt it repeats)."""
        text = prompt_text(record, tuple(self.params.roles))
        key = hashlib.sha256(exact_text(text).encode()).hexdigest()
        if key in self.exact:
            return "exact_duplicate", self.exact[key]
        if self.lsh is None:
            self.exact[key] = record.id
            return None
        tokens = words_and_symbols(text)
        n = min(self.params.ngram, max(len(tokens), 1))
        shingles = sorted(" ".join(g).encode() for g in ngrams(tokens, n)) or [b""]
        sig = self._minhash(
            num_perm=self.params.num_perm,
            seed=self.params.seed,
            permutations=self._proto.permutations,
            scheme=self._proto.scheme,
        )
        sig.update_batch(shingles)
        matches = [
            other
            for other in self.lsh.query(sig)
            if sig.jaccard(self.signatures[other]) >= self.params.threshold
        ]
        if matches:
            first = min(matches, key=lambda other: self.order[other])
            self.exact[key] = first  # a later exact copy repeats the prompt that was kept
            return "near_duplicate", first
        self.exact[key] = record.id
        self.order[record.id] = len(self.order)
        self.signatures[record.id] = sig
        self.lsh.insert(record.id, sig)
        return None


@register_stage
class Dedup(Stage):
    """Drops exact and near-duplicate prompts (MinHash LSH) across the whole input, first one kept."""

    type_name = "dedup"
    kind = "filter"
    Params = DedupParams
    params: DedupParams

    def __init__(self, name: str, params: DedupParams, ctx=None) -> None:
        super().__init__(name, params, ctx)
        self._decisions: dict[str, tuple[str, str]] | None = None
        self._running: _Index | None = None

    def prepare(self, records: list[Record], recipe=None) -> None:
        index = self._new_index()
        self._decisions = {}
        for record in records:
            found = index.add(record)
            if found is not None:
                self._decisions[record.id] = found

    def _new_index(self) -> _Index:
        return _Index(self.params)

    async def process(self, records: list[Record]) -> list[Record]:
        if self._decisions is None:
            # used outside the executor (no pre-pass): decide as shards arrive, which is exact for
            # shards processed in order by one stage object
            self._running = self._running or self._new_index()
            decisions = {}
            for record in records:
                found = self._running.add(record)
                if found is not None:
                    decisions[record.id] = found
        else:
            decisions = self._decisions
        out = []
        for record in records:
            found = decisions.get(record.id)
            if found is None:
                self.counters["kept"] += 1
                out.append(record)
                continue
            kind, original = found
            if self.params.action == "drop":
                self.counters[f"dropped:{kind}"] += 1
            else:
                keep_flagged(self, record, kind, duplicate_of=original)
                out.append(record)
        return out
