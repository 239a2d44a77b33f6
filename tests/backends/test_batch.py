"""The batch-job mechanism (backends/batch.py) against an in-memory provider: what is submitted,
what a killed run finds again, what is resubmitted, and what fails. The provider SDK paths are
tested against a local fake of both batch APIs in test_batch_providers.py."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from synthpref.backends.base import RequestError, TransientBackendError
from synthpref.backends.batch import (
    MAX_SUBMISSIONS,
    BatchJobs,
    BatchPending,
    BatchProvider,
    JobStatus,
    Outcome,
    run_batch,
)
from synthpref.backends.types import (
    Completion,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Usage,
)
from synthpref.cache import RequestCache
from synthpref.records import Message


class MemoryProvider(BatchProvider):
    """Jobs end when ``finish`` is called; each line is answered with its prompt reversed, unless
    ``expire`` or ``reject`` name it."""

    name = "memory"
    max_lines = 3
    max_bytes = 10**9

    def __init__(self, samples_per_line: bool = False) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.ids = itertools.count()
        self.split = samples_per_line
        self.expire: set[str] = set()  # prompt texts whose lines expire
        self.reject: set[str] = set()  # prompt texts whose lines are invalid

    def bodies(self, i, request):
        text = request.messages[-1].content
        n = request.params.n
        return (
            [{"text": text, "sample": k} for k in range(n)]
            if self.split
            else [{"text": text, "n": n}]
        )

    async def submit(self, lines):
        job = f"job{next(self.ids)}"
        self.jobs[job] = {"lines": list(lines), "ended": False}
        return job

    def finish(self, job=None):
        for name, job_state in self.jobs.items():
            if job is None or name == job:
                job_state["ended"] = True

    async def poll(self, job_id):
        return JobStatus(ended=self.jobs[job_id]["ended"], progress="x")

    async def outcomes(self, job_id):
        out = []
        for line in self.jobs[job_id]["lines"]:
            text = line.body["text"]
            if text in self.expire:
                continue  # missing from the results: retry
            if text in self.reject:
                out.append(Outcome(line.custom_id, "invalid", error="too long"))
            else:
                out.append(
                    Outcome(line.custom_id, "done", value={**line.body, "answer": text[::-1]})
                )
        return out

    def result(self, i, request, values):
        texts = [v["answer"] for v in values]
        if not self.split:
            texts = texts * values[0]["n"]
        return GenerationResult(
            completions=[
                Completion(text=t, finish_reason="stop", completion_tokens=1) for t in texts
            ],
            prompt_tokens=3,
            usage=Usage(input_tokens=3, output_tokens=len(texts), batch=True),
        )


def request(text: str, n: int = 1) -> GenerationRequest:
    return GenerationRequest(
        messages=[Message(role="user", content=text)], params=SamplingParams(n=n)
    )


def one_pass(provider, reqs, cache, reported, submissions):
    keys = [r.cache_key("memory") for r in reqs]

    def on_result(i, result):
        reported[keys[i]] = result

    return asyncio.run(run_batch(provider, "memory", reqs, keys, cache, on_result, submissions))


def test_submits_once_then_collects(tmp_path):
    cache = RequestCache(tmp_path / "cache.sqlite")
    provider = MemoryProvider()
    reqs = [request(t) for t in ("one", "two", "three", "four")]
    reported: dict = {}
    with pytest.raises(BatchPending) as pending:
        one_pass(provider, reqs, cache, reported, {})
    # four lines in jobs of at most three lines
    assert [len(j["lines"]) for j in provider.jobs.values()] == [3, 1]
    assert set(pending.value.jobs) == {"job0", "job1"}
    assert pending.value.total == 4 and pending.value.done == 0
    # a second pass while the jobs run submits nothing
    with pytest.raises(BatchPending):
        one_pass(provider, reqs, cache, reported, {})
    assert len(provider.jobs) == 2
    provider.finish()
    results = one_pass(provider, reqs, cache, reported, {})
    assert [r.completions[0].text for r in results] == ["eno", "owt", "eerht", "ruof"]
    assert len(reported) == 4 and len(provider.jobs) == 2
    assert [j["state"] for j in BatchJobs(cache).jobs()] == ["ended", "ended"]


def test_a_killed_run_finds_its_jobs(tmp_path):
    """The job ids live in cache.sqlite: a new process (new cache object, no memory) waits for the
    jobs it finds instead of submitting the lines again."""
    provider = MemoryProvider()
    reqs = [request("alpha"), request("beta")]
    cache = RequestCache(tmp_path / "cache.sqlite")
    with pytest.raises(BatchPending):
        one_pass(provider, reqs, cache, {}, {})
    cache.close()
    reopened = RequestCache(tmp_path / "cache.sqlite")
    with pytest.raises(BatchPending):
        one_pass(provider, reqs, reopened, {}, {})
    assert len(provider.jobs) == 1
    provider.finish()
    reported: dict = {}
    one_pass(provider, reqs, reopened, reported, {})
    assert len(reported) == 2 and len(provider.jobs) == 1


def test_only_unanswered_lines_are_resubmitted(tmp_path):
    cache = RequestCache(tmp_path / "cache.sqlite")
    provider = MemoryProvider()
    provider.expire = {"b"}
    reqs = [request("a"), request("b"), request("c")]
    reported: dict = {}
    with pytest.raises(BatchPending):
        one_pass(provider, reqs, cache, reported, {})
    provider.finish()
    with pytest.raises(BatchPending) as pending:
        one_pass(provider, reqs, cache, reported, {})
    # a and c answered and reported; b alone went into a new job
    assert len(reported) == 2 and pending.value.done == 2
    assert [line.body["text"] for line in provider.jobs["job1"]["lines"]] == ["b"]
    provider.expire = set()
    provider.finish()
    results = one_pass(provider, reqs, cache, reported, {})
    assert [r.completions[0].text for r in results] == ["a", "b", "c"]


def test_resubmissions_are_bounded(tmp_path):
    cache = RequestCache(tmp_path / "cache.sqlite")
    provider = MemoryProvider()
    provider.expire = {"never"}
    submissions: dict = {}
    reqs = [request("never")]
    for _ in range(MAX_SUBMISSIONS):
        with pytest.raises(BatchPending):
            one_pass(provider, reqs, cache, {}, submissions)
        provider.finish()
    with pytest.raises(TransientBackendError, match="submitted 3 times"):
        one_pass(provider, reqs, cache, {}, submissions)


def test_an_invalid_line_fails_its_request_and_is_not_resubmitted(tmp_path):
    cache = RequestCache(tmp_path / "cache.sqlite")
    provider = MemoryProvider()
    provider.reject = {"bad"}
    reqs = [request("ok"), request("bad")]
    reported: dict = {}
    with pytest.raises(BatchPending):
        one_pass(provider, reqs, cache, reported, {})
    provider.finish()
    with pytest.raises(RequestError) as err:
        one_pass(provider, reqs, cache, reported, {})
    assert err.value.index == 1 and "too long" in str(err.value)
    assert len(reported) == 1  # the good request was reported before the failure
    with pytest.raises(RequestError):
        one_pass(provider, reqs, cache, reported, {})
    assert len(provider.jobs) == 1


def test_samples_as_lines_come_back_together(tmp_path):
    """A provider without n gets one line per sample; a request is complete when all are in, in
    sample order."""
    cache = RequestCache(tmp_path / "cache.sqlite")
    provider = MemoryProvider(samples_per_line=True)
    reqs = [request("xy", n=2)]
    with pytest.raises(BatchPending):
        one_pass(provider, reqs, cache, {}, {})
    assert [line.sample for line in provider.jobs["job0"]["lines"]] == [0, 1]
    provider.finish()
    [result] = one_pass(provider, reqs, cache, {}, {})
    assert len(result.completions) == 2 and result.usage.batch
