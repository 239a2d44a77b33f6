"""Custom judges from a recipe: an installed plugin package, a module:Class path, clear errors, and
the self-preference warning."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import records_from_arrow
from synthpref.stages.registry import UnknownStage, resolve_stage
from tests.conftest import tiny_recipe, write_recipe

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = Path(__file__).resolve().parents[1] / "fixtures" / "plugin_pkg"
STYLE = "Plain English, short sentences."


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The example plugin package, pip-installed into its own target directory."""
    work = tmp_path_factory.mktemp("plugin")
    src = work / "src"
    shutil.copytree(PLUGIN, src)  # build in a copy: pip writes build/ and *.egg-info in-tree
    site = work / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    assert list(site.glob("synthpref_example_judges-*.dist-info/entry_points.txt"))
    return site


def test_docs_show_the_tested_example():
    """docs/custom-judges.md shows exactly the plugin this file installs and runs."""
    doc = (ROOT / "docs" / "custom-judges.md").read_text()
    code = (PLUGIN / "synthpref_example_judges" / "__init__.py").read_text().rstrip()
    toml = (PLUGIN / "pyproject.toml").read_text().rstrip()
    blocks = re.findall(r"```(?:python|toml)\n(.*?)\n```", doc, re.S)
    assert code in blocks
    assert toml in blocks


def test_readme_shows_the_tested_example():
    """The README's custom judge is the example plugin, byte for byte, and about 25 lines long."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Custom judges") :]
    block = re.search(r"```python\n(.*?)\n```", section, re.S).group(1)
    code = (PLUGIN / "synthpref_example_judges" / "__init__.py").read_text().rstrip()
    assert block == code
    assert len(code.splitlines()) <= 32


def test_the_example_imports_only_the_plugin_api():
    """A custom judge needs nothing beyond the documented plugin module (and pydantic)."""
    import ast

    code = (PLUGIN / "synthpref_example_judges" / "__init__.py").read_text()
    imported = {
        node.module for node in ast.walk(ast.parse(code)) if isinstance(node, ast.ImportFrom)
    }
    assert imported == {"pydantic", "synthpref.judges"}


@pytest.mark.slow
def test_installed_plugin_runs_from_a_recipe(tmp_path, plugin_site, subprocess_env, embedded_dir):
    recipe = tiny_recipe(tmp_path, prompts=[{"id": "p1", "prompt": "Say hello in French."}])
    recipe["stages"] = [
        {"type": "generate", "models": ["a", "b"], "n": 1, "max_tokens": 8},
        {"type": "style_judge", "name": "style", "model": "a", "style": STYLE, "max_tokens": 3},
        {"type": "pairs", "judge": "style"},
    ]
    path = write_recipe(tmp_path, recipe)
    env = {**subprocess_env, "PYTHONPATH": str(plugin_site)}
    cli = [sys.executable, "-m", "synthpref.cli"]
    listed = subprocess.run(
        [*cli, "stages", "--json"], env=env, capture_output=True, text=True, check=True
    )
    catalogue = json.loads(listed.stdout)
    assert catalogue["style_judge"]["kind"] == "judge"
    assert "style" in catalogue["style_judge"]["params"]

    run = subprocess.run(
        [*cli, "run", str(path), "--no-progress"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "self-preference" in run.stderr  # the judge also generated the candidates
    assert "style: judgments=2" in " ".join(run.stderr.split())
    (record,) = records_from_arrow(pq.read_table(tmp_path / "run" / "data" / "records.parquet"))
    judgments = record.judgments_by("style")
    assert len(judgments) == 2
    for j in judgments:
        assert j.template_hash and j.model == "a"
        assert j.raw.startswith("Score:")
        assert j.status == "failed" or 1 <= j.score <= 10

    # without the package the same recipe is refused, with a hint
    bad = subprocess.run(
        [*cli, "validate", str(path)], env=subprocess_env, capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "unknown stage type 'style_judge'" in " ".join(bad.stderr.split())


def test_module_class_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN))
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][1] = {
        "type": "synthpref_example_judges:StyleJudge",
        "name": "style",
        "model": "a",
        "style": STYLE,
    }
    recipe["stages"][2] = {"type": "pairs", "judge": "style"}
    loaded = parse_recipe(recipe)
    stage = loaded.stages[1]
    assert type(stage).__name__ == "StyleJudge" and stage.params.style == STYLE

    recipe["stages"][1]["styel"] = "typo"
    with pytest.raises(RecipeError, match=r"stages\[1\]\.styel: unknown key"):
        parse_recipe(recipe)


@pytest.mark.parametrize(
    "type_name, message",
    [
        ("pairwise_judg", "did you mean 'pairwise_judge'"),
        ("no_such_module_xyz:Judge", "put its directory on PYTHONPATH"),
        ("synthpref.judges.pairwise:Nope", "its Stage classes: PairwiseJudge"),
        ("json:loads", "is a function, not a synthpref Stage subclass"),
        ("collections:Counter", "the class Counter, not a synthpref Stage subclass"),
        ("synthpref.judges.base:JudgeStage", "does not implement process"),
    ],
)
def test_resolution_errors_say_what_is_wrong(type_name, message):
    with pytest.raises(UnknownStage, match=re.escape(message)):
        resolve_stage(type_name)


def test_import_error_inside_the_module_names_the_missing_dependency(tmp_path, monkeypatch):
    (tmp_path / "needs_missing_dep.py").write_text("import not_installed_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnknownStage, match="needs 'not_installed_dep_xyz', which is not installed"):
        resolve_stage("needs_missing_dep:Judge")


def test_recipe_reports_resolution_errors_with_the_yaml_path(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"][1] = {"type": "json:loads"}
    with pytest.raises(RecipeError, match=r"stages\[1\]\.type: 'json:loads' is a function"):
        parse_recipe(recipe)


# self-preference --------------------------------------------------------------------------------


def test_self_preference_warning_for_every_judge(tmp_path):
    recipe = tiny_recipe(tmp_path)  # generators a and b are both the embedded model; judge is a
    loaded = parse_recipe(recipe)
    (warning,) = loaded.warnings
    assert "stages[1] (rating)" in warning
    assert "'a', 'b'" in warning  # b has another system prompt but the same weights

    import tests.judge_doubles  # noqa: F401  (registers the scripted backend)

    recipe["models"]["judge"] = {"backend": "scripted", "policy": "always_a"}
    recipe["stages"][1] = {"type": "pairwise_judge", "name": "pw", "model": "judge"}
    recipe["stages"][2] = {"type": "pairs", "judge": "pw"}
    assert parse_recipe(recipe).warnings == []

    recipe["stages"][0]["models"] = ["a", "judge"]
    (warning,) = parse_recipe(recipe).warnings
    assert "stages[1] (pw)" in warning and "scripted-always_a" in warning


def test_cli_prints_the_warning(tmp_path):
    from typer.testing import CliRunner

    from synthpref.cli import app

    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0
    assert "self-preference" in " ".join(result.output.split())
