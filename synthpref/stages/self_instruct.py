"""Self-instruct (Wang et al. 2022): new instructions from a pool of seed tasks, kept only when novel.

Each input record drives one request: the model is shown ``num_examples`` instructions sampled
(seeded by the record id and the stage seed) from the pool, the record's own instruction first, and
asked for ``num_instructions`` new ones as a numbered list. Each parsed instruction is kept only if

- it is neither too short nor too long (``min_words``/``max_words``), does not start with
  punctuation or a non-ASCII character, and names nothing a text-only model cannot handle
  (``blocked_words``: the paper's keyword filter, images, files, audio, ...; ``blocked_starts``);
- its ROUGE-L F-measure against *every* instruction already in the pool is below ``max_rouge_l``
  (0.7 in the paper). By default (``compare: instruction``) only the instruction part of each text
  is compared: the text before its first blank line, where a task's input begins, so a copied
  instruction with another input is still a copy. The pool is every seed (the stage's input records, via :meth:`prepare`, plus
  ``seed_file``) and every instruction accepted so far, in this run, across shards.

The last item of a reply cut at ``max_tokens`` is dropped (it is likely cut mid-sentence). Every drop
is counted by reason (``dropped:<reason>``).

Because the pool grows shard by shard, the stage sets ``carries_state``: the local executor processes
its shards in order, and on a resume :meth:`replay` re-adds the instructions of finished shards, so
a resumed run decides exactly as an uninterrupted one. Requests of one shard are sent together, so
the machine-written in-context examples come from instructions accepted in earlier shards.

ROUGE-L is rouge-score's ``rouge_scorer`` (its default tokenizer, no stemming, as the paper's code);
:class:`RougePool` tokenizes each text once and skips the LCS for pool entries whose shared-word
count already bounds the F-measure below the best so far, so checking one instruction costs a bag
intersection per pool entry plus an O(n*m) LCS for the few similar ones: O(P) per candidate, as in
the paper (fine for pools of tens of thousands).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from synthpref.backends.types import GenerationRequest, SamplingParams
from synthpref.errors import DataError, TemplateError
from synthpref.records import Message, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage
from synthpref.templates import find_recipe_file, load_template

#: the paper's keyword filter: tasks a language model cannot do from text alone
BLOCKED_WORDS = [
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
]  # fmt: skip


class _CachingTokenizer:
    """rouge-score's default tokenizer (lower case, alphanumeric words, no stemming), each text
    tokenized once: the pool's texts are compared with many candidates."""

    def __init__(self) -> None:
        from rouge_score import tokenizers

        self._inner = tokenizers.DefaultTokenizer(use_stemmer=False)
        self._cache: dict[str, list[str]] = {}

    def tokenize(self, text: str) -> list[str]:
        tokens = self._cache.get(text)
        if tokens is None:
            tokens = self._cache[text] = self._inner.tokenize(text)
        return tokens

    def forget(self, text: str) -> None:
        self._cache.pop(text, None)


