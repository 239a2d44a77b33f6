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


# --- recipes that used to be accepted although they were wrong --------------------------------


def _load_text(tmp_path, text: str) -> list[str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return info.value.problems


def test_duplicate_yaml_keys_are_refused_at_any_depth(tmp_path):
    good = write_recipe(tmp_path, tiny_recipe(tmp_path)).read_text()
    text = (
        good
        + "settings:\n  shard_size: 1\n"
        + "models:\n  a: {backend: embedded, backend: transformers}\n"
    )
    problems = _load_text(tmp_path, text)
    assert any(p.startswith("settings: duplicate key") and "line" in p for p in problems), problems
    assert any(p.startswith("models: duplicate key") for p in problems), problems
    assert any(p.startswith("models.a.backend: duplicate key") for p in problems), problems


def test_embedded_backend_refuses_another_model(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["models"]["a"]["model"] = "Llama-3.1-70B"
    problems = _problems(recipe)
    assert any(p.startswith("models.a.model:") and "SmolLM2" in p for p in problems), problems
    recipe["models"]["a"]["model"] = "SmolLM2-135M-Instruct"
    parse_recipe(recipe)


def test_generate_needs_a_model(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][0]["models"] = []
    assert any(p.startswith("stages[0].models:") for p in _problems(recipe))


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_sampling_params_must_be_finite(tmp_path, value):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][0]["temperature"] = value
    recipe["stages"][0]["models"] = ["a", {"model": "b", "top_p": value}]
    recipe["stages"][1]["temperature"] = value
    problems = _problems(recipe)
    for where in ("stages[0].temperature:", "stages[0].models[1]", "stages[1].temperature:"):
        assert any(p.startswith(where) and "finite" in p for p in problems), (where, problems)


def test_yaml_infinity_is_refused(tmp_path):
    text = write_recipe(tmp_path, tiny_recipe(tmp_path)).read_text()
    text = text.replace("max_tokens: 16", "max_tokens: 16\n  temperature: .inf")
    problems = _load_text(tmp_path, text)
    assert any(p.startswith("stages[0].temperature:") for p in problems), problems


@pytest.mark.parametrize("n", [1e24, 10**24, 2.0, True])
def test_counts_are_whole_numbers_of_sane_size(tmp_path, n):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][0]["n"] = n
    recipe["settings"]["shard_size"] = n
    problems = _problems(recipe)
    assert any(p.startswith("stages[0].n:") for p in problems), problems
    assert any(p.startswith("settings.shard_size:") for p in problems), problems


def test_backend_must_be_a_name(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["models"]["a"]["backend"] = ["embedded", "vllm"]
    problems = _problems(recipe)
    assert any(p.startswith("models.a.backend:") for p in problems), problems


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "a\\b", "", "with space"])
def test_stage_names_are_simple(tmp_path, name):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][1]["name"] = name
    recipe["stages"][2]["judge"] = name
    problems = _problems(recipe)
    assert len(problems) == 1 and problems[0].startswith("stages[1].name:"), problems


def test_simple_stage_names_are_accepted(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][1]["name"] = "rating-v2.1_final"
    recipe["stages"][2]["judge"] = "rating-v2.1_final"
    assert parse_recipe(recipe).stages[1].name == "rating-v2.1_final"


def test_a_bad_parameter_causes_no_follow_on_errors(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][0]["n"] = "many"
    problems = _problems(recipe)
    assert len(problems) == 1 and problems[0].startswith("stages[0].n:"), problems
    recipe["stages"][0]["n"] = 1
    recipe["stages"][1]["type"] = "no_such_judge"
    problems = _problems(recipe)
    assert len(problems) == 1 and problems[0].startswith("stages[1].type:"), problems


def test_missing_top_level_key_still_reports_stage_and_model_errors(tmp_path):
    recipe = tiny_recipe(tmp_path)
    del recipe["output"]
    recipe["stages"][1]["temprature"] = 0.5
    recipe["stages"][0]["models"] = ["a", "ghost"]
    recipe["models"]["a"]["batch_size"] = -1
    problems = _problems(recipe)
    assert any(p.startswith("output: Field required") for p in problems), problems
    assert any(p.startswith("stages[1].temprature: unknown key") for p in problems), problems
    assert any(p.startswith("stages[0]") and "'ghost'" in p for p in problems), problems
    assert any(p.startswith("models.a.batch_size:") for p in problems), problems
