"""Templates and the files a recipe names: sandboxed rendering, and one path rule for every file.

Nothing in a recipe's text runs code (only a ``module:Class`` stage does), and every file a recipe
names is found relative to the recipe, then among the shipped prompts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from synthpref.cli import app
from synthpref.recipes.loader import RecipeError, load_recipe, parse_recipe
from synthpref.templates import load_template, prompts_dir
from tests.conftest import tiny_recipe, write_recipe


def _payload(marker: Path) -> str:
    return "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"


def _cdr_recipe(tmp_path: Path, customisation: dict) -> dict:
    recipe = tiny_recipe(tmp_path)
    recipe["stages"] = [
        {"type": "generate", "models": ["a"], "n": 2, "max_tokens": 8},
        {
            "type": "density_ratio",
            "name": "cdr",
            "strong": "a",
            "weak": "a",
            "customisations": {"default": customisation},
        },
        {"type": "pairs", "judge": "cdr"},
    ]
    return recipe


# --- nothing runs from a recipe's text --------------------------------------------------------


def test_validate_does_not_run_code_from_recipe_text(tmp_path: Path):
    marker = tmp_path / "pwned"
    recipe = _cdr_recipe(tmp_path, {"strong_system": _payload(marker), "weak_system": "Be bad."})
    result = CliRunner().invoke(app, ["validate", str(write_recipe(tmp_path, recipe))])
    assert not marker.exists(), "a recipe string ran a shell command"
    assert result.exit_code == 2, result.output
    assert "stages[1]" in result.output and "strong_system" in result.output, result.output
    assert "unsafe" in result.output, result.output


def test_template_file_does_not_run_code(tmp_path: Path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.jinja").write_text(_payload(marker))
    template = load_template("evil.jinja", str(tmp_path))
    with pytest.raises(ValueError, match=r"evil\.jinja.*unsafe"):
        template.render()
    assert not marker.exists(), "a template ran a shell command"


def test_sandbox_still_renders_ordinary_templates(tmp_path: Path):
    (tmp_path / "ok.jinja").write_text(
        "{% for c in items %}{{ loop.index }}. {{ c | upper }}{% endfor %} {{ data.get('k') }}"
    )
    out = load_template("ok.jinja", str(tmp_path)).render(items=["a", "b"], data={"k": "v"})
    assert out == "1. A2. B v"


# --- one path rule for every file a recipe names ----------------------------------------------


def _static(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch) -> Path:
    """The recipe lives in ``tmp_path/recipes``; the working directory is somewhere else."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (tmp_path / "recipes").mkdir()
    return tmp_path / "recipes"


def test_judge_templates_are_found_beside_the_recipe(tmp_path: Path, elsewhere: Path):
    for name in ("rubric", "absolute", "pairwise", "write", "answer"):
        _static(elsewhere / "tpl" / f"{name}.jinja", f"MINE-{name}")
    _static(elsewhere / "rubric" / "honesty.jinja", "MINE-honesty-shadow")
    recipe = tiny_recipe(tmp_path)
    recipe["stages"] = [
        {"type": "generate", "models": ["a"], "n": 2, "max_tokens": 8},
        {
            "type": "rubric_judge",
            "name": "rating",
            "model": "a",
            "aspects": ["helpfulness", "honesty", "truthfulness"],
            "templates": {"helpfulness": "tpl/rubric.jinja"},
        },
        {
            "type": "absolute_judge",
            "model": "a",
            "template": "tpl/absolute.jinja",
            "rubric": {"criteria": "c", "scores": {1: "bad", 2: "good"}},
        },
        {"type": "pairwise_judge", "model": "a", "template": "tpl/pairwise.jinja"},
        {"type": "checklist_writer", "model": "a", "template": "tpl/write.jinja"},
        {"type": "checklist_judge", "model": "a", "template": "tpl/answer.jinja"},
        {"type": "pairs", "judge": "rating"},
    ]
    loaded = load_recipe(write_recipe(elsewhere, recipe))
    rubric, absolute, pairwise, writer, answer = loaded.stages[1:6]
    assert rubric.templates()["helpfulness"].render() == "MINE-rubric"
    assert rubric.templates()["honesty"].render() == "MINE-honesty-shadow"
    shipped = load_template("rubric/truthfulness.jinja")
    assert rubric.templates()["truthfulness"].hash == shipped.hash
    assert absolute.template.render() == "MINE-absolute"
    assert pairwise.template.render() == "MINE-pairwise"
    assert writer.template.render() == "MINE-write"
    assert answer.template.render() == "MINE-answer"


