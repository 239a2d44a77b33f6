"""A stage told its models by name (``Stage.model_params``): the models it uses, what it asks of
them and the client it gets, with no method of its own."""

from __future__ import annotations

import pytest

from synthpref.judges.density_ratio import DensityRatioJudge, DensityRatioParams
from synthpref.judges.followup import FollowupJudge, FollowupParams
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.stages.base import Stage, StageContext, StageParams
from synthpref.stages.router import Route, RouteParams


class TwoModelParams(StageParams):
    judge: str
    helper: str | None = None


class TwoModels(Stage):
    type_name = "two_models"
    kind = "judge"
    Params = TwoModelParams
    model_params = ("judge", "helper")
    model_capability = "score"

    async def process(self, records):
        return records


def test_models_used_are_the_named_parameters_each_once():
    assert TwoModels("s", TwoModelParams(judge="a")).models_used() == ["a"]
    assert TwoModels("s", TwoModelParams(judge="a", helper="a")).models_used() == ["a"]
    both = TwoModels("s", TwoModelParams(judge="a", helper="b"))
    assert both.requirements() == {"a": {"score"}, "b": {"score"}}


def test_shipped_stages_declare_their_models():
    cdr = DensityRatioJudge("cdr", DensityRatioParams(strong="s", weak="w"))
    assert cdr.requirements() == {"s": {"score"}, "w": {"score"}}
    same = DensityRatioJudge("cdr", DensityRatioParams(strong="s", weak="s"))
    assert same.models_used() == ["s"]
    assert FollowupJudge("flr", FollowupParams(model="m")).requirements() == {"m": {"score"}}
    assert Route("r", RouteParams()).requirements() == {}
    assert Route("r", RouteParams(model="m")).requirements() == {"m": {"score"}}
    generating = Route("r", RouteParams(model="m", method="generate"))
    assert generating.requirements() == {"m": {"generate"}}


def test_model_client_is_the_context_client():
    stage = TwoModels("s", TwoModelParams(judge="a"))
    with pytest.raises(AssertionError, match="before the executor attached"):
        stage.model_client("a")
    client = object()
    stage.ctx = StageContext({"a": client})  # type: ignore[dict-item]
    assert stage.model_client("a") is client
    with pytest.raises(KeyError, match="no model named 'b'"):
        stage.model_client("b")


def test_router_with_an_empty_model_name_is_a_recipe_error(tmp_path):
    """``model: ""`` used to mean no model at all, silently; only null (the default) means that."""
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    recipe = {
        "source": {"path": str(data)},
        "models": {"a": {"backend": "embedded"}},
        "stages": [{"type": "route", "model": ""}],
        "output": {"dir": str(tmp_path / "run")},
    }
    with pytest.raises(RecipeError, match="uses model '', which is not declared"):
        parse_recipe(recipe)
    recipe["stages"] = [{"type": "route", "model": None}]
    assert parse_recipe(recipe).stages[0].models_used() == []
