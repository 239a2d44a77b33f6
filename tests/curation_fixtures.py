"""Records and model-free stages for the curation, format, report and push tests.

``FakeGenerate`` and ``FakeJudge`` are real stages (recipes name them as ``tests.curation_fixtures:...``)
that need no model, so a whole run directory with checkpoints, summary and data is built in a second
by the real executor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from synthpref.records import Candidate, Judgment, Message, Pair, Record
from synthpref.stages.base import Stage, StageParams


def record(
    rid: str,
    prompt: str = "Explain something.",
    texts: dict[str, str] | None = None,
    scores: dict[str, dict[str, float]] | None = None,
    pairs: list[tuple[str, str, str]] | None = None,
    truncated: tuple[str, ...] = (),
) -> Record:
    """A record with candidates ``texts`` (id -> text), pointwise ``scores`` (judge -> id -> score)
    and ``pairs`` (chosen, rejected, judge) whose scores come from that judge; the ``truncated``
    candidates finished at max_tokens."""
    texts = texts or {"a": "A fine answer.", "b": "A worse answer."}
    r = Record(
        id=rid,
        prompt=[Message(role="user", content=prompt)],
        candidates=[
            Candidate(
                id=c,
                model=f"model-{c}",
                text=t,
                finish_reason="length" if c in truncated else "stop",
            )
            for c, t in texts.items()
        ],
    )
    for judge, per in (scores or {}).items():
        for cid, s in per.items():
            r.judgments.append(
                Judgment(judge=judge, candidate_ids=[cid], score=s, scores={"helpfulness": s})
            )
    for chosen, rejected, judge in pairs or []:
        hi, lo = scores[judge][chosen], scores[judge][rejected]
        r.pairs.append(
            Pair(
                chosen_id=chosen,
                rejected_id=rejected,
                chosen_score=hi,
                rejected_score=lo,
                margin=hi - lo,
                judge=judge,
                rule="best_worst",
            )
        )
    return r


def pairwise_judgment(judge: str, a: str, b: str, ab: float, ba: float) -> Judgment:
    """A two-order pairwise judgment as the pairwise judge writes it (preference for ``a``)."""
    agree = (ab > 0) == (ba > 0) and (ab != 0) == (ba != 0)
    return Judgment(
        judge=judge,
        candidate_ids=[a, b],
        score=(ab + ba) / 2,
        scores={"ab": ab, "ba": ba},
        details={"agree": agree, "position_bias": (ab - ba) / 2},
    )


class FakeGenerateParams(StageParams):
    n: int = Field(3, ge=1)
    truncate_every: int = Field(
        0,
        ge=0,
        description="candidate k of a prompt is marked as cut off at max_tokens when k + the prompt's "
        "length is a multiple of this (prompt-dependent, so resumable)",
    )


class FakeGenerate(Stage):
    """Candidates 'Answer k to <prompt>: ' + 3 r 'more ', r a prompt-dependent rotation of k, so
    lengths differ by prompt and do not always grow with k (no model)."""

    def _rank(self, k: int, user: str) -> int:
        return (k + len(user)) % self.params.n

    type_name = "fake_generate"
    kind = "generator"
    Params = FakeGenerateParams

    async def process(self, records: list[Record]) -> list[Record]:
        every = self.params.truncate_every
        for r in records:
            user = r.prompt[-1].content
            for k in range(self.params.n):
                self.counters["candidates"] += 1
                cut = bool(every) and (k + len(user)) % every == 0
                r.candidates.append(
                    Candidate(
                        id=f"{r.id}-c{k}",
                        model=f"fake-{k % 2}",
                        text=f"Answer {k} to {user}: " + "more " * (3 * self._rank(k, user)),
                        finish_reason="length" if cut else "stop",
                        stage=self.name,
                    )
                )
        return records


class FakeJudgeParams(StageParams):
    mode: Literal["length", "inverse", "parity"] = "length"
    fail_every: int = Field(0, ge=0, description="every k-th candidate gets a failed judgment")


class FakeJudge(Stage):
    """Scores 1-5 growing with the word count (or its inverse, or word-count parity); no model."""

    type_name = "fake_judge"
    kind = "judge"
    Params = FakeJudgeParams
    score_range = (1.0, 5.0)

    async def process(self, records: list[Record]) -> list[Record]:
        k = 0
        for r in records:
            for c in r.candidates:
                k += 1
                n = len(c.text.split())
                if self.params.fail_every and k % self.params.fail_every == 0:
                    r.judgments.append(
                        Judgment(
                            judge=self.name,
                            candidate_ids=[c.id],
                            status="failed",
                            error="no rating found: scripted failure",
                            raw="???",
                        )
                    )
                    self.counters["failed"] += 1
                    continue
                if self.params.mode == "length":
                    score = min(5.0, 1 + n / 6)
                elif self.params.mode == "inverse":
                    score = 6 - min(5.0, 1 + n / 6)
                else:
                    score = 1 + 4 * (n % 2)
                r.judgments.append(
                    Judgment(judge=self.name, candidate_ids=[c.id], score=float(score))
                )
                self.counters["judgments"] += 1
        return records


FAKE = "tests.curation_fixtures:"


def write_prompts(path: Path, prompts: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


def run_recipe(
    tmp_path: Path, prompts: list[dict], stages: list[dict], formats: list[str], **settings
):
    """Run a model-free recipe with the real executor; returns (run_dir, RunResult)."""
    from synthpref.executor.local import LocalExecutor
    from synthpref.recipes.loader import parse_recipe

    data = write_prompts(tmp_path / "prompts.jsonl", prompts)
    raw = {
        "name": "curation-test",
        "description": "A model-free run for tests.",
        "source": {"path": str(data), "id_field": "id"},
        "stages": stages,
        "output": {"dir": str(tmp_path / "run"), "formats": formats},
        "settings": {"shard_size": 2, **settings},
    }
    loaded = parse_recipe(raw, base_dir=tmp_path)
    result = LocalExecutor(loaded, progress=False).run()
    return tmp_path / "run", result


PROMPTS = [
    {"id": f"q{i}", "prompt": text}
    for i, text in enumerate(
        [
            "How do plants make food from sunlight?",
            "Write a haiku about autumn leaves falling.",
            "What is the capital of France?",
            "Give three tips for learning a new language.",
            "Explain recursion to a ten year old.",
            "Why is the sky blue during the day?",
        ]
    )
]
