"""What the stages that construct candidates from others share (``inject_errors``, ``refine``,
``self_correct``).

A constructed candidate is a new text made from an existing candidate, its ``parent``: an error
injected into a verified-correct answer (RISE), a response refined against its failed checklist
items (STICK), an answer revised after review (self-correction). It is kept only when a judge
confirms the construction did what it claims (the edited answer is now wrong, the refined response
scores higher), and it carries its :class:`~synthpref.records.Origin`, so the ``pairs`` stage's
``constructed`` rule pairs it with its parent, the right way round, and the dataset says how every
constructed pair was made.

The confirming judge is an earlier judge stage of the recipe, named in the constructing stage's
parameters; the verdicts on the new text are written as that judge's judgments, so the pair builder
reads one judge's scores for parent and child alike.
"""

from __future__ import annotations

import re

from rapidfuzz.distance import Levenshtein

from synthpref.backends.specs import fingerprint_fields
from synthpref.records import Candidate, Origin
from synthpref.stages.base import Stage

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def tokens(text: str) -> list[str]:
    """Words, numbers and single punctuation marks: the units an edit's size is counted in."""
    return _TOKEN.findall(text)


def token_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two texts' :func:`tokens` (insertions, deletions and
    substitutions of whole tokens), independent of any model's tokenizer."""
    return Levenshtein.distance(tokens(a), tokens(b))


def constructed(
    parent: Candidate, text: str, stage: str, origin: Origin, index: int = 0
) -> Candidate:
    """A new candidate made from ``parent`` by ``stage``: its id names the stage and the parent,
    its model and sampling are the parent's (what it answers with), ``origin`` says how."""
    return Candidate(
        id=f"{stage}:{parent.id}:{index}",
        model=parent.model,
        text=text,
        sampling=parent.sampling,
        sample_index=parent.sample_index,
        prompt_tokens=parent.prompt_tokens,
        completion_tokens=None,
        finish_reason="stop",
        stage=stage,
        origin=origin,
    )


def earlier_judge(
    previous: list[Stage], name: str, field: str, need: type | None = None
) -> str | None:
    """The problem with ``field: name`` naming an earlier judge stage (of type ``need``), or None."""
    judges = {s.name: s for s in previous if s.kind == "judge"}
    if name not in judges:
        return (
            f"{field}: {name!r} is not a judge stage before this one "
            f"({', '.join(judges) or 'there is none'})"
        )
    if need is not None and not isinstance(judges[name], need):
        return f"{field}: {name!r} is a {judges[name].type_name}, not a {need.__name__} stage"
    return None


class JudgedConstruction(Stage):
    """Base of a stage that constructs candidates and has an earlier judge stage confirm them.

    ``params.judge`` (the field :attr:`judge_field` names) names that judge. At :meth:`bind` the
    stage keeps the judge's type, parameters and folder; :meth:`rejudge_all` runs a fresh instance of it
    on new candidates of a shard's records, with this stage's models (the judge's models join
    :meth:`models_used`, so they are in this stage's context, fingerprint and requirements), and
    returns the judgments the judge wrote, under the judge's name."""

    kind = "generator"
    writes_candidates = True
    judge_field: str = "judge"
    judge_type: type | None = None
    """The class the named judge must be (e.g. :class:`~synthpref.judges.verifier.Verifier`)."""

    def _judge_name(self) -> str:
        return getattr(self.params, self.judge_field)

    def check(self, previous: list[Stage]) -> list[str]:
        problems = []
        if not any(s.writes_candidates for s in previous):
            problems.append(f"{self.type_name} needs candidates: put a generate stage before it")
        problem = earlier_judge(previous, self._judge_name(), self.judge_field, self.judge_type)
        return problems + ([problem] if problem else [])

    def bind(self, previous: list[Stage]) -> None:
        judge = next(s for s in previous if s.kind == "judge" and s.name == self._judge_name())
        self._judge_proto = judge

    @property
    def judge(self) -> Stage:
        """The confirming judge stage as declared earlier in the recipe (set at :meth:`bind`)."""
        return self._judge_proto

    def own_models(self) -> list[str]:
        """Models this stage itself calls (default: none besides the judge's)."""
        return []

    def models_used(self) -> list[str]:
        judge_models = self.judge.models_used() if hasattr(self, "_judge_proto") else []
        return list(dict.fromkeys([*self.own_models(), *judge_models]))

    def requirements(self):
        own = {m: {self.model_capability} for m in self.own_models()}
        if hasattr(self, "_judge_proto"):
            for model, caps in self.judge.requirements().items():
                own.setdefault(model, set()).update(caps)
        return own

    def fingerprint(self) -> dict:
        judge = self.judge
        return {
            "judge": {
                "type": judge.type_name,
                "params": fingerprint_fields(judge.params),
                "extra": judge.fingerprint(),
            }
        }

    async def rejudge_all(self, groups) -> list:
        """For each ``(record, candidates)``, in order, the named judge's judgments of those
        candidates (none for a group without candidates).

        One instance of the judge judges every group in one ``process`` call, as it would a shard,
        so a local backend batches the whole shard's new texts together."""
        temps = [
            record.model_copy(update={"candidates": list(cands), "judgments": []}, deep=True)
            for record, cands in groups
        ]
        todo = [t for t in temps if t.candidates]
        if todo:
            proto = self.judge
            judge = type(proto)(proto.name, proto.params, self.ctx)
            judge.base_dir = proto.base_dir
            await judge.process(todo)
            for key, value in judge.counters.items():
                self.counters[f"judge_{key}"] += value
        return [t.judgments for t in temps]
