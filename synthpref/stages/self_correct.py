"""Self-correction pairs: the model reviews its own answer and writes a revised one; where a
verifier says the first answer was wrong and the revision is right, the pair is (revision chosen,
first answer rejected).

The request continues the conversation the answer belongs to (after SCoRe, Kumar et al. 2024): the
record's prompt, the candidate as the assistant's turn, then a user turn asking for a review and the
whole answer again (template ``constructed/self_correct.jinja``). The reply is read as a revision
by the rules of :mod:`synthpref.stages.revision` (truncated, empty and unchanged replies are
dropped and counted). The verifier is an earlier :class:`~synthpref.judges.verifier.Verifier`
stage (e.g. a math verifier), run again on the revisions; each revision's outcome is counted as
``outcome:<name>``:

- ``fixed``: the first answer failed the check (score < 1), the revision passes it;
- ``not_fixed``: both fail; ``broken``: the first passed, the revision fails; ``still_right``:
  both pass (only with ``candidates: all``);
- ``unverified``: the verifier could not check the revision (its failed judgment says why).

``keep: fixed`` (default) keeps only fixed revisions as candidates. ``keep: all`` keeps every
revision with its verdict, for inspection; the ``pairs`` stage's ``constructed`` rule still pairs
only those the verifier scores higher than their parent. Each kept revision carries
``Origin(operation="self_correction", prefer="self")`` with the verdicts before and after in its
evidence, and its verifier judgment is stored under the verifier's name.

``model`` writes the revisions; for self-correction in the strict sense it is the model that wrote
the candidates (the evidence names it as ``reviser``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from synthpref.judges.units import instruction
from synthpref.judges.verifier import Verifier
from synthpref.records import Candidate, Judgment, Message, Origin, Record
from synthpref.stages.constructed import constructed
from synthpref.stages.registry import register_stage
from synthpref.stages.revision import RevisionParams, RevisionStage

OPERATION = "self_correction"


class SelfCorrectParams(RevisionParams):
    judge: str = Field(
        description="the verifier stage (before this one) that says whether an answer is right"
    )
    candidates: Literal["wrong", "all"] = Field(
        "wrong",
        description="wrong: revise only candidates the verifier scored below 1; all: every "
        "verified candidate (shows how often a review breaks a right answer)",
    )
    keep: Literal["fixed", "all"] = Field(
        "fixed",
        description="fixed: keep only revisions that turned a wrong answer right; all: keep every "
        "revision with its verdict (only fixed ones pair)",
    )
    template: str = Field(
        "constructed/self_correct.jinja",
        description="the user turn asking the model to review its answer (instruction, response)",
    )


def outcome(before: Judgment, after: Judgment | None) -> str:
    """What the revision did, by the verifier's verdicts (a pass is a score of 1)."""
    if after is None or after.status != "ok" or after.score is None:
        return "unverified"
    was, now = (before.score or 0) >= 1.0, after.score >= 1.0
    if now:
        return "still_right" if was else "fixed"
    return "broken" if was else "not_fixed"


def _verdict(judgment: Judgment | None) -> dict[str, Any]:
    if judgment is None:
        return {"score": None, "passed": None, "error": "no judgment"}
    score = judgment.score if judgment.status == "ok" else None
    return {
        "score": score,
        "passed": None if score is None else score >= 1.0,
        "error": judgment.error,
    }


@register_stage
class SelfCorrect(RevisionStage):
    """Self-correction: the model revises its own answers; a revision the verifier confirms fixed
    a wrong answer is kept as a new candidate, chosen over the first answer."""

    type_name = "self_correct"
    Params = SelfCorrectParams
    params: SelfCorrectParams
    judge_type = Verifier

    def _todo(self, record: Record) -> list[tuple[Candidate, Judgment]]:
        out = []
        for candidate in record.candidates:
            skip = self.revisable(candidate)
            before = self.verdict(record, candidate) if skip is None else None
            if skip is None and before is None:
                skip = "skipped:unverified"
            if skip is None and self.params.candidates == "wrong" and before.score >= 1.0:
                skip = "skipped:right"
            if skip is not None:
                self.counters[skip] += 1
                continue
            out.append((candidate, before))
        return out

    def _request(self, record: Record, candidate: Candidate) -> list[Message]:
        review = self.template.render(instruction=instruction(record), response=candidate.text)
        return [
            *record.prompt,
            Message(role="assistant", content=candidate.text),
            Message(role="user", content=review),
        ]

    async def process(self, records: list[Record]) -> list[Record]:
        todo = [(r, c, before) for r in records for c, before in self._todo(r)]
        revisions = await self.revise([(self._request(r, c), c.text) for r, c, _ in todo])
        drafts: list[tuple[Record, Candidate, Judgment, Candidate]] = []
        for (record, candidate, before), revision in zip(todo, revisions, strict=True):
            if revision.text is None:
                continue
            origin = Origin(
                operation=OPERATION, parent=candidate.id, prefer="self", stage=self.name
            )
            drafts.append(
                (
                    record,
                    candidate,
                    before,
                    revision.finish(constructed(candidate, revision.text, self.name, origin)),
                )
            )
        judged = await self.judge_new([(record, draft) for record, _, _, draft in drafts])
        for (record, parent, before, draft), after in zip(drafts, judged, strict=True):
            result = outcome(before, after)
            self.counters[f"outcome:{result}"] += 1
            if self.params.keep == "fixed" and result != "fixed":
                continue
            draft.origin = Origin(
                operation=OPERATION,
                parent=parent.id,
                prefer="self",
                stage=self.name,
                evidence={
                    "verdict_before": _verdict(before),
                    "verdict_after": _verdict(after),
                    "outcome": result,
                    "reviser": self.params.model,
                },
            )
            record.candidates.append(draft)
            if after is not None:
                record.judgments.append(after)
            self.counters["kept"] += 1
        return records
