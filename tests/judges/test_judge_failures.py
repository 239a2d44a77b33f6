"""Which backend failures become a judge's failed judgments, and which stop the shard.

Only a failure that belongs to one request's content (over the context window, input the server
rejects as invalid) may be recorded as that candidate's failed judgment. A failure of the backend
itself (rate limit, 5xx, timeout, a server that cannot echo logprobs, an unexpected exception) must
stop the shard, so nothing wrong is checkpointed and a rerun retries it.

The scoring judges run against a scripted OpenAI-compatible server on 127.0.0.1 through the real
:class:`OpenAIBackend` (with the embedded model's tokenizer), or against an in-process scoring double.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from synthpref.backends import base
from synthpref.backends.base import Backend, BackendError, OnScored
from synthpref.backends.openai_backend import OpenAIBackend
from synthpref.backends.types import GenerationRequest, ScoreRequest, ScoreResult
from synthpref.executor.common import RunError
from synthpref.executor.local import LocalExecutor
from synthpref.judges.density_ratio import (
    Customisation,
    DensityRatioJudge,
    DensityRatioParams,
)
from synthpref.judges.followup import FollowupJudge, FollowupParams, FollowupSet
from synthpref.judges.logprob import score_isolated
from synthpref.judges.rubric import RubricJudge, RubricParams
from synthpref.recipes.loader import parse_recipe
from synthpref.records import Message
from tests.conftest import tiny_recipe
from tests.fake_openai_server import FakeServer, error, ok
from tests.judges.test_density_ratio import client, record, run_stage

SIDES = {"default": Customisation(strong_system="Be expert.", weak_system="Be careless.")}
FOLLOWUPS = {"clarity": FollowupSet(positive=["Clear, thanks."], negative=["I don't follow."])}


def always(status: int, message: str, param: str | None = None):
    return lambda path, body: error(status, message, param)


def scorer(server: FakeServer, embedded_dir: Path) -> OpenAIBackend:
    return OpenAIBackend(
        "fake",
        base_url=server.base_url,
        tokenizer=str(embedded_dir),
        max_context=2048,
        max_retries=1,
        retry_initial_wait=0.01,
    )


def cdr_stage() -> DensityRatioJudge:
    return DensityRatioJudge("cdr", DensityRatioParams(strong="s", weak="w", customisations=SIDES))


def flr_stage() -> FollowupJudge:
    return FollowupJudge(
        "flr", FollowupParams(model="m", dimensions=["clarity"], followups=FOLLOWUPS)
    )


def judge_with(stage, backend: Backend, records):
    names = ["s", "w"] if isinstance(stage, DensityRatioJudge) else ["m"]
    return run_stage(stage, {n: client(n, backend) for n in names}, records)


RECORDS = [record("r1", "Say hi.", "Hi there!", "Hello!"), record("r2", "Say bye.", "Bye!")]


# --- transient failures stop the shard; the rerun scores -------------------------------------


@pytest.mark.parametrize("make_stage", [cdr_stage, flr_stage], ids=["density_ratio", "followup"])
@pytest.mark.parametrize(
    "status", [429, 503, 500], ids=["rate_limited", "unavailable", "server_error"]
)
def test_transient_scoring_failure_stops_the_judge_then_a_rerun_scores(
    embedded_dir, make_stage, status
):
    with FakeServer(always(status, "slow down" if status == 429 else "busy")) as server:
        backend = scorer(server, embedded_dir)
        stage = make_stage()
        with pytest.raises(BackendError, match=f"HTTP {status}") as err:
            judge_with(stage, backend, RECORDS)
        assert isinstance(err.value, base.TransientBackendError)
        assert not stage.counters.get("failed")

        server.behaviour = ok  # the server recovers
        out = judge_with(make_stage(), backend, RECORDS)
    judgments = [j for r in out for j in r.judgments]
    assert len(judgments) == 3 and all(j.status == "ok" for j in judgments)
    assert all(j.score is not None for j in judgments)


def test_unreachable_scoring_server_stops_the_judge(embedded_dir):
    from tests.vllm_fixtures import free_port

    unreachable = OpenAIBackend(
        "fake",
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        tokenizer=str(embedded_dir),
        max_context=2048,
        max_retries=0,
    )
    stage = flr_stage()
    with pytest.raises(BackendError, match="could not connect") as err:
        judge_with(stage, unreachable, RECORDS)
    assert isinstance(err.value, base.TransientBackendError)
    assert not stage.counters.get("failed")


# --- failures of the backend itself stop the shard too ---------------------------------------


def test_a_parameter_the_server_rejects_stops_the_judge(embedded_dir):
    """A 400 about a request field every request carries (here: logprobs) is a configuration
    problem; recording it as every candidate's failed judgment would checkpoint a dataset of
    failures."""
    reject = always(400, "echo is not supported together with logprobs", param="logprobs")
    with FakeServer(reject) as server:
        stage = cdr_stage()
        with pytest.raises(BackendError, match="HTTP 400") as err:
            judge_with(stage, scorer(server, embedded_dir), RECORDS)
    assert not isinstance(err.value, base.RequestError | base.TransientBackendError)
    assert not stage.counters.get("failed")


def test_a_server_that_does_not_echo_logprobs_stops_the_judge(embedded_dir):
    def no_logprobs(path, body):
        status, reply = ok(path, body)
        reply["choices"][0]["logprobs"] = None
        return status, reply

    with FakeServer(no_logprobs) as server:
        stage = flr_stage()
        with pytest.raises(BackendError, match="did not echo"):
            judge_with(stage, scorer(server, embedded_dir), RECORDS)
    assert not stage.counters.get("failed")


class ScriptedScorer(Backend):
    """Scores every request alike, unless ``fail`` returns an exception for it: then the whole call
    raises it, as a local engine does when one request of a batch cannot run."""

    capabilities: ClassVar = frozenset({"generate", "score"})

    def __init__(self, fail: Callable[[ScoreRequest], BaseException | None]) -> None:
        self.fail = fail
        self.calls: list[int] = []

    @property
    def identity(self) -> str:
        return "scripted-scorer"

    async def generate(self, requests: Sequence[GenerationRequest], on_result=None):
        raise AssertionError("not a generator")

    async def score(
        self, requests: Sequence[ScoreRequest], on_result: OnScored | None = None
    ) -> list[ScoreResult]:
        self.calls.append(len(requests))
        for r in requests:
            exc = self.fail(r)
            if exc is not None:
                raise exc
        out = [ScoreResult(token_logprobs=[-1.0], tokens=["a"]) for _ in requests]
        for i, result in enumerate(out):
            if on_result:
                on_result(i, result)
        return out


def _about_bye(exc: BaseException):
    return lambda r: exc if "Bye" in r.messages[-1].content else None


def test_an_unexpected_value_error_is_not_taken_for_a_bad_request():
    """Only a RequestError says the request is at fault; any other ValueError (a result that fails
    validation, a bug) must surface rather than turn into failed judgments."""
    backend = ScriptedScorer(_about_bye(ValueError("1 validation error for ScoreResult")))
    with pytest.raises(ValueError, match="validation error"):
        asyncio.run(score_isolated(client("m", backend), _requests()))


def test_a_transient_error_is_raised_at_once_without_bisecting():
    busy = base.TransientBackendError("score request 0: the engine is restarting")
    backend = ScriptedScorer(_about_bye(busy))
    with pytest.raises(base.TransientBackendError):
        asyncio.run(score_isolated(client("m", backend), _requests()))
    assert backend.calls == [3]


def test_a_request_error_fails_that_request_alone():
    too_long = base.RequestError("over the context window", index=2)
    backend = ScriptedScorer(_about_bye(too_long))
    out = asyncio.run(score_isolated(client("m", backend), _requests()))
    assert [isinstance(r, ScoreResult) for r in out] == [True, True, False]
    assert out[2] == "RequestError: over the context window"


def _requests() -> list[ScoreRequest]:
    return [
        ScoreRequest(
            messages=[Message(role="user", content="q"), Message(role="assistant", content=t)]
        )
        for t in ("Hi!", "Hello!", "Bye!")
    ]


# --- request-specific failures still fail that candidate alone --------------------------------


def test_input_the_server_rejects_fails_only_that_candidate(embedded_dir):
    def reject_long(path, body):
        if len(body["prompt"]) > 60:
            return error(
                400, "This model's maximum context length is 60 tokens", param="input_tokens"
            )
        return ok(path, body)

    long_answer = "word " * 60
    records = [record("r1", "Say hi.", "Hi there!", long_answer), record("r2", "Say bye.", "Bye!")]
    with FakeServer(reject_long) as server:
        stage = flr_stage()
        out = judge_with(stage, scorer(server, embedded_dir), records)
    judged = {j.candidate_ids[0]: j for r in out for j in r.judgments}
    assert judged["r1:c0"].status == "ok" and judged["r2:c0"].status == "ok"
    failed = judged["r1:c1"]
    assert failed.status == "failed" and "record 'r1' candidate 'r1:c1'" in failed.error
    assert "HTTP 400" in failed.error and stage.counters["failed"] == 1


# --- the same through the executor: no checkpoint of failures, and the rerun resumes --------------


def test_rate_limited_judge_fails_the_run_and_the_rerun_resumes(tmp_path, embedded_dir):
    with FakeServer(always(429, "rate limit reached")) as server:
        recipe = tiny_recipe(tmp_path, prompts=[{"id": "p1", "prompt": "Name a colour."}])
        recipe["models"]["judge"] = {
            "backend": "openai",
            "model": "fake",
            "base_url": server.base_url,
            "tokenizer": str(embedded_dir),
            "max_context": 2048,
            "max_retries": 0,
        }
        recipe["stages"] = [
            {"type": "generate", "models": ["a", "b"], "n": 1, "max_tokens": 8},
            {
                "type": "followup_likelihood",
                "name": "flr",
                "model": "judge",
                "dimensions": ["clarity"],
                "followups": {"clarity": FOLLOWUPS["clarity"].model_dump()},
            },
            {"type": "pairs", "judge": "flr"},
        ]
        loaded = parse_recipe(recipe)
        with pytest.raises(RunError, match=r"stage 'flr'.*HTTP 429.*rerun"):
            LocalExecutor(loaded, progress=False).run()
        run_dir = tmp_path / "run"
        assert not list(run_dir.glob("checkpoints/*flr*/shard-*.parquet"))
        assert list(run_dir.glob("checkpoints/*generate*/shard-*.parquet"))

        server.behaviour = ok
        result = LocalExecutor(parse_recipe(recipe), progress=False).run()
    flr = next(s for s in result.stages if s.name == "flr")
    assert flr.counters["judgments"] == 2 and not flr.counters.get("failed")


# --- generative judges: a backend error during generation stops the shard -------------------


def test_rate_limited_rubric_judge_stops_then_a_rerun_rates():
    with FakeServer(always(429, "rate limit reached")) as server:
        backend = OpenAIBackend("fake", base_url=server.base_url, max_retries=0)
        stage = RubricJudge("rating", RubricParams(model="m", score="parsed"))
        with pytest.raises(base.TransientBackendError, match="HTTP 429"):
            judge_with(stage, backend, RECORDS)
        assert not stage.counters.get("failed")
        server.behaviour = ok
        stage = RubricJudge("rating", RubricParams(model="m", score="parsed"))
        out = judge_with(stage, backend, RECORDS)
    judgments = [j for r in out for j in r.judgments]
    assert len(judgments) == 3 and all(j.status == "ok" and j.score == 4.0 for j in judgments)
