"""The verifier kit: judges that check instead of asking a model.

Where correctness can be checked (a math answer against a reference, code against tests, a format
constraint by rule), a check is exact where a model's opinion is a guess. A verifier judge is a stage
of kind ``judge`` that calls no model; a subclass says two things:

- :meth:`Verifier.spec`: what one record needs checked, read from its metadata (the reference
  answer, the tests, the constraints) into a plain picklable dict. A record that lacks it raises
  :class:`~synthpref.judges.units.Skip` naming the record and the field: each of its candidates gets
  a failed judgment saying so, and the run goes on.
- ``check_fn``: a module-level function ``(spec, response) -> Check`` that does the checking. It
  runs in worker processes (``execution = "processes"``, one per core by default: CPU-bound checks
  such as symbolic math) or threads (``"threads"``: checks whose work is in subprocesses of their
  own, such as running code), so a shard's checks run in parallel and a check that crashes its
  worker loses only itself (:mod:`synthpref.verifiers.pool`).

Each candidate gets one pointwise judgment: ``score`` 1/0 or a pass fraction in [0, 1],
``scores`` the sub-scores a verifier reports, ``details`` the evidence (what was extracted, what it
was compared with, per-test outcomes and error text), ``model`` None. A check that could not be made
(nothing to compare, a check that died) is a ``failed`` judgment with the reason as its error, never a
silent 0. Verifiers combine with model judges in a ``jury`` (``method: lexicographic`` puts
correctness first and lets a rubric break ties) and run in ``eval-judges`` like any judge.

Stages that construct pairs (``inject_errors``, ``self_correct``) check new texts by running an earlier
verifier stage on them (:meth:`synthpref.stages.constructed.JudgedConstruction.rejudge_all`), so its
judgments of those texts land under its name and the pair builder reads one judge's scores for
every text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar

from pydantic import Field

from synthpref.judges.units import Skip
from synthpref.records import Candidate, Judgment, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.verifiers.pool import Execution, run_all

VOLATILE = {"volatile": True}


@dataclass(frozen=True)
class Check:
    """One response checked: ``score`` in [0, 1] (None: it could not be checked, ``error`` says
    why), ``scores`` named sub-scores, ``evidence`` what the verdict rests on, ``counters`` stage
    counters to add one to (e.g. ``timeout``)."""

    score: float | None
    evidence: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None
    counters: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.score is not None and self.score >= 1.0


class VerifierParams(StageParams):
    workers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="checks run in parallel; default: one per CPU core",
        json_schema_extra=VOLATILE,
    )


def _died(job: tuple[Any, ...]) -> Check:
    return Check(
        None,
        error="the process checking this response died (a crash in a native library, or the "
        "machine ran out of memory); other responses were checked",
        counters=("check_died",),
    )


def _skipped(skip: Skip) -> Check:
    return Check(None, error=str(skip), counters=(skip.counter,) if skip.counter else ())


class Verifier(Stage):
    """A judge that checks each candidate deterministically; see the module docstring."""

    kind = "judge"
    Params: ClassVar[type[StageParams]] = VerifierParams
    params: VerifierParams
    score_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    execution: ClassVar[Execution] = "processes"
    check_fn: ClassVar[Callable[[dict[str, Any], str], Check]]
    """``(spec, response) -> Check``, a module-level function (worker processes import it)."""
    libraries: ClassVar[tuple[str, ...]] = ()
    """Distributions whose versions decide verdicts: they join the stage's fingerprint, so an
    upgrade that changes a verdict re-checks instead of reusing old checkpoints."""

    # hooks --------------------------------------------------------------------------------------

    def spec(self, record: Record) -> dict[str, Any]:
        """What the record's responses are checked against (picklable); raise :class:`Skip` when
        the record lacks it, naming the record and the field."""
        return {}

    # the kit ------------------------------------------------------------------------------------

    def check(self, previous: list[Stage]) -> list[str]:
        if not any(s.kind == "generator" for s in previous):
            return ["a judge needs candidates: put a generate stage before it"]
        return []

    def fingerprint(self) -> dict[str, Any]:
        out = {}
        for lib in self.libraries:
            try:
                out[lib] = version(lib)
            except PackageNotFoundError:
                out[lib] = None
        return {"libraries": out}

    def judgment(self, candidate: Candidate, check: Check) -> Judgment:
        """The judgment recording ``check`` for ``candidate``, counted in this stage's counters."""
        self.counters["judgments"] += 1
        for name in check.counters:
            self.counters[name] += 1
        if check.score is None:
            self.counters["failed"] += 1
        elif check.passed:
            self.counters["passed"] += 1
        return Judgment(
            judge=self.name,
            candidate_ids=[candidate.id],
            score=check.score,
            scores=check.scores,
            status="ok" if check.score is not None else "failed",
            error=check.error if check.score is None else None,
            attempts=0,
            details=check.evidence,
        )

    async def process(self, records: list[Record]) -> list[Record]:
        jobs: list[tuple[dict[str, Any], str]] = []
        owners: list[tuple[Record, Candidate]] = []
        for record in records:
            if not record.candidates:
                continue
            try:
                spec = self.spec(record)
            except Skip as skip:
                record.judgments.extend(self.judgment(c, _skipped(skip)) for c in record.candidates)
                continue
            for candidate in record.candidates:
                jobs.append((spec, candidate.text))
                owners.append((record, candidate))
        checks = await run_all(
            type(self).check_fn,
            jobs,
            execution=self.execution,
            workers=self.params.workers,
            died=_died,
        )
        for (record, candidate), check in zip(owners, checks, strict=True):
            record.judgments.append(self.judgment(candidate, check))
        return records


def metadata_field(record: Record, name: str, *, stage: str, what: str) -> Any:
    """``record.metadata[name]``, or :class:`Skip` naming the record, the field and what it holds."""
    value = record.metadata.get(name)
    if value is None or value == "" or value == []:
        raise Skip(
            f"record {record.id!r} (source row {record.source_row}) has no {name!r} field "
            f"({what}); stage {stage!r} cannot check its responses",
            counter="missing_field",
        )
    return value