def test_absolute_template_paths_and_dict_recipes(tmp_path: Path, elsewhere: Path):
    _static(tmp_path / "abs" / "mine.jinja", "MINE-absolute-path")
    _static(Path.cwd() / "tpl" / "cwd.jinja", "MINE-cwd")
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][1]["templates"] = {
        "helpfulness": str(tmp_path / "abs" / "mine.jinja"),
        "honesty": "tpl/cwd.jinja",
    }
    recipe["stages"][1]["aspects"] = ["helpfulness", "honesty"]
    loaded = parse_recipe(recipe)  # a mapping: relative to the working directory
    rating = loaded.stages[1]
    assert rating.templates()["helpfulness"].render() == "MINE-absolute-path"
    assert rating.templates()["honesty"].render() == "MINE-cwd"


def test_missing_template_names_the_yaml_path_and_where_it_looked(tmp_path: Path, elsewhere):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][1]["templates"] = {"helpfulness": "tpl/nope.jinja"}
    recipe["stages"][1]["aspects"] = ["helpfulness"]
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(elsewhere, recipe))
    [problem] = info.value.problems
    assert problem.startswith("stages[1]: templates.helpfulness:"), problem
    assert str(elsewhere / "tpl" / "nope.jinja") in problem, problem
    assert str(prompts_dir() / "tpl" / "nope.jinja") in problem, problem


def test_cdr_files_are_found_beside_the_recipe(tmp_path: Path, elsewhere: Path):
    _static(
        elsewhere / "ex" / "mine.yaml",
        yaml.safe_dump({"exemplars": [{"prompt": "MINE-q", "good": "g", "bad": "b"}]}),
    )
    _static(elsewhere / "sys" / "strong.jinja", "MINE-strong for {{ domain }}")
    recipe = _cdr_recipe(
        tmp_path,
        {
            "strong_system": "sys/strong.jinja",
            "weak_system": "Be unhelpful.",
            "exemplars": "ex/mine.yaml",
        },
    )
    loaded = load_recipe(write_recipe(elsewhere, recipe))
    side = loaded.stages[1].resolved()["default"].strong
    assert side.system == "MINE-strong for default"
    assert side.turns[0].content == "MINE-q"


def test_cdr_missing_exemplars_file_says_where_it_looked(tmp_path: Path, elsewhere: Path):
    recipe = _cdr_recipe(tmp_path, {"strong_system": "Good.", "exemplars": "ex/none.yaml"})
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(elsewhere, recipe))
    text = str(info.value)
    assert "stages[1]" in text and "exemplars" in text, text
    assert str(elsewhere / "ex" / "none.yaml") in text, text


def test_followup_sets_are_found_beside_the_recipe(tmp_path: Path, elsewhere: Path):
    _static(elsewhere / "sets" / "wit.yaml", "positive: [MINE-ha]\nnegative: [MINE-meh]\n")
    recipe = tiny_recipe(tmp_path)
    recipe["stages"] = [
        {"type": "generate", "models": ["a"], "n": 2, "max_tokens": 8},
        {
            "type": "followup_likelihood",
            "name": "flr",
            "model": "a",
            "dimensions": ["wit", "relevance"],
            "followups": {"wit": "sets/wit.yaml"},
        },
        {"type": "pairs", "judge": "flr"},
    ]
    loaded = load_recipe(write_recipe(elsewhere, recipe))
    wit, relevance = loaded.stages[1].sets()
    assert wit.positive == ("MINE-ha",) and wit.negative == ("MINE-meh",)
    assert relevance.positive  # the shipped set, found in the package prompts
