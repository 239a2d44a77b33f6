"""The simulated user's next message (``user_turn``): turns a generated reply into a conversation.

A record arrives here after a ``generate`` stage: its prompt ends with a user message and its
candidates are replies to it. The stage

1. takes the candidate that continues the conversation (``continue_with``):
   ``first``: the first usable candidate (the generate stage's order: first model, first sample);
   ``best``: the usable candidate with the highest mean score among the ok pointwise judgments of
   ``judge`` (a judge placed after that generate stage; ties go to the earlier candidate; when no
   usable candidate has a score the first usable one continues, counted as ``best_unscored``).
   Usable: non-empty and not cut at ``max_tokens`` (cut ones too with ``allow_truncated``);
2. appends it to ``record.prompt`` as the assistant message and clears the record's candidates,
   judgments and pairs: they belong to the turn now closed. What stays: ``metadata`` (the persona,
   the goal, the lineage of a synthesized prompt) and ``annotations`` (per-conversation artefacts
   such as the router's domain; a stage whose annotation is about one turn, like the checklist
   writer, belongs after the last ``user_turn``). ``metadata.turns`` gets one entry per closed turn
   naming the candidate (id, model, stage) that became the assistant message;
3. asks ``model`` for the user's next message with ``template`` (the conversation so far, system
   messages left out, and the record's persona and goal from ``metadata`` when present) and appends
   it as the user message. A reply that is empty (after stripping a ``USER:``-style label and
   enclosing quotes) or cut at ``max_tokens`` drops the record, counted (``dropped_user_empty``,
   ``dropped_user_cut``): a conversation ending in half a message is not worth answering
   (``keep_cut_user`` keeps it, counted as ``user_cut_kept``). The reply also ends at ``stop``
   (by default the template's ``USER:``/``ASSISTANT:`` labels: a small model tends to go on writing
   the transcript).

So a recipe alternates ``generate`` and ``user_turn`` to reach depth d, and the candidates of the
next ``generate`` all answer the same conversation. A record with no candidate to continue (or a
prompt that does not end with a user message) is dropped and counted (``dropped_no_candidate``,
``dropped_no_usable_candidate``, ``dropped_no_user_turn``). The misplacements that can be seen in
the recipe are refused at validation: no generate stage before this one, or none since the last
``user_turn`` or prompt-writing stage, or a ``best`` judge that is not a pointwise judge of this
turn's candidates. The sampling seed derives from the stage ``seed``, the record id and the turn.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from synthpref.backends.types import GenerationRequest, SamplingParams
from synthpref.errors import TemplateError
from synthpref.records import Candidate, Message, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.generate import MAX_TOKENS
from synthpref.stages.personas import clean_reply, derived_seed
from synthpref.stages.registry import register_stage
from synthpref.templates import load_template


class UserTurnParams(StageParams):
    model: str = Field("default", description="the model that plays the user")
    continue_with: Literal["first", "best"] = Field(
        "first",
        description="the candidate that becomes the assistant message: the first usable one, or "
        "the best by 'judge'",
    )
    judge: str | None = Field(
        None, description="continue_with: best: the pointwise judge stage whose scores decide"
    )
    allow_truncated: bool = Field(
        False, description="also continue with a candidate cut at its max_tokens"
    )
    keep_cut_user: bool = Field(
        False, description="keep a user reply cut at max_tokens (default: drop the record)"
    )
    temperature: float = Field(0.8, ge=0, description="sampling temperature of the user's reply")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling of the user's reply")
    max_tokens: int = Field(
        128, ge=1, le=MAX_TOKENS, description="longest user reply, in tokens (longer: dropped)"
    )
    seed: int = Field(0, description="seed from which each record's sampling seed is derived")
    stop: list[str] = Field(
        default_factory=lambda: ["\nUSER:", "\nASSISTANT:"],
        description="strings that end the user's reply (the default template's transcript labels: "
        "a model that goes on writing the transcript stops there)",
    )
    template: str = Field("user_turn/next.jinja", description="asks for the user's next message")
    persona_key: str = Field("persona", description="metadata field holding the user's persona")
    goal_key: str = Field("goal", description="metadata field holding the user's goal")

    @model_validator(mode="after")
    def _judge_for_best(self) -> UserTurnParams:
        if self.continue_with == "best" and not self.judge:
            raise ValueError("continue_with: best needs judge: <the judge stage's name>")
        if self.continue_with == "first" and self.judge:
            raise ValueError("judge is only read with continue_with: best")
        return self


def _answers(stage: Stage) -> bool:
    """Whether a stage writes replies to the records' prompts (a generate stage or the like)."""
    return stage.writes_candidates


def _resets(stage: Stage) -> bool:
    """Whether after this stage the records hold no replies to continue (new or rewritten prompts,
    or a conversation this stage closed)."""
    return stage.creates_prompts


