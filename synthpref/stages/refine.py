"""Checklist-guided refinement (STICK, Cook et al. 2024, "TICK/STICK"): a response is rewritten
against the checklist items it fails, and the rewrite is kept when the checklist judge scores it
higher; the pair is (refinement chosen, original rejected).

The checklist and the verdicts come from the recipe's ``checklist_writer`` and ``checklist_judge``
stages: the judge's judgment of a candidate lists each question with its YES/NO answer
(``details.answers``); a NO is a failed item. Each round, every candidate still refining is sent,
with the items its best version so far fails, to ``model`` (template ``constructed/refine.jinja``);
the checklist judge (a fresh instance of the named stage, same model and template) answers the
checklist for the new text. Then, per candidate:

- the score rose over the best so far's: the new text becomes the best, and refining goes on
  against the items it still fails; it stops when none is left (``stopped:all_passed``);
- the score did not rise (``stopped:not_improved``), the judge failed on the new text
  (``stopped:judge_failed``), or the reply was no revision (``stopped:dropped``, by reason in
  ``dropped:<reason>``, see :mod:`synthpref.stages.revision`): refining stops, the best so far
  stands;
- after ``rounds`` rounds it stops (``stopped:rounds``).

Each round refines the best so far, so a round that makes things worse costs only itself. The
best refinement (if any round raised the score) becomes one new candidate paired, by the ``pairs``
stage's ``constructed`` rule, with the ORIGINAL candidate, never with an intermediate text: the
pair's difference is everything refinement did. Its checklist judgment is stored under the
checklist judge's name, so ``pairs`` (``judge: <the checklist judge>``) reads one judge's scores
for both sides. Intermediate texts are not kept, but every round's score and failed items are, in
``origin.evidence.rounds``. ``origin.round`` is the round that produced the kept text. Candidates
that end with no refinement are counted as ``not_kept``.

Refined are the candidates with a successful checklist judgment that fails at least one item,
sampled and finished ones (see :meth:`~synthpref.stages.revision.RevisionStage.revisable`), the
lowest-scored first when ``max_candidates`` caps them; every other is counted as
``skipped:<reason>``.

"Score" is the judge's headline score, the number ``pairs`` compares: the pass rate, or the mean
P(YES) with the judge's ``score: p_yes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from synthpref.judges.checklist import ChecklistJudge
from synthpref.judges.units import instruction
from synthpref.records import Candidate, Judgment, Message, Origin, Record
from synthpref.stages.constructed import constructed, token_edit_distance
from synthpref.stages.registry import register_stage
from synthpref.stages.revision import Revision, RevisionParams, RevisionStage

OPERATION = "checklist_refinement"


class RefineParams(RevisionParams):
    judge: str = Field(
        description="the checklist_judge stage (before this one) whose answers say which items "
        "fail and whose score decides whether a refinement is kept"
    )
    rounds: int = Field(
        2,
        ge=1,
        le=16,
        description="most refinement rounds per candidate; each refines the best version so far "
        "against the items it still fails",
    )
    max_candidates: int | None = Field(
        None,
        ge=1,
        description="most candidates refined per prompt, lowest-scored first (null: every "
        "candidate that fails at least one item)",
    )
    template: str = Field(
        "constructed/refine.jinja",
        description="the refinement request (instruction, response, failed and passed items)",
    )


def answers(judgment: Judgment) -> list[dict[str, Any]] | None:
    """The checklist judge's per-question answers in ``judgment``, or None when they are missing."""
    found = judgment.details.get("answers")
    if not isinstance(found, list) or not all(
        isinstance(a, dict) and isinstance(a.get("question"), str) for a in found
    ):
        return None
    return found


def failed_items(judgment: Judgment) -> list[str]:
    """The questions answered NO, in checklist order."""
    return [a["question"] for a in answers(judgment) or [] if a.get("answer") == "NO"]


def passed_items(judgment: Judgment) -> list[str]:
    return [a["question"] for a in answers(judgment) or [] if a.get("answer") == "YES"]


@dataclass
class _Chain:
    """One candidate being refined: its best version so far and what each round gave."""

    record: Record
    parent: Candidate
    score_before: float
    failed_before: list[str]
    judgment: Judgment
    best: Candidate | None = None
    """the best refinement so far (None: no round raised the score yet)"""
    kept_round: int = 0
    stopped: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.parent.text if self.best is None else self.best.text

    @property
    def score(self) -> float:
        assert self.judgment.score is not None
        return self.judgment.score


