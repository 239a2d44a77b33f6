"""RISE-style constructed negatives (Xu et al., 2024, "Subtle Errors Matter: Preference Learning via
Error-injected Self-editing"): a model edits a few tokens of a verified-correct response to put in
one subtle error of a named kind; the original is chosen, the edit rejected.

A sampled wrong answer usually differs from a right one everywhere, so a pair of them teaches
little about *where* reasoning fails. An injected error makes the two sides of a pair differ only
at the error, which is the signal RISE trains on. The edit counts only when it is confirmed:

- the verifier named by ``verifier`` (an earlier :class:`~synthpref.judges.verifier.Verifier` stage)
  scored the parent 1.0 (correct), and scores the edit below 1.0 (now wrong): its verdict on the
  edit is written under the verifier's own name, so the ``pairs`` stage's ``constructed`` rule
  reads one judge's scores for both sides;
- the edit is small: at most ``max_edit_tokens`` whole-token insertions, deletions or substitutions
  (:func:`~synthpref.stages.constructed.token_edit_distance`).

An edit that fails is dropped, its text left out of the record, and counted by reason
(``dropped:<reason>``): ``truncated`` (the editing model was cut at ``max_tokens``), ``empty``,
``unchanged`` (no token differs), ``duplicate`` (the same text as an earlier edit of the
same response), ``too_large``, ``verifier_failed`` (the verifier could not check
it) and ``still_correct``. The error kind of each edit is a pure function of the stage ``seed``,
the record id, the candidate id and the edit's index, and so is its sampling seed: a rerun asks
exactly the same requests.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

from pydantic import Field

from synthpref.backends.types import GenerationRequest, GenerationResult, SamplingParams
from synthpref.errors import TemplateError
from synthpref.judges.verifier import Verifier
from synthpref.records import Candidate, Judgment, Message, Origin, Record
from synthpref.stages.base import StageParams
from synthpref.stages.constructed import JudgedConstruction, constructed, token_edit_distance
from synthpref.stages.generate import MAX_SAMPLES, MAX_TOKENS
from synthpref.stages.pairs import TRUNCATED, candidate_scores
from synthpref.stages.registry import register_stage
from synthpref.templates import Template, load_template

#: the shipped error kinds and the one line the editing model is told about each
ERROR_KINDS: dict[str, str] = {
    "miscalculation": "one arithmetic result is computed wrongly (for example 7 x 8 = 54)",
    "wrong_substitution": "a wrong value is used for one quantity or variable of the problem",
    "off_by_one": "one count, index or boundary is off by one",
    "wrong_unit": "one unit is converted or applied wrongly (for example minutes taken as hours)",
    "sign_error": "one sign is flipped (a plus for a minus, or a negative dropped)",
    "wrong_operation": "one step applies the wrong operation (for example adds instead of "
    "multiplying)",
}

#: bump when :func:`clean_reply` changes: the kept texts change with it
REPLY_RULE = 1

#: every reason an edit is dropped for, each counted as ``dropped:<reason>``
DISCARD_REASONS = (
    "truncated",
    "empty",
    "unchanged",
    "duplicate",
    "too_large",
    "verifier_failed",
    "still_correct",
)


class InjectErrorsParams(StageParams):
    model: str = Field("default", description="the model that edits correct responses")
    verifier: str = Field(
        description="name of an earlier verifier stage (e.g. math_verifier): it picks the correct "
        "responses and must find each edit wrong; its verdicts on edits are stored under its name"
    )
    kinds: list[str] = Field(
        default_factory=lambda: list(ERROR_KINDS),
        min_length=1,
        description="error kinds drawn from (seeded per edit); shipped: " + ", ".join(ERROR_KINDS),
    )
    descriptions: dict[str, str] = Field(
        default_factory=dict,
        description="one-line description per kind, shown to the editing model: needed for a kind "
        "not shipped, replaces a shipped kind's",
    )
    per_candidate: int = Field(
        1, ge=1, le=MAX_SAMPLES, description="edits asked for per verified-correct response"
    )
    max_candidates: int = Field(
        1,
        ge=1,
        le=MAX_SAMPLES,
        description="verified-correct responses edited per record: the first ones in candidate "
        "order",
    )
    max_edit_tokens: int = Field(
        12,
        ge=1,
        description="largest edit kept, in whole tokens inserted, deleted or substituted (words, "
        "numbers, punctuation marks); larger ones are dropped (dropped:too_large)",
    )
    allow_truncated: bool = Field(
        False,
        description="also edit correct responses cut off at max_tokens; the pairs stage leaves "
        "those out unless its own allow_truncated is set",
    )
    template: str = Field(
        "constructed/inject_error.jinja",
        description="instruction to the editing model (variables: instruction, response, kind, "
        "kind_description)",
    )
    temperature: float = Field(0.7, ge=0, description="sampling temperature of the edits")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling: keep this mass")
    max_tokens: int = Field(
        1024,
        ge=1,
        le=MAX_TOKENS,
        description="longest edited response, in tokens: above the longest response edited (an "
        "edit cut here is dropped: dropped:truncated)",
    )
    seed: int = Field(0, description="seed of the kind drawn and of the sampling of each edit")


def _draw(*parts: object) -> int:
    blob = json.dumps(["inject_error", *parts], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big")


def choose_kind(seed: int, record_id: str, candidate_id: str, index: int, kinds: list[str]) -> str:
    """The error kind of edit ``index`` of one candidate: a pure function of its arguments."""
    return random.Random(_draw(seed, record_id, candidate_id, index)).choice(kinds)


def edit_seed(seed: int, record_id: str, candidate_id: str, index: int) -> int:
    """The sampling seed of one edit (31 bits: every backend takes it)."""
    return _draw("sampling", seed, record_id, candidate_id, index) & 0x7FFF_FFFF


_LABEL = re.compile(
    r"^[\s*_#]*(?:here(?:'s| is)\s+)?(?:the\s+|my\s+|your\s+)?"
    r"(?:edited|modified|rewritten|altered)\s+(?:response|answer|solution|text|version)"
    r"[\s*_]*:[\s*_]*",
    re.IGNORECASE,
)
_FENCED = re.compile(r"^```[\w-]*\n(.*?)\n?```$", re.DOTALL)


def clean_reply(reply: str, original: str) -> str:
    """The edited response inside the editing model's reply. Two rules, so a reply is never
    rewritten beyond what the model plainly added: a leading label ("Edited response:", "Here is
    the modified answer:", bold or not) is removed, then one code fence wrapping the whole reply;
    neither when the original response itself starts that way."""
    text = reply.strip()
    if not _LABEL.match(original):
        text = _LABEL.sub("", text, count=1).strip()
    fenced = _FENCED.match(text)
    if fenced and not original.lstrip().startswith("```"):
        text = fenced.group(1).strip()
    return text


def last_user(record: Record) -> str | None:
    """The question the response answers, as the editing model is shown it."""
    return next((m.content for m in reversed(record.prompt) if m.role == "user"), None)


class _Edit:
    """One edit asked for: its parent, kind and index, then the reply and what became of it."""

    def __init__(self, record: Record, parent: Candidate, index: int, kind: str) -> None:
        self.record, self.parent, self.index, self.kind = record, parent, index, kind
        self.candidate: Candidate | None = None
        self.distance = 0


@register_stage
class InjectErrors(JudgedConstruction):
    """RISE: a few tokens of a verified-correct response edited into one subtle error of a named
    kind; kept when the verifier finds it wrong and the edit is small (original chosen, edit
    rejected by the pairs rule 'constructed')."""

    type_name = "inject_errors"
    Params = InjectErrorsParams
    params: InjectErrorsParams
    judge_field = "verifier"
    judge_type = Verifier

    def own_models(self) -> list[str]:
        return [self.params.model]

    def descriptions(self) -> dict[str, str]:
        """Kind -> its one-line description, for the kinds in use."""
        known = {**ERROR_KINDS, **self.params.descriptions}
        return {k: known[k] for k in self.params.kinds if k in known}

    def _template(self) -> Template:
        return load_template(self.params.template, self.base_dir)

    def check(self, previous) -> list[str]:
        problems = super().check(previous)
        missing = [k for k in self.params.kinds if k not in self.descriptions()]
        if missing:
            problems.append(
                f"kinds: {', '.join(map(repr, missing))} has no description; give one under "
                f"descriptions (shipped kinds: {', '.join(ERROR_KINDS)})"
            )
        try:
            self._template()
        except TemplateError as exc:
            problems.append(f"template: {exc}")
        return problems

    def fingerprint(self) -> dict:
        return {
            **super().fingerprint(),
            "template": self._template().hash,
            "kinds": self.descriptions(),
            "reply_rule": REPLY_RULE,
        }

    # the work ---------------------------------------------------------------------------------

    def _parents(self, record: Record) -> list[Candidate]:
        """The first ``max_candidates`` candidates the verifier scored 1.0 (the mean of its
        successful judgments, as the pairs stage reads them)."""
        scores = candidate_scores(record, self.judge.name)
        out = []
        for candidate in record.candidates:
            if scores.get(candidate.id, 0.0) < 1.0:
                continue
            if candidate.finish_reason == TRUNCATED and not self.params.allow_truncated:
                self.counters["skipped_truncated_parents"] += 1
                continue
            out.append(candidate)
        return out[: self.params.max_candidates]

    def _request(self, edit: _Edit, template: Template, instruction: str) -> GenerationRequest:
        p = self.params
        text = template.render(
            instruction=instruction,
            response=edit.parent.text,
            kind=edit.kind,
            kind_description=self.descriptions()[edit.kind],
        )
        sampling = SamplingParams(
            temperature=p.temperature,
            top_p=p.top_p,
            max_tokens=p.max_tokens,
            seed=edit_seed(p.seed, edit.record.id, edit.parent.id, edit.index),
        )
        return GenerationRequest(messages=[Message(role="user", content=text)], params=sampling)

    def _plan(self, records: list[Record]) -> tuple[list[_Edit], list[GenerationRequest]]:
        p = self.params
        template = self._template()
        edits, requests = [], []
        for record in records:
            instruction = last_user(record)
            if instruction is None:
                self.counters["skipped:no_user_message"] += 1
                continue
            parents = self._parents(record)
            if not parents:
                self.counters["records_without_correct_candidate"] += 1
                continue
            for parent in parents:
                for index in range(p.per_candidate):
                    kind = choose_kind(p.seed, record.id, parent.id, index, p.kinds)
                    edit = _Edit(record, parent, index, kind)
                    edits.append(edit)
                    requests.append(self._request(edit, template, instruction))
                    self.counters[f"kind:{kind}"] += 1
        self.counters["edits_requested"] += len(edits)
        return edits, requests

    def _discard(self, reason: str) -> None:
        self.counters[f"dropped:{reason}"] += 1

    def _text_problem(self, edit: _Edit, result: GenerationResult) -> str | None:
        completion = result.completions[0]
        if completion.finish_reason == TRUNCATED:
            return "truncated"
        text = clean_reply(completion.text, edit.parent.text)
        if not text:
            return "empty"
        edit.distance = token_edit_distance(edit.parent.text, text)
        if edit.distance == 0:
            return "unchanged"
        if edit.distance > self.params.max_edit_tokens:
            return "too_large"
        origin = Origin(
            operation=f"inject_error:{edit.kind}",
            parent=edit.parent.id,
            prefer="parent",
            stage=self.name,
            edit_tokens=edit.distance,
        )
        edit.candidate = constructed(edit.parent, text, self.name, origin, edit.index)
        return None

    def _parent_judgment(self, edit: _Edit) -> Judgment | None:
        mine = [
            j
            for j in edit.record.judgments_by(self.judge.name)
            if j.candidate_ids == [edit.parent.id] and j.status == "ok"
        ]
        return mine[-1] if mine else None

    def _confirm(self, edit: _Edit, judgments: list[Judgment]) -> Judgment | None:
        """The verifier's judgment of a now-wrong edit (its origin completed), else None."""
        assert edit.candidate is not None and edit.candidate.origin is not None
        ok = [j for j in judgments if j.status == "ok" and j.score is not None]
        if not ok:
            self._discard("verifier_failed")
            return None
        after = sum(j.score for j in ok) / len(ok)  # type: ignore[misc]
        if after >= 1.0:
            self._discard("still_correct")
            return None
        before = self._parent_judgment(edit)
        edit.candidate.origin.evidence = {
            "kind": edit.kind,
            "verifier": self.judge.name,
            "verdict": {"before": before.score if before else 1.0, "after": after},
            "before": before.details if before else {},
            "after": ok[-1].details,
        }
        return ok[-1]

    def _keep_confirmed(self, record: Record, edits: list[_Edit], judgments) -> None:
        for edit in edits:
            assert edit.candidate is not None
            own = [j for j in judgments if j.candidate_ids == [edit.candidate.id]]
            if self._confirm(edit, own) is None:
                continue
            record.candidates.append(edit.candidate)
            record.judgments.extend(own)
            self.counters["edits_kept"] += 1
            self.counters[f"kept:{edit.kind}"] += 1

    async def process(self, records: list[Record]) -> list[Record]:
        edits, requests = self._plan(records)
        if not requests:
            return records
        results = await self.model_client(self.params.model).generate(requests)
        by_record: dict[int, list[_Edit]] = {}
        seen: set[tuple[int, str, str]] = set()
        for edit, result in zip(edits, results, strict=True):
            reason = self._text_problem(edit, result)
            if reason is None:
                assert edit.candidate is not None
                key = (id(edit.record), edit.parent.id, edit.candidate.text)
                reason = "duplicate" if key in seen else None
                seen.add(key)
            if reason:
                self._discard(reason)
            else:
                by_record.setdefault(id(edit.record), []).append(edit)
        groups = list(by_record.values())
        judged = await self.rejudge_all(
            [(es[0].record, [e.candidate for e in es]) for es in groups]  # type: ignore[misc]
        )
        for es, judgments in zip(groups, judged, strict=True):
            self._keep_confirmed(es[0].record, es, judgments)
        return records
