"""The generate stage: every candidate of a record has its own id, whatever the recipe lists.

Judges group their answers by candidate id, so two candidates sharing an id would share (or lose) a
judgment and one text would carry another's score into the dataset.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import polars as pl
import pytest

import synthpref
from synthpref.executor.common import RunError, process_shard
from synthpref.records import Candidate, Message, Record
from synthpref.stages.base import Stage, StageContext
from synthpref.stages.generate import Generate, GenerateParams
from tests.conftest import tiny_recipe


class _Echo:
    """A model client double: answers every request with its sampling temperature."""

    async def generate(self, requests):
        from synthpref.backends.types import Completion, GenerationResult

        return [
            GenerationResult(
                completions=[
                    Completion(text=f"t={r.params.temperature} k={k}", finish_reason="stop",
                               completion_tokens=3)
                    for k in range(r.params.n)
                ],
                prompt_tokens=5,
            )
            for r in requests
        ]  # fmt: skip


def _record(rid: str = "r1") -> Record:
    return Record(id=rid, prompt=[Message(role="user", content="hi")])


def _generate(models: list, name: str = "generate") -> Generate:
    stage = Generate(name, GenerateParams.model_validate({"models": models, "n": 2}))
    stage.ctx = StageContext({"small": _Echo(), "big": _Echo()})
    return stage


def test_same_model_twice_gives_unique_ids():
    stage = _generate(["small", {"model": "small", "temperature": 1.2}, "big"])
    [record] = asyncio.run(stage.process([_record()]))
    ids = [c.id for c in record.candidates]
    assert len(ids) == 6 and len(set(ids)) == 6, ids
    # entries that do not collide keep the ids of earlier versions (their caches and checkpoints)
    assert ids[:2] == ["generate:small:0", "generate:small:1"]
    assert ids[4:] == ["generate:big:0", "generate:big:1"]
    second = record.candidates[2:4]
    assert all(c.model == "small" and c.sampling["temperature"] == 1.2 for c in second)


def test_ids_of_non_colliding_recipes_are_unchanged():
    stage = _generate(["small", "big"])
    [record] = asyncio.run(stage.process([_record()]))
    assert [c.id for c in record.candidates] == [
        "generate:small:0",
        "generate:small:1",
        "generate:big:0",
        "generate:big:1",
    ]


class _Clashing(Stage):
    """A custom generator that reuses one id: what the safety net is for."""

    type_name = "clashing"
    kind = "generator"

    async def process(self, records):
        for r in records:
            for text in ("a", "b"):
                r.candidates.append(Candidate(id="mine:0", model="m", text=text))
        return records


def test_colliding_candidate_ids_fail_loudly(tmp_path: Path):
    from synthpref.stages.base import duplicate_candidate_ids

    records = [_record("r1"), _record("r2")]
    clashed = asyncio.run(
        _Clashing("clash", None).process([r.model_copy(deep=True) for r in records])
    )
    assert duplicate_candidate_ids(clashed) == {"r1": ["mine:0"], "r2": ["mine:0"]}
    with pytest.raises(RunError, match=r"record 'r1'.*'mine:0'"):
        asyncio.run(process_shard(_Clashing("clash", None), 0, records, tmp_path / "s.parquet"))
    assert not (tmp_path / "s.parquet").exists()


def test_readme_syntax_end_to_end_every_candidate_judged(tmp_path: Path):
    recipe = tiny_recipe(tmp_path)
    recipe["models"] = {"small": {"backend": "embedded"}}
    recipe["stages"] = [
        {
            "type": "generate",
            "models": ["small", {"model": "small", "temperature": 1.2}],
            "n": 2,
            "max_tokens": 8,
        },
        {
            "type": "rubric_judge",
            "name": "rating",
            "model": "small",
            "aspects": ["helpfulness"],
            "max_tokens": 4,
        },
        {"type": "pairs", "judge": "rating"},
    ]
    recipe["source"]["limit"] = 2
    result = synthpref.run(recipe, progress=False)
    rows = pl.read_parquet(result.run_dir / "data" / "records.parquet").to_dicts()
    assert rows
    for row in rows:
        ids = [c["id"] for c in row["candidates"]]
        assert len(ids) == 4 and len(set(ids)) == 4, ids
        judged = [j["candidate_ids"] for j in row["judgments"] if j["judge"] == "rating"]
        assert sorted(cid for ids_ in judged for cid in ids_) == sorted(ids), (ids, judged)


class _Slow:
    """A client double that records how many calls are in flight and answers after ``delay``
    seconds (or raises ``fail``)."""

    def __init__(self, log: list, delay: float, fail: Exception | None = None):
        self.log, self.delay, self.fail = log, delay, fail
        self.cancelled = False

    async def generate(self, requests):
        self.log.append(+1)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.log.append(-1)
        if self.fail:
            raise self.fail
        return await _Echo().generate(requests)


def test_every_model_is_asked_at_once_and_candidates_keep_the_recipe_order():
    """Models on one local backend share its running batch only if their calls are in flight
    together; the slower first model's candidates still come first."""
    log: list[int] = []
    stage = Generate("generate", GenerateParams.model_validate({"models": ["a", "b"], "n": 1}))
    stage.ctx = StageContext({"a": _Slow(log, 0.2), "b": _Slow(log, 0.0)})
    [record] = asyncio.run(stage.process([_record()]))
    in_flight = [sum(log[: k + 1]) for k in range(len(log))]
    assert max(in_flight) == 2
    assert [c.model for c in record.candidates] == ["a", "b"]


def test_a_failing_model_cancels_the_others_of_the_shard():
    log: list[int] = []
    slow = _Slow(log, 5.0)
    stage = Generate("generate", GenerateParams.model_validate({"models": ["a", "b"], "n": 1}))
    stage.ctx = StageContext({"a": slow, "b": _Slow(log, 0.0, fail=RuntimeError("down"))})
    with pytest.raises(RuntimeError, match="down"):
        asyncio.run(stage.process([_record()]))
    assert slow.cancelled and sum(log) == 0


def test_a_pausing_model_lets_the_others_finish_then_pauses():
    """A model whose batch jobs are still out pauses; the shard's other models still get their
    work to the provider in this pass (not cancelled), then the pause goes on."""
    from synthpref.errors import RunPaused

    log: list[int] = []
    slow = _Slow(log, 0.3)
    stage = Generate("generate", GenerateParams.model_validate({"models": ["a", "b"], "n": 1}))
    stage.ctx = StageContext({"a": _Slow(log, 0.0, fail=RunPaused("jobs out")), "b": slow})
    with pytest.raises(RunPaused, match="jobs out"):
        asyncio.run(stage.process([_record()]))
    assert not slow.cancelled and sum(log) == 0


def test_an_error_after_a_pause_stops_the_shard_with_the_error():
    """A pause only waits for batch jobs; a model that fails while another is pausing must stop
    the shard with its error, whichever model the recipe lists first."""
    from synthpref.errors import RunPaused

    log: list[int] = []
    stage = Generate("generate", GenerateParams.model_validate({"models": ["a", "b"], "n": 1}))
    stage.ctx = StageContext(
        {
            "a": _Slow(log, 0.0, fail=RunPaused("jobs out")),
            "b": _Slow(log, 0.1, fail=RuntimeError("down")),
        }
    )
    with pytest.raises(RuntimeError, match="down"):
        asyncio.run(stage.process([_record()]))
    assert sum(log) == 0
