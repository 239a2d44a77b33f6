"""``settings.max_cost_usd``: a run stops cleanly before it would pass the cap, says how far it got,
keeps everything it paid for, and a rerun with a higher cap finishes without paying twice.

Scripted models (no network) priced at $1000 per million tokens ($0.001 a token), billed by their
word counts, which are below the per-request ceilings the cap books (characters / 3 per prompt,
``max_tokens`` per sample)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import tests.judge_doubles  # noqa: F401  (registers the scripted backend)
from synthpref.cache import RequestCache
from synthpref.cli import app
from tests.conftest import PROMPTS, write_recipe

runner = CliRunner()
PRICE = {"input": 1000.0, "output": 1000.0}


def recipe(tmp_path, run: str, cap: float | None) -> dict:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = {
        "name": "capped",
        "source": {"path": str(data), "id_field": "id"},
        "models": {
            "writer": {"backend": "scripted", "policy": "prefers_longer", "price": PRICE},
            "judge": {"backend": "scripted", "policy": "prefers_longer", "price": PRICE},
        },
        "stages": [
            {"type": "generate", "models": ["writer"], "n": 2, "max_tokens": 6},
            {"type": "pairwise_judge", "name": "pw", "model": "judge", "max_tokens": 8},
            {"type": "pairs", "judge": "pw"},
        ],
        "output": {"dir": str(tmp_path / run)},
        "settings": {"shard_size": 1},
    }
    if cap is not None:
        out["settings"]["max_cost_usd"] = cap
    return out


def invoke(path):
    result = runner.invoke(app, ["run", str(path), "--no-progress"], env={"COLUMNS": "250"})
    return result.exit_code, " ".join(result.output.split())


def spent(run_dir) -> float:
    cache = RequestCache(run_dir / "cache.sqlite")
    try:
        return cache.spent()
    finally:
        cache.close()


@pytest.fixture(scope="module")
def uncapped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uncapped")
    code, output = invoke(write_recipe(tmp, recipe(tmp, "run", None)))
    assert code == 0, output
    return tmp / "run", spent(tmp / "run")


def test_the_cap_stops_the_run_before_it_is_passed_and_a_rerun_pays_nothing_twice(
    uncapped, tmp_path
):
    full_dir, full_cost = uncapped
    assert full_cost > 0
    cap = full_cost * 0.6
    path = write_recipe(tmp_path, recipe(tmp_path, "run", cap))
    code, output = invoke(path)
    assert code == 3, output
    assert "paused:" in output and "max_cost_usd" in output and "shards done" in output
    assert 0 < spent(tmp_path / "run") <= cap
    assert not (tmp_path / "run" / "summary.json").exists()

    # the same command with the same cap stops at once: nothing more fits
    before = spent(tmp_path / "run")
    code, output = invoke(path)
    assert code == 3 and spent(tmp_path / "run") == pytest.approx(before)

    # a higher cap resumes and finishes; the directory has paid what an uncapped run pays, once
    write_recipe(tmp_path, recipe(tmp_path, "run", full_cost * 10))
    code, output = invoke(path)
    assert code == 0, output
    assert spent(tmp_path / "run") == pytest.approx(full_cost)
    capped_rows = (tmp_path / "run" / "data" / "preference.jsonl").read_text()
    assert capped_rows == (full_dir / "data" / "preference.jsonl").read_text()


def test_a_cap_the_run_fits_in_changes_nothing(uncapped, tmp_path):
    full_dir, full_cost = uncapped
    code, output = invoke(write_recipe(tmp_path, recipe(tmp_path, "run", full_cost * 3)))
    assert code == 0, output
    assert spent(tmp_path / "run") == pytest.approx(full_cost)
    assert (tmp_path / "run" / "data" / "preference.jsonl").read_text() == (
        full_dir / "data" / "preference.jsonl"
    ).read_text()


def test_ray_refuses_a_cap(tmp_path):
    import synthpref
    from synthpref.recipes.loader import RecipeError

    with pytest.raises(RecipeError, match="max_cost_usd"):
        synthpref.run(recipe(tmp_path, "run", 1.0), executor="ray", progress=False)
