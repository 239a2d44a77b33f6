"""What ``refine`` and ``self_correct`` share: asking a model to rewrite candidates, and reading
its replies as revised responses.

Both stages show a model an existing candidate with something to act on (the checklist items it
fails; the model's own answer to review) and keep the rewrite only when their judge confirms it.
Everything before the judge is the same, so it lives here: one request per candidate, all of a
shard's in one ``generate`` call (one batch on a local backend); the reply cleaned by the rules of
:func:`clean_revision`; and the replies that are not a revision dropped by reason, counted as
``dropped:<reason>`` and never judged (a judge call spent on them would say nothing):

- ``truncated``: cut at ``max_tokens``, so an unfinished rewrite (pairs would leave it out anyway;
  kept, marked ``finish_reason: length``, with ``allow_truncated``);
- ``empty``: nothing left after cleaning;
- ``unchanged``: the same text as the one revised, white space aside (no edit to confirm).

Which candidates may be revised is shared too (:meth:`RevisionStage.revisable`): sampled replies
only (a constructed candidate is revised by nobody, so every constructed pair stays one edit away
from a sampled reply) and finished ones (a reply cut at ``max_tokens`` is left out of pairs, so a
revision of it would pair with nothing), unless ``allow_truncated`` is set, as it is on the
``pairs`` stage of a recipe whose short ``max_tokens`` cut replies on purpose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import Field

from synthpref.backends.types import GenerationRequest, SamplingParams
from synthpref.errors import TemplateError
from synthpref.records import Candidate, Judgment, Message, Record
from synthpref.stages.base import StageParams
from synthpref.stages.constructed import JudgedConstruction
from synthpref.templates import Template, load_template

TRUNCATED = "length"

#: bump when :func:`clean_revision` or :func:`read_revision` changes: the kept texts change with
#: them, so the stages' fingerprints must too
REVISION_RULES = 1

# "Revised response:", "Here is the improved answer:", "**Corrected solution:**" at the very start
_LABEL = re.compile(
    r"^[\W_]{0,3}(?:here\s+is|here's)?\s*(?:the|my|an?)?\s*"
    r"(?:revised|refined|improved|corrected|updated|rewritten)\s+"
    r"(?:response|answer|version|solution)[\W_]{0,3}:[*_]{0,2}[ \t]*\n?",
    re.IGNORECASE,
)
# the template's own section markers, echoed at either end: "[Revised response]", "[End of response]"
_OPENING_MARKER = re.compile(r"^\[(?:revised |improved |corrected )?response\][ \t]*\n?", re.I)
_CLOSING_MARKER = re.compile(r"\n?[ \t]*\[end of (?:the )?(?:revised |improved )?response\]$", re.I)


def clean_revision(text: str) -> str:
    """A reply as a revised response, changed as little as can be:

    1. surrounding white space removed;
    2. one section marker the template uses, echoed at the start (``[Revised response]``) or the
       end (``[End of response]``), removed;
    3. one label naming the revision at the very start (``Revised response:``, ``Here is the
       improved answer:``, with or without Markdown emphasis) removed, whether the text follows on
       its line or the next.

    Nothing else is touched: quotes, code fences and a closing remark may be part of an answer,
    and a judge that reads the revision sees what the dataset will hold."""
    text = text.strip()
    text = _OPENING_MARKER.sub("", text, count=1).strip()
    text = _CLOSING_MARKER.sub("", text, count=1).strip()
    return _LABEL.sub("", text, count=1).strip()


def same_text(a: str, b: str) -> bool:
    """Equal once runs of white space are one space: a re-wrapped copy is no revision."""
    return a.split() == b.split()


@dataclass(frozen=True)
class Revision:
    """One reply read as a revision: ``text`` the cleaned revision, or None and ``problem`` the
    reason it is dropped (truncated, empty, unchanged); ``raw`` the reply as the model wrote it,
    ``finish_reason`` and ``completion_tokens`` as the backend reported them."""

    text: str | None
    problem: str | None
    raw: str
    finish_reason: str | None = "stop"
    completion_tokens: int | None = None

    def finish(self, draft: Candidate) -> Candidate:
        """``draft`` (made by :func:`~synthpref.stages.constructed.constructed`) as this reply
        finished: a revision cut at ``max_tokens`` says so, like a generated one."""
        return draft.model_copy(
            update={
                "finish_reason": self.finish_reason,
                "completion_tokens": self.completion_tokens,
            }
        )


def read_revision(
    raw: str,
    finish_reason: str | None,
    revised: str,
    allow_truncated: bool = False,
    completion_tokens: int | None = None,
) -> Revision:
    """The reply ``raw`` to a request to revise ``revised``, judged by the module's rules."""
    if finish_reason == TRUNCATED and not allow_truncated:
        return Revision(None, "truncated", raw, finish_reason, completion_tokens)
    text = clean_revision(raw)
    problem = "empty" if not text else "unchanged" if same_text(text, revised) else None
    if problem:
        return Revision(None, problem, raw, finish_reason, completion_tokens)
    return Revision(text, None, raw, finish_reason, completion_tokens)