def rouge_scorer_l():
    """The ROUGE-L scorer both synthesis stages use (rouge-score, default tokenizer, cached)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_CachingTokenizer())


@dataclass(frozen=True)
class Similar:
    score: float
    """the highest ROUGE-L F found (exact when below the ``stop_at`` given; 0 for an empty pool)"""
    id: str | None
    """the pool entry that has it"""


class RougePool:
    """Instructions with ids, searchable by ROUGE-L F-measure."""

    def __init__(self) -> None:
        self._scorer = rouge_scorer_l()
        self._tok: _CachingTokenizer = self._scorer._tokenizer
        self.ids: list[str] = []
        self.texts: list[str] = []
        self._bags: list[Counter[str]] = []

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, entry_id: str, text: str) -> None:
        self.ids.append(entry_id)
        self.texts.append(text)
        self._bags.append(Counter(self._tok.tokenize(text)))

    def most_similar(self, text: str, stop_at: float | None = None) -> Similar:
        """The pool entry with the highest ROUGE-L F against ``text``. With ``stop_at``, the search
        stops at the first entry that reaches it (enough to reject ``text``).

        ROUGE-L F is 2 * LCS / (n + m) for texts of n and m tokens, and the LCS is at most the
        number of tokens the two share (as multisets), so an entry whose shared count cannot beat
        the best so far is skipped without its LCS: the result is the same as scoring every entry.
        """
        tokens = self._tok.tokenize(text)
        bag = Counter(tokens)
        n = len(tokens)
        best = Similar(0.0, None)
        if n == 0:
            return best
        for i, other in enumerate(self._bags):
            m = other.total()
            shared = sum((bag & other).values())
            if shared == 0 or 2 * shared / (n + m) <= best.score:
                continue
            score = self._scorer.score(self.texts[i], text)["rougeL"].fmeasure
            if score > best.score:
                best = Similar(score, self.ids[i])
                if stop_at is not None and score >= stop_at:
                    break
        return best

    def release(self, text: str) -> None:
        """Forget the cached tokens of a text that was looked up but not added (a pool entry's are
        simply recomputed when needed)."""
        self._tok.forget(text)


class SelfInstructParams(StageParams):
    model: str = Field("default", description="the model that writes the new instructions")
    num_examples: int = Field(
        8, ge=1, le=64, description="in-context examples per request (the record's own first)"
    )
    machine_examples: int = Field(
        2,
        ge=0,
        le=64,
        description="how many of the examples come from instructions accepted in earlier shards "
        "(once there are any; the rest are seeds)",
    )
    num_instructions: int = Field(
        8, ge=1, le=100, description="new instructions asked for per request"
    )
    max_rouge_l: float = Field(
        0.7,
        gt=0,
        le=1,
        description="keep an instruction only if its ROUGE-L F against every pool instruction is "
        "below this",
    )
    compare: Literal["instruction", "whole"] = Field(
        "instruction",
        description="what ROUGE-L compares: each task's instruction (its text before the first "
        "blank line, where an input starts; the paper compares instructions) or the whole text",
    )
    min_words: int = Field(4, ge=1, description="shorter instructions (in words) are dropped")
    max_words: int = Field(150, ge=1, description="longer instructions (in words) are dropped")
    blocked_words: list[str] = Field(
        default_factory=lambda: list(BLOCKED_WORDS),
        description="instructions naming any of these (whole words, any case) are dropped: tasks "
        "a text-only model cannot do",
    )
    blocked_starts: list[str] = Field(
        default_factory=lambda: ["write a program"],
        description="instructions starting with any of these (any case) are dropped",
    )
    seed_file: str | None = Field(
        None,
        description="more seed tasks: a .jsonl (field prompt_field: text or chat messages) or .txt "
        "(one per line) file, relative to the recipe; needed on a source.seeds recipe",
    )
    prompt_field: str = Field("prompt", description="the instruction field of seed_file rows")
    keep_seeds: bool = Field(
        False, description="also output each input record (before its new instructions)"
    )
    template: str = Field("self_instruct/generate.jinja", description="the request the model reads")
    temperature: float = Field(0.7, ge=0, description="sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling: keep this mass")
    max_tokens: int = Field(512, ge=1, le=1_048_576, description="longest reply, in tokens")
    seed: int = Field(0, description="seed of the example sampling and of the model's sampling")


def instruction_of(record: Record) -> str:
    """A record's instruction: its last user message ('' when it has none)."""
    for message in reversed(record.prompt):
        if message.role == "user":
            return message.content.strip()
    return ""


_ITEM = re.compile(r"^\s*\d{1,3}[.)](?:\s+(.*))?$")


