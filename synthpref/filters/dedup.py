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

Across shards, where the prompts come from the input (this stage before any stage that writes
prompts): the decision for every prompt is made once per run, in a pre-pass over the whole input
(:meth:`Stage.prepare`) before any shard is processed, and depends only on the input and these
parameters, both of which are part of the stage's checkpoint fingerprint. A resumed run, or a shard
processed in another run, therefore makes exactly the same decisions as an uninterrupted one. Place
this stage first (before generation): it sees the input prompts, not what earlier filters kept.

After a stage that creates prompts (``creates_prompts``: Magpie, Evol-Instruct, self-instruct,
personas, a user turn; a custom stage that writes or rewrites prompts should set it too), the
prompts do not exist before
the run, so there is no pre-pass: the stage decides as shards arrive, in shard order, against a
running index of the prompts it has *kept* so far (``carries_state``: the local executor hands it
the shards strictly in order and, on a resume, replays the shards it finished earlier from its own
checkpoints, which hold exactly the kept prompts, and with ``action: flag`` also the flagged ones,
which the replay leaves out). The result equals an uninterrupted run's, and equals the pre-pass's
kept prompts on the same stream of prompts; only the reason given for an exact copy of a prompt
that was itself dropped as a near duplicate differs (there: ``near_duplicate`` of the kept prompt,
since only kept prompts are indexed; in the pre-pass: ``exact_duplicate``). The Ray executor, which
processes shards in parallel, refuses such a recipe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field

from synthpref.filters._common import (
    FLAGS,
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
    """Prompts seen so far, in order: exact keys and (optionally) a MinHash LSH index.

    ``remember_dropped`` (the pre-pass): a near duplicate's exact key is remembered too, so a later
    exact copy of it counts as an ``exact_duplicate`` of the prompt that was kept. Without it (the
    running index) only kept prompts are indexed, so that replaying a finished shard's kept prompts
    (:meth:`insert`) rebuilds exactly the state that processing it left.

    Per indexed prompt it keeps a 32-byte key, the MinHash values as a bare array and the LSH
    entries, never the record: the pre-pass reads the input once, as a stream."""

    def __init__(self, params: DedupParams, remember_dropped: bool = True) -> None:
        from datasketch import MinHash, MinHashLSH

        self.params = params
        self.remember_dropped = remember_dropped
        self.exact: dict[bytes, str] = {}
        self._proto = MinHash(num_perm=params.num_perm, seed=params.seed)
        self._minhash = MinHash
        self.lsh = (
            MinHashLSH(threshold=params.threshold, num_perm=params.num_perm, weights=_LSH_WEIGHTS)
            if params.near
            else None
        )
        self.signatures: dict[str, Any] = {}  # id -> MinHash values (a numpy array)
        self.order: dict[str, int] = {}

    def _key(self, text: str) -> bytes:
        return hashlib.sha256(exact_text(text).encode()).digest()

    def _signature(self, text: str):
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
        return sig

    def _keep(self, record_id: str, key: bytes, sig) -> None:
        self.exact[key] = record_id
        if self.lsh is not None:
            self.order[record_id] = len(self.order)
            self.signatures[record_id] = sig.hashvalues
            self.lsh.insert(record_id, sig)

    def _similarity(self, sig, other: str) -> float:
        """``MinHash.jaccard`` against a kept prompt's stored values (the same arithmetic)."""
        values = self.signatures[other]
        return float((sig.hashvalues == values).sum()) / float(len(values))

    def add(self, record: Record) -> tuple[str, str] | None:
        """None if the record is new (and now indexed), else (kind, id of the prompt it repeats)."""
        text = prompt_text(record, tuple(self.params.roles))
        key = self._key(text)
        if key in self.exact:
            return "exact_duplicate", self.exact[key]
        if self.lsh is None:
            self.exact[key] = record.id
            return None
        sig = self._signature(text)
        matches = [
            other
            for other in self.lsh.query(sig)
            if self._similarity(sig, other) >= self.params.threshold
        ]
        if matches:
            first = min(matches, key=lambda other: self.order[other])
            if self.remember_dropped:
                self.exact[key] = first  # a later exact copy repeats the prompt that was kept
            return "near_duplicate", first
        self._keep(record.id, key, sig)
        return None

    def insert(self, record: Record) -> None:
        """Index a prompt that was kept earlier (a replayed shard), without deciding again."""
        text = prompt_text(record, tuple(self.params.roles))
        key = self._key(text)
        if key in self.exact or record.id in self.order:
            return
        self._keep(record.id, key, self._signature(text) if self.lsh is not None else None)


_DUPLICATE_KINDS = ("exact_duplicate", "near_duplicate")


def creates_prompts_before(previous: list[Stage]) -> bool:
    """Whether some stage before this one writes (or rewrites) prompts, so that the prompts this
    stage sees do not exist before the run: the rule for deciding as shards arrive."""
    return any(getattr(stage, "creates_prompts", False) for stage in previous)


@register_stage
class Dedup(Stage):
    """Drops exact and near-duplicate prompts (MinHash LSH) across the whole input, first one kept;
    after a prompt-writing stage, across the prompts it writes, in shard order."""

    type_name = "dedup"
    kind = "filter"
    Params = DedupParams
    params: DedupParams

    def __init__(self, name: str, params: DedupParams, ctx=None) -> None:
        super().__init__(name, params, ctx)
        self._decisions: dict[str, tuple[str, str]] | None = None
        self._running: _Index | None = None

    def bind(self, previous: list[Stage]) -> None:
        # after a prompt-writing stage: no pre-pass, a running index carried across shards
        self.carries_state = creates_prompts_before(previous)

    def fingerprint(self) -> dict:
        # nothing for the pre-pass, so the fingerprints of recipes that dedup their input stay
        return {"decides": "in_shard_order"} if self.carries_state else {}

    prepare_streams = True  # its pre-pass reads each record once and keeps signatures, not records

    def prepare(self, records: Iterable[Record], recipe=None) -> None:
        if self.carries_state:
            self._decisions = None  # the input is not what this stage will see
            return
        index = self._new_index()
        self._decisions = {}
        for record in records:
            found = index.add(record)
            if found is not None:
                self._decisions[record.id] = found

    def _new_index(self, remember_dropped: bool = True) -> _Index:
        return _Index(self.params, remember_dropped)

    def start(self) -> None:
        self._running = self._new_index(remember_dropped=False)

    def replay(self, records: list[Record]) -> None:
        """A shard's output from an earlier run: index the prompts it kept (not those it flagged)."""
        if self._running is None:
            self.start()
        assert self._running is not None
        for record in records:
            if not self._flagged_here(record):
                self._running.insert(record)

    def _flagged_here(self, record: Record) -> bool:
        return any(
            isinstance(flag, dict)
            and flag.get("stage") == self.name
            and flag.get("flag") in _DUPLICATE_KINDS
            for flag in record.annotations.get(FLAGS, [])
        )

    async def process(self, records: list[Record]) -> list[Record]:
        if self._decisions is None:
            # after a prompt-writing stage, or used outside the executor (no pre-pass): decide as
            # shards arrive, which is exact for shards processed in order by one stage object
            if self._running is None:
                self.start()
            assert self._running is not None
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