class RevisionParams(StageParams):
    """Parameters every revising stage has."""

    model: str = Field("default", description="the model that writes the revisions")
    judge: str = Field(description="the earlier judge stage whose verdicts confirm a revision")
    temperature: float = Field(0.7, ge=0, description="sampling temperature of the revisions")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling: keep this mass")
    max_tokens: int = Field(
        512,
        ge=1,
        le=1_048_576,
        description="longest revision, in tokens; a revision rewrites the whole response, so give "
        "at least the generate stage's max_tokens (a revision cut here is dropped unless "
        "allow_truncated)",
    )
    seed: int = Field(0, description="sampling seed of the revisions")
    allow_truncated: bool = Field(
        False,
        description="also revise candidates cut at max_tokens, and keep revisions cut at "
        "max_tokens (marked finish_reason 'length'); for recipes whose pairs stage sets "
        "allow_truncated too",
    )
    template: str = Field(description="the template of the revision request")


class RevisionStage(JudgedConstruction):
    """Base of ``refine`` and ``self_correct``: the revising model, the template, the requests."""

    params: RevisionParams

    @property
    def template(self) -> Template:
        return load_template(self.params.template, self.base_dir)

    def own_models(self) -> list[str]:
        return [self.params.model]

    def check(self, previous) -> list[str]:
        problems = super().check(previous)
        try:
            self.template  # noqa: B018 - loads and validates the path
        except TemplateError as exc:
            problems.append(f"template: {exc}")
        return problems

    def fingerprint(self) -> dict:
        return {
            **super().fingerprint(),
            "template": self.template.hash,
            "revision_rules": REVISION_RULES,
        }

    def sampling(self) -> SamplingParams:
        p = self.params
        return SamplingParams(
            temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, seed=p.seed
        )

    def revisable(self, candidate: Candidate) -> str | None:
        """Why ``candidate`` is not revised (a counter's name), or None when it may be."""
        if candidate.origin is not None:
            return "skipped:constructed"
        if candidate.finish_reason == TRUNCATED and not self.params.allow_truncated:
            return "skipped:truncated"
        return None

    def verdict(self, record: Record, candidate: Candidate) -> Judgment | None:
        """The judge's successful judgment of ``candidate`` (its last), or None."""
        found = [
            j
            for j in record.judgments_by(self.params.judge)
            if j.candidate_ids == [candidate.id] and j.status == "ok" and j.score is not None
        ]
        return found[-1] if found else None

    async def revise(self, jobs: list[tuple[list[Message], str]]) -> list[Revision]:
        """One request per ``(messages, text being revised)``, sent together; each reply read by
        :func:`read_revision`, the dropped ones counted by reason."""
        if not jobs:
            return []
        sampling = self.sampling()
        requests = [GenerationRequest(messages=m, params=sampling) for m, _ in jobs]
        results = await self.model_client(self.params.model).generate(requests)
        out = []
        for (_, revised), result in zip(jobs, results, strict=True):
            completion = result.completions[0]
            revision = read_revision(
                completion.text,
                completion.finish_reason,
                revised,
                self.params.allow_truncated,
                completion.completion_tokens,
            )
            self.counters["revisions"] += 1
            if revision.problem:
                self.counters[f"dropped:{revision.problem}"] += 1
            out.append(revision)
        return out

    async def judge_new(self, drafts: list[tuple[Record, Candidate]]) -> list[Judgment | None]:
        """The judge's judgment of each new candidate, in order (None where it wrote none); the
        whole shard's new candidates are judged in one call."""
        groups: dict[str, tuple[Record, list[Candidate]]] = {}
        for record, candidate in drafts:
            groups.setdefault(record.id, (record, []))[1].append(candidate)
        judged = await self.rejudge_all(list(groups.values()))
        found = {
            (rid, j.candidate_ids[0]): j
            for rid, judgments in zip(groups, judged, strict=True)
            for j in judgments
            if len(j.candidate_ids) == 1
        }
        return [found.get((r.id, c.id)) for r, c in drafts]
