"""Recipe validation: every problem is reported with its YAML path before anything runs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from synthpref.cli import app
from synthpref.executor.fingerprint import stage_fingerprints
from synthpref.recipes.loader import RecipeError, load_recipe, parse_recipe
from tests.conftest import tiny_recipe, write_recipe


def _problems(recipe: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe)
    return info.value.problems


def test_valid_recipe_loads(tmp_path):
    loaded = parse_recipe(tiny_recipe(tmp_path))
    assert [s.name for s in loaded.stages] == ["generate", "rating", "pairs"]
    assert set(loaded.models) == {"a", "b", "default"}


def test_unknown_key_names_its_path(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][1]["temprature"] = 0.5
    recipe["source"]["pathh"] = "x"
    problems = _problems(recipe)
    assert any(p.startswith("source.pathh: unknown key") for p in problems), problems


def test_stage_param_errors_have_yaml_paths(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][1]["temprature"] = 0.5
    recipe["stages"][0]["n"] = "many"
    problems = _problems(recipe)
    assert any(p.startswith("stages[1].temprature: unknown key") for p in problems), problems
    assert any(p.startswith("stages[0].n:") and "integer" in p for p in problems), problems


def test_missing_and_wrong_types(tmp_path):
    recipe = tiny_recipe(tmp_path)
    del recipe["output"]
    recipe["models"]["a"]["batch_size"] = -1
    problems = _problems(recipe)
    assert any(p.startswith("output: Field required") for p in problems), problems
    recipe["output"] = {"dir": "x"}
    problems = _problems(recipe)
    assert any(p.startswith("models.a.batch_size:") for p in problems), problems


def test_unknown_stage_model_and_backend(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][0]["models"] = ["a", "ghost"]
    recipe["stages"].append({"type": "no_such_stage"})
    recipe["models"]["c"] = {"backend": "telepathy"}
    problems = _problems(recipe)
    assert any("stages[0]" in p and "'ghost'" in p for p in problems), problems
    assert any(p.startswith("stages[3].type: unknown stage type 'no_such_stage'") for p in problems)
    assert any(p.startswith("models.c.backend: unknown backend 'telepathy'") for p in problems)


def test_stage_order_is_checked(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"] = [recipe["stages"][2]]
    problems = _problems(recipe)
    assert any("put a judge stage before it" in p for p in problems), problems


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("stages: [\n  - type: generate\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_validate_cli(tmp_path):
    runner = CliRunner()
    good = write_recipe(tmp_path, tiny_recipe(tmp_path))
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 0, result.output
    bad = tiny_recipe(tmp_path)
    bad["stages"][1]["aspects"] = ["no_such_aspect"]
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path, bad, "bad.yaml"))])
    assert result.exit_code == 2
    assert "stages[1]" in result.output and "no_such_aspect" in result.output


def test_stages_cli_lists_parameters():
    result = CliRunner().invoke(app, ["stages", "--json"])
    assert result.exit_code == 0, result.output
    assert "rubric_judge" in result.output and "max_retries" in result.output


def test_fingerprints_ignore_volatile_settings(tmp_path):
    base = parse_recipe(tiny_recipe(tmp_path))
    faster = tiny_recipe(tmp_path)
    faster["models"]["a"]["batch_size"] = 32
    changed_judge = tiny_recipe(tmp_path)
    changed_judge["stages"][1]["max_tokens"] = 7

    def fps(loaded):
        return stage_fingerprints("input", loaded.stages, loaded.models)

    assert fps(base) == fps(parse_recipe(faster))
    a, b = fps(base), fps(parse_recipe(changed_judge))
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]
