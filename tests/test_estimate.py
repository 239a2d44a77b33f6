"""``synthpref estimate``: a pilot of the first K prompts run for real, online, in the run's own
directory and cache, projected to the whole source; the full run then reuses the pilot's calls."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import tests.judge_doubles  # noqa: F401  (registers the scripted backend)
from synthpref.cache import RequestCache
from synthpref.cli import app
from synthpref.estimate import estimate
from tests.backends.test_batch_providers import recipe as batch_recipe
from tests.backends.test_batch_providers import reply
from tests.conftest import write_recipe
from tests.fake_batch_server import API_KEY, FakeBatchProvider

runner = CliRunner()
PROMPTS = [{"id": f"p{k}", "prompt": f"Question number {k}: what is {k} + {k}?"} for k in range(8)]
PRICE = {"input": 1000.0, "output": 2000.0}


def scripted_recipe(tmp_path) -> dict:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return {
        "name": "estimated",
        "source": {"path": str(data), "id_field": "id"},
        "models": {
            "writer": {
                "backend": "scripted",
                "policy": "prefers_longer",
                "price": PRICE,
                "system_prompt": "Give a long answer.",
            },
            "judge": {"backend": "scripted", "policy": "prefers_longer", "price": PRICE},
            "free": {"backend": "scripted", "policy": "always_a"},
        },
        "stages": [
            {"type": "generate", "models": ["writer", "free"], "n": 1, "max_tokens": 16},
            {"type": "pairwise_judge", "name": "pw", "model": "judge", "max_tokens": 8},
            {"type": "pairs", "judge": "pw"},
        ],
        "output": {"dir": str(tmp_path / "run")},
        "settings": {"shard_size": 2},
    }


def spent(run_dir) -> float:
    cache = RequestCache(run_dir / "cache.sqlite")
    try:
        return cache.spent()
    finally:
        cache.close()


def test_the_projection_scales_the_pilot_to_the_source(tmp_path):
    path = write_recipe(tmp_path, scripted_recipe(tmp_path))
    est = estimate(path, pilot=2, progress=False)
    assert (est.prompts, est.pilot_prompts, est.factor) == (8, 2, 4.0)
    pilot_cost = spent(tmp_path / "run")
    assert pilot_cost > 0
    assert est.dollars_online == pytest.approx(4 * pilot_cost)
    by = {(r.stage, r.model): r for r in est.rows}
    assert by["generate", "writer"].requests == 8 and by["pw", "judge"].requests == 16
    assert not by["generate", "free"].priced and by["generate", "free"].dollars_online == 0
    # scripted models have no batch API: the batch total is the online one
    assert by["generate", "writer"].dollars_batch is None
    assert est.dollars_batch == pytest.approx(est.dollars_online)
    assert est.timed
    # the full run reuses the pilot's calls: it pays for the other 6 prompts only
    result = runner.invoke(app, ["run", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert spent(tmp_path / "run") == pytest.approx(est.dollars_online)
    # an estimate answered from the cache says it cannot time the work
    again = estimate(path, pilot=2, progress=False)
    assert not again.timed and again.dollars_online == pytest.approx(est.dollars_online)


def test_batch_models_are_piloted_online_and_projected_at_batch_prices(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    with FakeBatchProvider(reply) as server:
        path = write_recipe(tmp_path, batch_recipe(tmp_path, server, "openai", "batch"))
        result = runner.invoke(app, ["estimate", str(path), "--pilot", "2", "--no-progress"])
        assert result.exit_code == 0, result.output
        output = " ".join(result.output.split())
        assert "projected from a pilot of 2" in output and "$ batch" in output
        assert server.online_requests and not server.jobs  # the pilot ran online
        piloted = len(server.online_requests)
        est = estimate(path, pilot=2, progress=False)
        assert est.dollars_batch == pytest.approx(0.5 * est.dollars_online)
        # the real run in batch mode submits only what the pilot did not answer
        code = runner.invoke(app, ["run", str(path), "--no-progress"]).exit_code
        assert code == 0
        lines = sum(len(job.custom_ids) for job in server.jobs.values())
        assert lines == piloted  # 4 prompts in all, 2 piloted: the other 2 make as many calls
