"""Evol-Instruct (WizardLM, Xu et al. 2023): prompts rewritten into harder or new ones, round by round.

Each round, every prompt still alive is evolved by one operation, chosen by a random stream seeded
from the prompt's record id, the round and the stage ``seed`` (``operations`` gives the weights):

- in depth: ``add_constraints``, ``deepen``, ``concretize``, ``increase_reasoning``,
  ``complicate_input`` (templates ``prompts/evol/<operation>.jinja``, sharing ``evol/_depth.jinja``);
- in breadth: ``breadth``, a new prompt of the same domain on a rarer topic (one draw in six with the
  default weights).

An evolution fails (it is dropped, counted as ``dropped:<reason>``, and its lineage stops) when, in
this order (WizardLM's elimination rules, the first two being ours):

1. ``empty``: the model wrote nothing; ``truncated``: the reply was cut at ``max_tokens``;
2. ``template_phrasing``: it copies the template's own wording (``banned_phrases``: "#Rewritten
   Prompt#", "given prompt", "how to make it harder", ...);
3. ``refused``: it is an apology instead of a prompt ("I'm sorry", "I cannot", "As an AI" ...);
4. ``no_information_gain``: fewer than ``min_new_words`` of its words lie outside its longest common
   subsequence with its parent (rouge-score's tokenizer): a copy or a near-copy; and, with
   ``judge_model`` set, ``judge_not_more_complex`` when that model answers No to "does the evolved
   prompt ask for more than its parent?" (in-depth evolutions only; an unreadable answer keeps the
   prompt and counts ``judge_unparsed``);
5. with ``response_check`` (default on), the model is asked the evolved prompt:
   ``model_cannot_respond`` when its reply contains "sorry" and has fewer than ``sorry_max_words``
   words, ``response_empty`` when the reply holds only punctuation and stop words.

The prompt evolved is a record's last user message; a child keeps its parent's messages before it.
A child's id is ``<parent id>.e<round>`` and ``metadata.lineage`` is ``{parent, root, operation,
round, stage}`` (an input record kept in the output gets ``{parent: null, root: id, operation:
null, round: 0}``). ``keep`` chooses the output: ``all`` (inputs and every surviving evolution),
``final`` (each lineage's last surviving evolution) or ``input+final``. The output of a shard
depends on that shard alone, so the stage is deterministic and resumes like any other.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from synthpref.backends.types import GenerationRequest, GenerationResult, SamplingParams
from synthpref.errors import TemplateError
from synthpref.records import Message, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage
from synthpref.stages.self_instruct import rouge_scorer_l
from synthpref.templates import Template, load_template

DEPTH = ("add_constraints", "deepen", "concretize", "increase_reasoning", "complicate_input")
OPERATIONS = (*DEPTH, "breadth")

#: the shipped templates' own labels and wording (an evolution that repeats them echoes the template)
BANNED_PHRASES = [
    "#given prompt#", "#rewritten prompt#", "#created prompt#", "given prompt",
    "rewritten prompt", "created prompt", "how to make it harder",
]  # fmt: skip

_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry\b|i apologi[sz]e|i can ?not\b|i can't\b|i'm unable|"
    r"i am unable|as an ai\b)",
    re.IGNORECASE,
)

STOP_WORDS = frozenset(
    "a an the and or but if then so of to in on at by for with from as is are was were be been "
    "being it its this that these those i you he she we they me him her us them my your our their "
    "not no yes do does did have has had will would can could should may might must shall there "
    "here what which who whom whose when where why how all any some such very just also".split()
)


class Operations(StageParams):
    """The relative weight of each operation (0 turns one off)."""

    add_constraints: float = Field(1.0, ge=0, description="in depth: one more constraint")
    deepen: float = Field(1.0, ge=0, description="in depth: a deeper, broader inquiry")
    concretize: float = Field(1.0, ge=0, description="in depth: general ideas made specific")
    increase_reasoning: float = Field(
        1.0, ge=0, description="in depth: explicitly several reasoning steps"
    )
    complicate_input: float = Field(
        1.0, ge=0, description="in depth: a concrete input (table, code, data) to work on"
    )
    breadth: float = Field(
        1.0, ge=0, description="in breadth: a new prompt of the same domain, rarer topic"
    )


class Templates(StageParams):
    """The template of each operation, and of the optional judge."""

    add_constraints: str = Field(
        "evol/add_constraints.jinja", description="in-depth: add constraints"
    )
    deepen: str = Field("evol/deepen.jinja", description="in-depth: deepen")
    concretize: str = Field("evol/concretize.jinja", description="in-depth: concretize")
    increase_reasoning: str = Field(
        "evol/increase_reasoning.jinja", description="in-depth: more reasoning steps"
    )
    complicate_input: str = Field(
        "evol/complicate_input.jinja", description="in-depth: complicate the input"
    )
    breadth: str = Field("evol/breadth.jinja", description="in-breadth: a new prompt")
    judge: str = Field(
        "evol/more_complex.jinja", description="judge_model's question (parent, evolved)"
    )


class EvolInstructParams(StageParams):
    model: str = Field("default", description="the model that evolves the prompts")
    rounds: int = Field(2, ge=1, le=16, description="evolution rounds (one operation each)")
    operations: Operations = Field(
        default_factory=Operations, description="weight of each operation (0: never)"
    )
    templates: Templates = Field(
        default_factory=Templates, description="template of each operation and of the judge"
    )
    keep: Literal["all", "final", "input+final"] = Field(
        "all",
        description="all: inputs and every surviving evolution; final: each lineage's last "
        "surviving evolution; input+final: both",
    )
    min_new_words: int = Field(
        3,
        ge=0,
        description="an evolution with fewer words outside its longest common subsequence with "
        "its parent adds no information and is dropped",
    )
    banned_phrases: list[str] = Field(
        default_factory=lambda: list(BANNED_PHRASES),
        description="an evolution containing any of these (any case) copies the template's "
        "wording and is dropped",
    )
    judge_model: str | None = Field(
        None,
        description="ask this model whether each in-depth evolution asks for more than its "
        "parent; No drops it (null: no judge)",
    )
    response_check: bool = Field(
        True,
        description="ask the model each evolved prompt; drop it when the reply is a short "
        "apology or holds only punctuation and stop words",
    )
    response_max_tokens: int = Field(
        128, ge=1, le=1_048_576, description="longest reply of the response check, in tokens"
    )
    sorry_max_words: int = Field(
        80, ge=1, description="a reply with 'sorry' and fewer words than this: cannot respond"
    )
    temperature: float = Field(0.7, ge=0, description="sampling temperature of the evolutions")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling: keep this mass")
    max_tokens: int = Field(
        256, ge=1, le=1_048_576, description="longest evolved prompt (longer ones are dropped)"
    )
    seed: int = Field(0, description="seed of the operation choice and of the model's sampling")


@dataclass
class _Live:
    """A prompt evolving: its record, and the record it came from (None for an input)."""

    record: Record
    root: str
    origin: str
    """the id of the input record of this shard it descends from"""
    operation: str | None = None
    parent_text: str = ""
    text: str = ""


def last_user(record: Record) -> int | None:
    for i in range(len(record.prompt) - 1, -1, -1):
        if record.prompt[i].role == "user":
            return i
    return None


def choose_operation(seed: int, record_id: str, round_: int, weights: dict[str, float]) -> str:
    """The operation for one record in one round: a pure function of the three and the weights."""
    blob = f"{seed}|{record_id}|{round_}".encode()
    rng = random.Random(int.from_bytes(hashlib.sha256(blob).digest()[:8], "big"))
    names = [n for n in OPERATIONS if weights[n] > 0]
    return rng.choices(names, weights=[weights[n] for n in names])[0]


@register_stage
class EvolInstruct(Stage):
    """Evol-Instruct: prompts evolved in depth and breadth for k rounds, failed evolutions
    eliminated, lineage kept."""

    type_name = "evol_instruct"
    kind = "generator"
    creates_prompts = True
    Params = EvolInstructParams
    params: EvolInstructParams
    model_params = ("model", "judge_model")

    def __init__(self, name, params, ctx=None) -> None:
        super().__init__(name, params, ctx)
        self._scorer = None

    def _weights(self) -> dict[str, float]:
        return self.params.operations.model_dump()

    def _template_names(self) -> dict[str, str]:
        t = self.params.templates.model_dump()
        names = {op: t[op] for op, w in self._weights().items() if w > 0}
        if self.params.judge_model:
            names["judge"] = t["judge"]
        return names

    def _templates(self) -> dict[str, Template]:
        return {k: load_template(v, self.base_dir) for k, v in self._template_names().items()}

    def check(self, previous: list[Stage]) -> list[str]:
        problems = []
        if not any(w > 0 for w in self._weights().values()):
            problems.append("operations: every weight is 0; give at least one a positive weight")
        for key, name in self._template_names().items():
            try:
                load_template(name, self.base_dir)
            except TemplateError as exc:
                problems.append(f"templates.{key}: {exc}")
        return problems

    def fingerprint(self) -> dict:
        return {f"template:{k}": t.hash for k, t in self._templates().items()}

    # elimination ------------------------------------------------------------------------------

    def new_words(self, parent: str, child: str) -> int | None:
        """Words of ``child`` outside its longest common subsequence with ``parent`` (rouge-score's
        tokens); None when the tokenizer finds no word in ``child`` (not measurable)."""
        if self._scorer is None:
            self._scorer = rouge_scorer_l()
        n = len(self._scorer._tokenizer.tokenize(child))
        if n == 0:
            return None
        precision = self._scorer.score(parent, child)["rougeL"].precision
        return n - round(precision * n)

    def _text_problem(self, live: _Live, result: GenerationResult) -> str | None:
        completion = result.completions[0]
        text = live.text
        if not text:
            return "empty"
        if completion.finish_reason == "length":
            return "truncated"
        lower = text.lower()
        if any(p.lower() in lower for p in self.params.banned_phrases):
            return "template_phrasing"
        if _REFUSAL.search(text):
            return "refused"
        new = self.new_words(live.parent_text, text)
        if new is not None and new < self.params.min_new_words:
            return "no_information_gain"
        return None

    def _response_problem(self, reply: str) -> str | None:
        words = reply.split()
        if "sorry" in reply.lower() and len(words) < self.params.sorry_max_words:
            return "model_cannot_respond"
        content = [w for w in re.findall(r"[^\W_]+", reply.lower()) if w not in STOP_WORDS]
        if not content:
            return "response_empty"
        return None

    # the work ---------------------------------------------------------------------------------

    def _child(self, live: _Live, round_: int, text: str, operation: str) -> _Live:
        parent = live.record
        at = last_user(parent)
        assert at is not None
        prompt = [*parent.prompt[:at], Message(role="user", content=text)]
        record = Record(
            id=f"{parent.id}.e{round_}",
            prompt=prompt,
            source_row=parent.source_row,
            metadata={
                "lineage": {
                    "parent": parent.id,
                    "root": live.root,
                    "operation": operation,
                    "round": round_,
                    "stage": self.name,
                }
            },
        )
        return _Live(record, live.root, live.origin, operation, parent.prompt[at].content)

    def _drop(self, reason: str) -> None:
        self.counters[f"dropped:{reason}"] += 1

    async def _evolve(self, alive: list[_Live], round_: int) -> list[_Live]:
        p = self.params
        templates = self._templates()
        sampling = SamplingParams(
            temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, seed=p.seed
        )
        ops, requests = [], []
        for live in alive:
            op = choose_operation(p.seed, live.record.id, round_, self._weights())
            at = last_user(live.record)
            assert at is not None
            text = templates[op].render(prompt=live.record.prompt[at].content)
            ops.append(op)
            requests.append(
                GenerationRequest(messages=[Message(role="user", content=text)], params=sampling)
            )
            self.counters[f"op:{op}"] += 1
        results = await self.model_client(p.model).generate(requests)
        children = []
        for live, op, result in zip(alive, ops, results, strict=True):
            child = self._child(live, round_, clean(result.completions[0].text), op)
            child.text = child.record.prompt[-1].content
            reason = self._text_problem(child, result)
            if reason:
                self._drop(reason)
            else:
                children.append(child)
        if p.judge_model:
            children = await self._judge(children, templates["judge"])
        if p.response_check:
            children = await self._respond(children)
        self.counters[f"evolved:round{round_}"] += len(children)
        return children

    async def _judge(self, children: list[_Live], template: Template) -> list[_Live]:
        depth = [c for c in children if c.operation != "breadth"]
        if not depth:
            return children
        requests = [
            GenerationRequest(
                messages=[
                    Message(
                        role="user", content=template.render(parent=c.parent_text, evolved=c.text)
                    )
                ],
                params=SamplingParams(temperature=0.0, max_tokens=4, seed=self.params.seed),
            )
            for c in depth
        ]
        results = await self.model_client(self.params.judge_model).generate(requests)  # type: ignore[arg-type]
        rejected = set()
        for child, result in zip(depth, results, strict=True):
            answer = re.match(r"\W*(yes|no)\b", result.completions[0].text, re.IGNORECASE)
            if answer is None:
                self.counters["judge_unparsed"] += 1
            elif answer.group(1).lower() == "no":
                rejected.add(child.record.id)
                self._drop("judge_not_more_complex")
        return [c for c in children if c.record.id not in rejected]

    async def _respond(self, children: list[_Live]) -> list[_Live]:
        if not children:
            return children
        sampling = SamplingParams(
            temperature=0.0, max_tokens=self.params.response_max_tokens, seed=self.params.seed
        )
        requests = [GenerationRequest(messages=c.record.prompt, params=sampling) for c in children]
        results = await self.model_client(self.params.model).generate(requests)
        kept = []
        for child, result in zip(children, results, strict=True):
            reason = self._response_problem(result.completions[0].text)
            if reason:
                self._drop(reason)
            else:
                kept.append(child)
        return kept

    async def process(self, records: list[Record]) -> list[Record]:
        p = self.params
        inputs: list[_Live] = []
        for record in records:
            self.counters["input"] += 1
            at = last_user(record)
            if at is None or not record.prompt[at].content.strip():
                self.counters["skipped:no_user_message"] += 1
                continue
            root = (record.metadata.get("lineage") or {}).get("root", record.id)
            inputs.append(_Live(record, root, record.id))
        # each prompt has at most one child per round, so a lineage is a chain, in round order
        chains: dict[str, list[Record]] = {live.record.id: [] for live in inputs}
        alive = inputs
        for round_ in range(1, p.rounds + 1):
            if not alive:
                break
            alive = await self._evolve(alive, round_)
            for live in alive:
                chains[live.origin].append(live.record)
        out: list[Record] = []
        for record in records:
            chain = chains.get(record.id, [])
            if p.keep in ("all", "input+final"):
                record.metadata.setdefault(
                    "lineage", {"parent": None, "root": record.id, "operation": None, "round": 0}
                )
                out.append(record)
            out += chain if p.keep == "all" else chain[-1:]
        self.counters["output"] += len(out)
        return out


def clean(text: str) -> str:
    """A reply as a prompt: surrounding white space and one pair of wrapping quotes removed."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text