def parse_numbered(text: str) -> list[str]:
    """The items of a numbered list; lines that follow an item without a number of their own
    belong to it (an instruction with its input, which may be a bulleted list). Text before the
    first item is dropped."""
    items: list[list[str]] = []
    for line in text.splitlines():
        m = _ITEM.match(line)
        if m:
            items.append([m.group(1) or ""])
        elif items:
            items[-1].append(line)
    return [s for s in ("\n".join(lines).strip() for lines in items) if s]


def _rng(*parts: Any) -> random.Random:
    blob = "|".join(str(p) for p in parts)
    return random.Random(int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big"))


def read_seed_file(path: Path, field: str) -> list[tuple[str, str]]:
    """(id, instruction) per row of a .jsonl or .txt seed file."""
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            out.append((f"{path.name}:{n}", line.strip()))
            continue
        try:
            row = json.loads(line)
            value = row[field]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path} line {n}: no {field!r} field ({exc})") from None
        if isinstance(value, list):
            users = [m.get("content", "") for m in value if m.get("role") == "user"]
            value = users[-1] if users else ""
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{path} line {n}: {field!r} is not a non-empty instruction")
        out.append((str(row.get("id", f"{path.name}:{n}")), value.strip()))
    return out


@register_stage
class SelfInstruct(Stage):
    """Self-instruct: new instructions from in-context seed tasks, kept when ROUGE-L-novel."""

    type_name = "self_instruct"
    kind = "generator"
    Params = SelfInstructParams
    params: SelfInstructParams
    model_params = ("model",)
    writes_prompts = True
    creates_prompts = True
    carries_state = True

    def __init__(self, name, params, ctx=None) -> None:
        super().__init__(name, params, ctx)
        self._seeds: list[tuple[str, str]] | None = None
        self._pool: RougePool | None = None
        self._machine: list[str] = []

    # recipe checks ------------------------------------------------------------------------------

    def check(self, previous: list[Stage]) -> list[str]:
        problems = []
        try:
            load_template(self.params.template, self.base_dir)
        except TemplateError as exc:
            problems.append(f"template: {exc}")
        if self.params.seed_file:
            try:
                path = find_recipe_file(self.params.seed_file, self.base_dir)
                read_seed_file(path, self.params.prompt_field)
            except (TemplateError, DataError) as exc:
                problems.append(f"seed_file: {exc}")
        if self.params.min_words > self.params.max_words:
            problems.append("min_words: larger than max_words")
        return problems

    def fingerprint(self) -> dict:
        extra: dict[str, Any] = {
            "template": load_template(self.params.template, self.base_dir).hash
        }
        if self.params.seed_file:
            path = find_recipe_file(self.params.seed_file, self.base_dir)
            extra["seed_file"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return extra

    # state --------------------------------------------------------------------------------------

    prepare_streams = True  # its pre-pass reads each record once, for the seed pool

    def prepare(self, records: Iterable[Record], recipe=None) -> None:
        """The seed pool: ``seed_file``'s tasks, then every input record's instruction."""
        seeds: list[tuple[str, str]] = []
        if self.params.seed_file:
            path = find_recipe_file(self.params.seed_file, self.base_dir)
            seeds += read_seed_file(path, self.params.prompt_field)
        seeds += [(r.id, t) for r in records if (t := instruction_of(r))]
        if not seeds:
            raise DataError(
                "self_instruct has no seed instruction: the input records have no prompt and no "
                "seed_file is given"
            )
        self._seeds = seeds
        self.start()

    def start(self) -> None:
        """A pass begins: the pool holds the seeds only."""
        self._pool = None
        self._machine = []

    def replay(self, records: list[Record]) -> None:
        """A finished shard's output: its accepted instructions join the pool, in order."""
        pool = self._ready_pool()
        for record in records:
            lineage = record.metadata.get("lineage") or {}
            if lineage.get("stage") == self.name and lineage.get("operation") == "self_instruct":
                self._accept(pool, record.id, instruction_of(record))

    def _ready_pool(self) -> RougePool:
        assert self._seeds is not None
        if self._pool is None:
            self._pool = RougePool()
            for seed_id, text in self._seeds:
                self._pool.add(seed_id, self._compared(text))
        return self._pool

    def _accept(self, pool: RougePool, entry_id: str, text: str) -> None:
        pool.add(entry_id, self._compared(text))
        self._machine.append(text)

    def _compared(self, text: str) -> str:
        """What ROUGE-L compares of an instruction (see ``compare``)."""
        if self.params.compare == "whole":
            return text
        return re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0].strip()

    # the work -----------------------------------------------------------------------------------

    def _examples(self, record: Record) -> list[str]:
        p = self.params
        assert self._seeds is not None
        rng = _rng(p.seed, record.id)
        own = instruction_of(record)
        seeds = [t for _, t in self._seeds if t != own]
        n_machine = min(p.machine_examples, len(self._machine), p.num_examples - bool(own))
        n_seed = min(p.num_examples - bool(own) - n_machine, len(seeds))
        picked = [own] if own else []
        picked += [seeds[i] for i in rng.sample(range(len(seeds)), n_seed)]
        picked += [self._machine[i] for i in rng.sample(range(len(self._machine)), n_machine)]
        return picked

    def _blocked(self, text: str) -> str | None:
        p = self.params
        words = len(text.split())
        if words < p.min_words:
            return "too_short"
        if words > p.max_words:
            return "too_long"
        if text[0] in string.punctuation or not text[0].isascii():
            return "bad_start"
        lower = text.lower()
        if any(lower.startswith(s.lower()) for s in p.blocked_starts):
            return "blocked_start"
        for word in p.blocked_words:
            if re.search(rf"\b{re.escape(word.lower())}\b", lower):
                return "blocked_word"
        return None

    async def process(self, records: list[Record]) -> list[Record]:
        p = self.params
        if self._seeds is None:  # used outside the executor: the first shard seeds the pool
            self.prepare(records)
        pool = self._ready_pool()
        template = load_template(p.template, self.base_dir)
        sampling = SamplingParams(
            temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, seed=p.seed
        )
        requests = []
        for record in records:
            examples = self._examples(record)
            text = template.render(examples=examples, n=p.num_instructions)
            requests.append(
                GenerationRequest(messages=[Message(role="user", content=text)], params=sampling)
            )
        results = await self.model_client(p.model).generate(requests)
        out: list[Record] = []
        for record, result in zip(records, results, strict=True):
            if p.keep_seeds and instruction_of(record):
                out.append(record)
            completion = result.completions[0]
            items = parse_numbered(completion.text)
            self.counters["parsed"] += len(items)
            if not items:
                self.counters["replies_without_list"] += 1
            if completion.finish_reason == "length" and items:
                items.pop()
                self.counters["dropped:truncated"] += 1
            root = (record.metadata.get("lineage") or {}).get("root", record.id)
            for k, text in enumerate(items):
                reason = self._blocked(text)
                similar = None
                if reason is None:
                    similar = pool.most_similar(self._compared(text), stop_at=p.max_rouge_l)
                    if similar.score >= p.max_rouge_l:
                        reason = "similar"
                if reason is not None:
                    self.counters[f"dropped:{reason}"] += 1
                    pool.release(self._compared(text))
                    continue
                assert similar is not None
                new_id = f"{record.id}.s{k}"
                self._accept(pool, new_id, text)
                self.counters["accepted"] += 1
                out.append(
                    Record(
                        id=new_id,
                        prompt=[Message(role="user", content=text)],
                        source_row=record.source_row,
                        metadata={
                            "lineage": {
                                "parent": record.id,
                                "root": root,
                                "operation": "self_instruct",
                                "index": k,
                                "stage": self.name,
                                "max_rouge_l": round(similar.score, 6),
                                "most_similar": similar.id,
                            }
                        },
                    )
                )
        return out
