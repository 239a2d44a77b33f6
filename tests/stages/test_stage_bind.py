"""``check(previous)`` only reports; ``bind(previous)`` stores what a stage takes from earlier ones."""

from __future__ import annotations

import copy

import pytest

from synthpref.filters.consistency import ConsistencyFilter, ConsistencyParams
from synthpref.filters.margin import MarginFilter, MarginParams
from synthpref.filters.reliability import ReliabilityFilter, ReliabilityParams
from synthpref.judges.jury import Jury, JuryParams
from synthpref.recipes.loader import parse_recipe
from synthpref.stages.pairs import BuildPairs, PairsParams
from tests.conftest import tiny_recipe
from tests.filters.test_filters import _Named

GEN = _Named("gen", "generator")
RATING = _Named("rating", "judge", (1.0, 5.0))
PW = _Named("pw", "judge", (-1.0, 1.0))
PAIRS = _Named("p", "pairs")
PREVIOUS = [GEN, RATING, PW, PAIRS]
OTHER = [GEN, _Named("other", "judge", (0.0, 10.0)), RATING, PW, PAIRS]

STAGES = {
    "pairs": lambda: BuildPairs("pairs", PairsParams()),
    "jury": lambda: Jury("jury", JuryParams(judges=["rating", "pw"])),
    "consistency": lambda: ConsistencyFilter("c", ConsistencyParams()),
    "margin": lambda: MarginFilter(
        "m", MarginParams(min_margin=0.1, judges=["rating", "pw"], normalize=True)
    ),
    "reliability": lambda: ReliabilityFilter("rel", ReliabilityParams(gold="gold.jsonl")),
}


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_check_changes_nothing_on_the_stage(kind):
    stage = STAGES[kind]()
    before = copy.deepcopy(vars(stage))
    assert stage.check(PREVIOUS) == []
    assert stage.check(OTHER) == []
    assert vars(stage) == before


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_bind_resolves_what_check_used_to_store(kind):
    stage = STAGES[kind]()
    stage.check(OTHER)  # a check against another recipe leaves no trace on the binding
    stage.bind(PREVIOUS)
    fingerprint = {
        "pairs": {"judge": "pw"},
        "jury": {"ranges": {"rating": [1.0, 5.0], "pw": [-1.0, 1.0]}},
        "consistency": {"judges": ["rating", "pw"]},
        "margin": {"widths": {"rating": 4.0, "pw": 2.0}},
        "reliability": {"judge": "pw", "gold": None},
    }[kind]
    assert stage.fingerprint() == fingerprint
    if kind == "reliability":
        assert [(s.name, [p.name for p in prev]) for s, prev in stage._chain] == [
            ("rating", ["gen"]),
            ("pw", ["gen", "rating"]),
        ]


def test_a_loaded_recipe_binds_its_stages_in_order(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["stages"] = [
        recipe["stages"][0],
        recipe["stages"][1],
        {"type": "rubric_judge", "name": "second", "model": "b", "max_tokens": 6},
        {"type": "jury", "judges": ["rating", "second"]},
        {"type": "pairs", "allow_truncated": True},
        {"type": "consistency_filter"},
        {"type": "margin_filter", "min_margin": 0.1, "judges": ["rating"], "normalize": True},
        {"type": "reliability_filter", "gold": "gold.jsonl", "judge": "rating"},
    ]
    stages = {s.name: s for s in parse_recipe(recipe, base_dir=tmp_path).stages}
    assert stages["jury"].fingerprint() == {"ranges": {"rating": [1.0, 5.0], "second": [1.0, 5.0]}}
    assert stages["pairs"].judge == "jury"  # the last judge before it
    assert stages["consistency_filter"].judges == ["rating", "second"]  # juries do not vote
    assert stages["margin_filter"].fingerprint() == {"widths": {"rating": 4.0}}
    rel = stages["reliability_filter"]
    assert rel.judge == "rating"
    assert [s.name for s, _ in rel._chain] == ["rating"]