@register_stage
class UserTurn(Stage):
    """Closes a turn with one candidate as the assistant message and adds the simulated user's reply."""

    type_name = "user_turn"
    kind = "generator"
    creates_prompts = True  # the conversation grows by a turn
    Params = UserTurnParams
    params: UserTurnParams
    model_params = ("model",)

    def check(self, previous: list[Stage]) -> list[str]:
        problems = []
        try:
            load_template(self.params.template, self.base_dir)
        except TemplateError as exc:
            problems.append(f"template: {exc}")
        answered = [i for i, s in enumerate(previous) if _answers(s)]
        reset = [i for i, s in enumerate(previous) if _resets(s)]
        if not answered:
            problems.append(
                "user_turn continues a conversation after an assistant reply, and no stage before "
                "it writes one: put a generate stage before it"
            )
            return problems
        if reset and reset[-1] > answered[-1]:
            s = previous[reset[-1]]
            problems.append(
                f"user_turn comes after stage {s.name!r} ({s.type_name}) with no generate stage "
                "between them, so there is no assistant reply to continue: put a generate stage "
                "before it"
            )
            return problems
        if self.params.continue_with == "best":
            problems += self._judge_problems(previous, answered[-1])
        return problems

    def _judge_problems(self, previous: list[Stage], since: int) -> list[str]:
        name = self.params.judge
        found = [i for i, s in enumerate(previous) if s.name == name]
        if not found or previous[found[-1]].kind != "judge":
            judges = [s.name for s in previous[since:] if s.kind == "judge"]
            return [
                f"judge: no judge stage named {name!r} comes before this one"
                + (f" (judges of this turn: {', '.join(judges)})" if judges else "")
            ]
        i = found[-1]
        if i < since:
            return [
                f"judge: {name!r} comes before the generate stage {previous[since].name!r}, so it "
                "has not judged the replies this stage continues; put it after that stage"
            ]
        if getattr(previous[i], "unit", "candidate") == "pair":
            return [
                f"judge: {name!r} compares pairs of candidates; continue_with: best needs a judge "
                "that scores each candidate"
            ]
        return []

    def fingerprint(self) -> dict:
        return {"template": load_template(self.params.template, self.base_dir).hash}

    # work ---------------------------------------------------------------------------------------

    def _usable(self, c: Candidate) -> bool:
        return bool(c.text.strip()) and (self.params.allow_truncated or c.finish_reason != "length")

    def _choose(self, record: Record) -> Candidate | None:
        if not record.candidates:
            self.counters["dropped_no_candidate"] += 1
            return None
        usable = [c for c in record.candidates if self._usable(c)]
        if not usable:
            self.counters["dropped_no_usable_candidate"] += 1
            return None
        if self.params.continue_with == "first":
            return usable[0]
        scores: dict[str, list[float]] = {}
        for j in record.judgments_by(self.params.judge or ""):
            if j.status == "ok" and j.score is not None and len(j.candidate_ids) == 1:
                scores.setdefault(j.candidate_ids[0], []).append(j.score)
        scored = [(sum(s) / len(s), -i, c) for i, c in enumerate(usable) if (s := scores.get(c.id))]
        if not scored:
            self.counters["best_unscored"] += 1
            return usable[0]
        return max(scored, key=lambda t: (t[0], t[1]))[2]

    async def process(self, records: list[Record]) -> list[Record]:
        p = self.params
        template = load_template(p.template, self.base_dir)
        todo: list[tuple[Record, Candidate, list[Message]]] = []
        requests = []
        for record in records:
            if not record.prompt or record.prompt[-1].role != "user":
                self.counters["dropped_no_user_turn"] += 1
                continue
            chosen = self._choose(record)
            if chosen is None:
                continue
            conversation = [*record.prompt, Message(role="assistant", content=chosen.text)]
            persona = record.metadata.get(p.persona_key)
            goal = record.metadata.get(p.goal_key)
            prompt = template.render(
                messages=[m.model_dump() for m in conversation if m.role != "system"],
                persona=str(persona) if persona else None,
                goal=str(goal) if goal else None,
                turn=sum(m.role == "user" for m in conversation),
            )
            params = SamplingParams(
                n=1,
                temperature=p.temperature,
                top_p=p.top_p,
                max_tokens=p.max_tokens,
                seed=derived_seed(p.seed, record.id, len(conversation)),
                stop=p.stop,
            )
            todo.append((record, chosen, conversation))
            message = Message(role="user", content=prompt)
            requests.append(GenerationRequest(messages=[message], params=params))
        results = await self.model_client(p.model).generate(requests) if requests else []
        out = []
        for (record, chosen, conversation), result in zip(todo, results, strict=True):
            completion = result.completions[0]
            text = clean_reply(completion.text)
            if not text:
                self.counters["dropped_user_empty"] += 1
                continue
            if completion.finish_reason == "length":
                if not p.keep_cut_user:
                    self.counters["dropped_user_cut"] += 1
                    continue
                self.counters["user_cut_kept"] += 1
            turns = list(record.metadata.get("turns") or [])
            turns.append(
                {
                    "stage": self.name,
                    "assistant_candidate": chosen.id,
                    "assistant_model": chosen.model,
                    "assistant_stage": chosen.stage,
                    "continue_with": p.continue_with
                    if p.continue_with == "first"
                    else f"best:{p.judge}",
                    "candidates": len(record.candidates),
                }
            )
            record.prompt = [*conversation, Message(role="user", content=text)]
            record.candidates, record.judgments, record.pairs = [], [], []
            record.metadata = {**record.metadata, "turns": turns}
            self.counters["turns_added"] += 1
            out.append(record)
        return out
