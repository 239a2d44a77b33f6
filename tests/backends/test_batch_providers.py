"""``mode: batch`` end to end through the official SDKs, against a local fake of the OpenAI Batch API
and Anthropic Message Batches (tests/fake_batch_server.py): runs that wait, runs that stop and are
collected later, a killed run, expired and failed lines, mixing modes, and batch prices."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from synthpref.backends.batch import BatchJobs
from synthpref.cache import RequestCache
from synthpref.cli import app
from tests.conftest import PROMPTS, write_recipe
from tests.fake_batch_server import API_KEY, Ask, FakeBatchProvider

runner = CliRunner()
PRICE = {"input": 2.0, "output": 8.0, "cached_input": 1.0}


def reply(ask: Ask, index: int) -> str:
    """For a judge prompt, a verdict for the longer response; else an answer whose length grows
    with the sample's index and the system prompt's length (Anthropic has no n: its samples are
    alike, so candidates differ by model)."""
    text = ask.last("user")
    if "Verdict" in text:
        a, b = (
            re.search(rf"\[Response {x}\]\n(.*?)\n\[End of response {x}\]", text, re.S).group(1)
            for x in "AB"
        )
        return f"Verdict: {'A+' if len(a) > len(b) else 'B+'}\nReasoning: scripted."
    system = next((m["content"] for m in ask.messages if m["role"] == "system"), "")
    return f"answer {index}{' and more' * (index + len(system) % 5)} to {len(text)} characters"


def recipe(tmp_path, server: FakeBatchProvider, provider: str, mode: str, **settings) -> dict:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    if provider == "openai":
        spec = {"backend": "openai", "model": "gpt-4o-mini", "base_url": server.openai_base_url}
    else:
        spec = {
            "backend": "anthropic",
            "model": "claude-haiku-4-5",
            "base_url": server.anthropic_base_url,
        }
    spec.update(mode=mode, price=PRICE, max_retries=1)
    return {
        "name": "batched",
        "source": {"path": str(data), "id_field": "id"},
        "models": {"m": spec, "t": {**spec, "system_prompt": "Be brief."}},
        "stages": [
            {"type": "generate", "models": ["m", "t"], "n": 1, "max_tokens": 16},
            {"type": "pairwise_judge", "name": "pw", "model": "m", "max_tokens": 16},
            {"type": "pairs", "judge": "pw"},
        ],
        "output": {"dir": str(tmp_path / "run")},
        "settings": {"shard_size": 2, "batch": {"poll_seconds": 0.05, **settings}},
    }


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)


def invoke(path):
    result = runner.invoke(app, ["run", str(path), "--no-progress"], env={"COLUMNS": "250"})
    return result.exit_code, " ".join(result.output.split())


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "data" / "preference.jsonl").open()]


def jobs(run_dir) -> list[dict]:
    cache = RequestCache(run_dir / "cache.sqlite")
    try:
        return BatchJobs(cache).jobs()
    finally:
        cache.close()


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_waiting_run_goes_through_batch_jobs_at_batch_prices(tmp_path, provider):
    with FakeBatchProvider(reply) as server:
        batch_dir = tmp_path / "batch"
        batch_dir.mkdir()
        code, output = invoke(write_recipe(batch_dir, recipe(batch_dir, server, provider, "batch")))
        assert code == 0, output
        assert not server.online_requests  # every call went through a job
        assert server.batch_creations[provider] >= 2  # generation, then the judge
        online_dir = tmp_path / "online"
        online_dir.mkdir()
        code, output = invoke(
            write_recipe(online_dir, recipe(online_dir, server, provider, "online"))
        )
        assert code == 0, output
    # the same data either way (the scripted answers depend only on the request)
    assert rows(batch_dir / "run") == rows(online_dir / "run")
    assert len(rows(batch_dir / "run")) == len(PROMPTS)
    # same tokens billed, half the dollars
    batch = json.loads((batch_dir / "run" / "summary.json").read_text())["stages"]
    online = json.loads((online_dir / "run" / "summary.json").read_text())["stages"]
    for b, o in zip(batch, online, strict=True):
        for name, bm in b["models"].items():
            om = o["models"][name]
            prompt = ("input_tokens", "cached_input_tokens", "cache_write_tokens")
            assert sum(bm[f] for f in prompt) == sum(om[f] for f in prompt)
            assert bm["output_tokens"] == om["output_tokens"] > 0
            assert bm["batch_calls"] == bm["calls"] > 0 and om["batch_calls"] == 0
            at_list_price = (
                bm["input_tokens"] * 2.0
                + bm["cached_input_tokens"] * 1.0
                + bm["cache_write_tokens"] * 2.0
                + bm["output_tokens"] * 8.0
            ) / 1e6
            assert bm["dollars"] == pytest.approx(at_list_price * 0.5)
            assert bm["dollars"] <= 0.5 * om["dollars"] + 1e-12


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_no_wait_stops_then_a_rerun_collects_and_resubmits_only_expired_lines(tmp_path, provider):
    with FakeBatchProvider(reply, hold=True) as server:
        path = write_recipe(tmp_path, recipe(tmp_path, server, provider, "batch", wait=False))
        code, output = invoke(path)
        assert code == 3, output
        assert "paused:" in output and "run the same command later" in output
        # one job per model per shard's generation calls (two models, asked at once; two shards)
        first_jobs = list(server.jobs)
        assert len(first_jobs) == 4
        # a rerun while they run submits nothing
        code, _ = invoke(path)
        assert code == 3 and list(server.jobs) == first_jobs
        expired = first_jobs[0]
        submitted = list(server.jobs[expired].custom_ids)
        server.expire(expired, keep=1)
        code, _ = invoke(path)
        assert code == 3
        new = [j for j in server.jobs if j not in first_jobs]
        # the expired lines, and only those, went into a new job
        assert len(new) == 1 and list(server.jobs[new[0]].custom_ids) == submitted[1:]
        server.hold = False
        for _ in range(10):
            for job in list(server.jobs):
                if not server.jobs[job].ended:
                    server.finish(job)
            code, output = invoke(path)
            if code == 0:
                break
            assert code == 3, output
        assert code == 0, output
        assert len(rows(tmp_path / "run")) == len(PROMPTS)
        assert not server.online_requests
        # no line was answered twice
        answered = [cid for _, cid in server.lines_answered]
        assert len(answered) == len(set(answered))
    recorded = jobs(tmp_path / "run")
    assert {j["job_id"] for j in recorded} == set(server.jobs)


def test_a_killed_run_never_resubmits_an_accepted_job(tmp_path, subprocess_env):
    """``synthpref run`` in a subprocess, killed while it waits on its first job; the rerun finds
    the job in the run's cache, waits for it, and finishes without submitting it again."""
    with FakeBatchProvider(reply, hold=True) as server:
        path = write_recipe(tmp_path, recipe(tmp_path, server, "openai", "batch"))
        env = {**subprocess_env, "OPENAI_API_KEY": "sk-test"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "synthpref.cli", "run", str(path), "--no-progress"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while not server.jobs and time.monotonic() < deadline:
                time.sleep(0.1)
            assert server.jobs, "the run submitted no job"
            time.sleep(0.5)  # it is now polling
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        accepted = set(server.jobs)
        recorded = {j["job_id"] for j in jobs(tmp_path / "run")}
        assert recorded and recorded <= accepted  # what the run recorded, the provider holds
        server.hold = False
        for job in accepted:
            server.finish(job)
        code, output = invoke(path)
        assert code == 0, output
        # the recorded jobs were collected, not submitted again: no later job holds their lines
        first_lines = {cid for job in recorded for cid in server.jobs[job].custom_ids}
        later = {
            cid for job in server.jobs if job not in accepted for cid in server.jobs[job].custom_ids
        }
        assert first_lines and not first_lines & later
        assert len(rows(tmp_path / "run")) == len(PROMPTS)


def test_results_are_shared_between_modes(tmp_path):
    """Batch and online results land in one request cache: an online run switched to batch mode
    submits nothing, and a batch run switched to online sends nothing."""
    with FakeBatchProvider(reply) as server:
        path = write_recipe(tmp_path, recipe(tmp_path, server, "openai", "online"))
        assert invoke(path)[0] == 0
        sent = len(server.online_requests)
        write_recipe(tmp_path, recipe(tmp_path, server, "openai", "batch"))
        code, output = invoke(path)
        assert code == 0, output
        assert not server.jobs and len(server.online_requests) == sent


def test_a_line_the_provider_rejects_fails_its_request_by_name(tmp_path):
    def reject_long(custom_id, body):
        return (400, "invalid_request_error", "prompt is too long") if body.get("n") else None

    with FakeBatchProvider(reply, line_error=reject_long) as server:
        path = write_recipe(tmp_path, recipe(tmp_path, server, "openai", "batch"))
        code, output = invoke(path)
    assert code == 1
    assert "rejected its line" in output and "prompt is too long" in output


def test_lines_failed_by_the_provider_are_submitted_again(tmp_path):
    failed: set[str] = set()

    def flaky(custom_id, body):
        if custom_id not in failed:
            failed.add(custom_id)
            return (500, "server_error", "try again")
        return None

    with FakeBatchProvider(reply, line_error=flaky) as server:
        path = write_recipe(tmp_path, recipe(tmp_path, server, "openai", "batch"))
        code, output = invoke(path)
        assert code == 0, output
        # each line was answered once, after one failure
        assert len(server.lines_answered) == len(failed)


@pytest.mark.slow
def test_batch_lines_answered_by_the_embedded_model(tmp_path):
    """The fake provider's lines answered by a real model (the embedded one): the batch run's
    candidates are that model's text, with its own token counts billed."""
    from tests.fake_batch_server import embedded_answerer

    with FakeBatchProvider(embedded_answerer()) as server:
        spec = recipe(tmp_path, server, "openai", "batch")
        spec["stages"] = spec["stages"][:1]  # generation only: the 135M model is no judge
        spec["source"]["limit"] = 2
        spec["output"]["formats"] = []  # data/records.parquet only
        path = write_recipe(tmp_path, spec)
        code, output = invoke(path)
        assert code == 0, output
        assert not server.online_requests and server.batch_creations["openai"] == 2  # per model
    import polars as pl

    records = pl.read_parquet(tmp_path / "run" / "data" / "records.parquet").to_dicts()
    texts = [c["text"] for r in records for c in r["candidates"]]
    assert len(texts) == 4 and all(t.strip() for t in texts)
    stage = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"][0]
    billed = stage["models"]["m"]
    assert billed["batch_calls"] == 2 and billed["output_tokens"] > 0