@register_stage
class Refine(RevisionStage):
    """STICK: each candidate rewritten against the checklist items it fails, up to k rounds; a
    rewrite that raised the checklist score is kept as a new candidate, chosen over the original."""

    type_name = "refine"
    Params = RefineParams
    params: RefineParams
    judge_type = ChecklistJudge

    def _chains(self, record: Record) -> list[_Chain]:
        chains = []
        for candidate in record.candidates:
            skip = self.revisable(candidate)
            verdict = self.verdict(record, candidate) if skip is None else None
            if skip is None and verdict is None:
                skip = "skipped:unjudged"
            if skip is None and answers(verdict) is None:
                skip = "skipped:no_answers"
                self._warn(
                    f"refine {self.name!r}: record {record.id!r}, candidate {candidate.id!r}: the "
                    f"judgment of {self.params.judge!r} has no 'details.answers' field (the "
                    "checklist judge's per-question answers); the candidate is not refined"
                )
            if skip is None and not failed_items(verdict):
                skip = "skipped:all_passed"
            if skip is not None:
                self.counters[skip] += 1
                continue
            chains.append(
                _Chain(
                    record,
                    candidate,
                    score_before=verdict.score,
                    failed_before=failed_items(verdict),
                    judgment=verdict,
                )
            )
        cap = self.params.max_candidates
        if cap is not None and len(chains) > cap:
            order = sorted(range(len(chains)), key=lambda k: (chains[k].score, k))
            keep = set(order[:cap])
            self.counters["skipped:over_max_candidates"] += len(chains) - cap
            chains = [c for k, c in enumerate(chains) if k in keep]
        return chains

    def _warn(self, message: str) -> None:
        if self.ctx is not None:
            self.ctx.warn(message)

    def _request(self, chain: _Chain) -> list[Message]:
        text = self.template.render(
            instruction=instruction(chain.record),
            response=chain.text,
            failed=failed_items(chain.judgment),
            passed=passed_items(chain.judgment),
        )
        return [Message(role="user", content=text)]

    def _draft(self, chain: _Chain, revision: Revision) -> Candidate:
        """The candidate a round's text is judged as (the id the kept one will have)."""
        origin = Origin(operation=OPERATION, parent=chain.parent.id, prefer="self", stage=self.name)
        return revision.finish(constructed(chain.parent, revision.text, self.name, origin))

    async def _round(self, chains: list[_Chain], round_: int) -> None:
        revisions = await self.revise([(self._request(c), c.text) for c in chains])
        drafts: dict[int, Candidate] = {}
        for k, (chain, revision) in enumerate(zip(chains, revisions, strict=True)):
            if revision.text is None:
                chain.stopped = "dropped"
                chain.rounds.append({"round": round_, "dropped": revision.problem})
            else:
                drafts[k] = self._draft(chain, revision)
        judged = await self.judge_new([(chains[k].record, d) for k, d in drafts.items()])
        for (k, draft), new in zip(drafts.items(), judged, strict=True):
            chain = chains[k]
            if new is None or new.status != "ok" or new.score is None:
                chain.stopped = "judge_failed"
                chain.rounds.append(
                    {"round": round_, "judge_error": new.error if new else "no judgment"}
                )
                continue
            improved = new.score > chain.score
            chain.rounds.append(
                {
                    "round": round_,
                    "score": new.score,
                    "failed": failed_items(new),
                    "kept": improved,
                }
            )
            if not improved:
                chain.stopped = "not_improved"
                continue
            self.counters[f"improved:round{round_}"] += 1
            chain.best, chain.judgment, chain.kept_round = draft, new, round_
            if not failed_items(new):
                chain.stopped = "all_passed"

    def _kept(self, chain: _Chain) -> Candidate:
        origin = Origin(
            operation=OPERATION,
            parent=chain.parent.id,
            prefer="self",
            stage=self.name,
            round=chain.kept_round,
            edit_tokens=token_edit_distance(chain.parent.text, chain.text),
            evidence={
                "failed_before": chain.failed_before,
                "failed_after": failed_items(chain.judgment),
                "score_before": chain.score_before,
                "score_after": chain.score,
                "rounds": chain.rounds,
                "stopped": chain.stopped,
            },
        )
        assert chain.best is not None
        return chain.best.model_copy(update={"origin": origin})

    async def process(self, records: list[Record]) -> list[Record]:
        chains = [c for record in records for c in self._chains(record)]
        self.counters["refined"] += len(chains)
        active = chains
        for round_ in range(1, self.params.rounds + 1):
            if not active:
                break
            await self._round(active, round_)
            active = [c for c in active if not c.stopped]
        for chain in active:
            chain.stopped = "rounds"
        for chain in chains:
            self.counters[f"stopped:{chain.stopped}"] += 1
            if chain.best is None:
                self.counters["not_kept"] += 1
                continue
            kept = self._kept(chain)
            chain.record.candidates.append(kept)
            chain.record.judgments.append(chain.judgment)
            self.counters["kept"] += 1
        return records
