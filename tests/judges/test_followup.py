"""The follow-up likelihood judge (FLR): exact scores on every scoring backend, the shipped follow-up
sets, prefix sharing in the transformers backend, bad input, and recipes/flr.yaml end to end."""

from __future__ import annotations

import asyncio

import pytest

from synthpref.backends.segments import render_segment
from synthpref.backends.transformers_backend import TransformersBackend, plan_shared_prefixes
from synthpref.backends.types import ScoreRequest
from synthpref.executor.local import LocalExecutor
from synthpref.judges.followup import (
    DIMENSIONS,
    FollowupJudge,
    FollowupParams,
    FollowupSet,
    load_followups,
)
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import Message
from tests.judges.test_density_ratio import (
    REPO,
    TOL,
    _recipe,
    client,
    read_dataset,
    recipe_dict,
    record,
    reference_logprobs,
    run_stage,
)
from tests.judges.test_density_ratio import scoring_backend as _scoring_backend

#: transformers always; vllm and openai (a real `vllm serve`) when vllm is installed
scoring_backend = _scoring_backend

SETS = {
    "clarity": FollowupSet(
        positive=["That is clear, thanks.", "Got it!"],
        negative=["I don't follow.", "What do you mean?"],
    ),
    "accuracy": FollowupSet(positive=["Correct."], negative=["That's wrong.", "No way."]),
}


def test_followup_scores_equal_independent_forward_passes(scoring_backend, transformers_reference):
    rec = record("r", "What is the capital of Japan?", "Tokyo is the capital of Japan.", "Osaka.")
    stage = FollowupJudge(
        "flr",
        FollowupParams(
            model="m", dimensions=["clarity", "accuracy"], followups=SETS, weights={"accuracy": 3}
        ),
    )
    (out,) = run_stage(stage, {"m": client("m", scoring_backend)}, [rec])
    assert [j.status for j in out.judgments] == ["ok", "ok"]
    for cand, j in zip(rec.candidates, out.judgments, strict=True):
        conversation = [*rec.prompt, Message(role="assistant", content=cand.text)]
        dims = {}
        for dim, fs in SETS.items():
            means = {}
            for kind in ("positive", "negative"):
                means[kind] = []
                for text in getattr(fs, kind):
                    ref = reference_logprobs(
                        transformers_reference,
                        [*conversation, Message(role="user", content=text)],
                    )
                    means[kind].append(sum(ref) / len(ref))
                got = j.details["followups"][dim][kind]
                assert len(got) == len(means[kind])
                assert max(abs(a - b) for a, b in zip(got, means[kind], strict=True)) < TOL
            dims[dim] = sum(means["positive"]) / len(means["positive"]) - sum(
                means["negative"]
            ) / len(means["negative"])
            assert abs(j.scores[dim] - dims[dim]) < TOL
        assert abs(j.score - (dims["clarity"] + 3 * dims["accuracy"]) / 4) < TOL
        assert j.template_hash == stage.followup_hash() and j.model == "m"


def test_sum_aggregate_with_end_of_turn(transformers_reference):
    rec = record("r", "Say something nice.", "You are doing great!")
    fs = FollowupSet(positive=["Aw, thank you!"], negative=["That was weird."])
    stage = FollowupJudge(
        "flr",
        FollowupParams(
            model="m",
            dimensions=["kindness"],
            followups={"kindness": fs},
            aggregate="sum",
            include_end_of_turn=True,
        ),
    )
    (out,) = run_stage(stage, {"m": client("m", transformers_reference)}, [rec])
    (j,) = out.judgments
    conv = [*rec.prompt, Message(role="assistant", content="You are doing great!")]
    pos, neg = (
        sum(reference_logprobs(transformers_reference, [*conv, Message(role="user", content=t)], True))
        for t in ("Aw, thank you!", "That was weird.")
    )  # fmt: skip
    assert abs(j.score - (pos - neg)) < TOL * 8


def test_shipped_sets_and_user_sets(tmp_path):
    seen: set[str] = set()
    for dim in DIMENSIONS:
        fs = load_followups(dim, None)
        assert 6 <= len(fs.positive) <= 10 and 6 <= len(fs.negative) <= 10, dim
        assert not seen & set(fs.positive + fs.negative), f"{dim} repeats another set's utterance"
        seen |= set(fs.positive + fs.negative)
    path = tmp_path / "mine.yaml"
    path.write_text("positive: [Lovely.]\nnegative: [Awful.]\n")
    mine = load_followups("taste", str(path))
    assert mine.positive == ("Lovely.",) and mine.negative == ("Awful.",)
    assert mine.hash != load_followups("taste", FollowupSet(positive=["A"], negative=["B"])).hash


def test_prefix_sharing_matches_unshared_scoring(embedded_dir):
    """The follow-ups of each response share their conversation prefix: the backend runs it once
    (one prefix pass per response), and every log-probability equals the unshared path's."""
    backend = TransformersBackend(str(embedded_dir), batch_size=4)
    requests = []
    for answer in ("Water boils at 100 degrees Celsius at sea level.", "It depends."):
        conv = [
            Message(role="user", content="At what temperature does water boil?"),
            Message(role="assistant", content=answer),
        ]
        requests += [
            ScoreRequest(messages=[*conv, Message(role="user", content=t)])
            for t in load_followups("correctness", None).positive[:5]
        ]
        requests.append(ScoreRequest(messages=conv, include_end_of_turn=True))
    rendered = [render_segment(backend.tokenizer, r, None) for r in requests]
    groups, rest = plan_shared_prefixes(
        [r.token_ids for r in rendered], [r.start for r in rendered], backend.min_shared_prefix
    )
    assert sorted(len(m) for _, m in groups) == [2, 5, 5] and rest == []

    calls = []
    original = backend._score_shared
    backend._score_shared = lambda p, batch: calls.append(len(batch)) or original(p, batch)
    reported: list[int] = []
    shared = asyncio.run(backend.score(requests, on_result=lambda i, r: reported.append(i)))
    assert sorted(calls) == [2, 5, 5] and sorted(reported) == list(range(len(requests)))
    backend.prefix_sharing = False
    plain = asyncio.run(backend.score(requests))
    for a, b in zip(shared, plain, strict=True):
        assert a.tokens == b.tokens
        assert (
            max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs, strict=True)) < 1e-4
        )


def test_plan_shared_prefixes_groups_only_what_is_worth_sharing():
    ctx = list(range(100, 140))
    ids = [[*ctx, 1, 2], [*ctx, 3], [*ctx[:20], 9, 9, 9], [7] * 30 + [1], [7] * 30 + [2], [5, 6]]
    starts = [40, 40, 20, 30, 30, 1]
    groups, rest = plan_shared_prefixes(ids, starts, 16)
    assert sorted((p, sorted(m)) for p, m in groups) == [(30, [3, 4]), (40, [0, 1])]
    assert rest == [2, 5]
    groups, rest = plan_shared_prefixes(ids, starts, 35)
    assert groups == [(40, [0, 1])] and rest == [2, 3, 4, 5]


def test_bad_input_fails_the_row_not_the_shard(embedded_dir):
    small = TransformersBackend(str(embedded_dir), max_context=80, batch_size=4)
    records = [
        record("r1", "Say hi.", "Hi!", " ", "blah " * 120),
        record("r2", "Say bye.", "Bye!"),
    ]
    stage = FollowupJudge(
        "flr",
        FollowupParams(model="m", dimensions=["clarity"], followups={"clarity": SETS["clarity"]}),
    )
    out = run_stage(stage, {"m": client("m", small)}, records)
    judged = {j.candidate_ids[0]: j for r in out for j in r.judgments}
    assert judged["r1:c0"].status == "ok" and judged["r2:c0"].status == "ok"
    assert judged["r1:c1"].status == "failed" and "'r1:c1'" in judged["r1:c1"].error
    assert "empty" in judged["r1:c1"].error
    long = judged["r1:c2"]
    assert long.status == "failed" and "record 'r1' candidate 'r1:c2'" in long.error
    assert "over the model's context of 80" in long.error and "3 more follow-ups" in long.error

    stage.params.truncation = "left"
    out = run_stage(stage, {"m": client("m", small)}, records[:1])
    long = {j.candidate_ids[0]: j for j in out[0].judgments}["r1:c2"]
    assert long.status == "ok" and long.details["truncated_tokens"] > 0


def test_recipe_validation(tmp_path):
    api = {"a": {"backend": "embedded"}, "api": {"backend": "openai", "model": "gpt-x"}}
    with pytest.raises(RecipeError, match="cannot score"):
        parse_recipe(_recipe(tmp_path, {"type": "followup_likelihood", "model": "api"}, api))
    with pytest.raises(RecipeError, match="no follow-up set for dimension 'wit'"):
        parse_recipe(
            _recipe(tmp_path, {"type": "followup_likelihood", "model": "a", "dimensions": ["wit"]})
        )
    with pytest.raises(RecipeError, match="negative"):
        parse_recipe(
            _recipe(
                tmp_path,
                {
                    "type": "followup_likelihood",
                    "model": "a",
                    "dimensions": ["wit"],
                    "followups": {"wit": {"positive": ["Ha!"]}},
                },
            )
        )
    with pytest.raises(RecipeError, match="weights: 'wit' is not listed"):
        parse_recipe(
            _recipe(tmp_path, {"type": "followup_likelihood", "model": "a", "weights": {"wit": 1}})
        )


def test_flr_recipe_produces_a_preference_dataset(tmp_path):
    raw = recipe_dict("flr.yaml", limit=2, tmp_path=tmp_path)
    flr_stage = next(s for s in raw["stages"] if s["type"] == "followup_likelihood")
    assert len(flr_stage["dimensions"]) == 6  # the shipped six; two here keep the run short
    flr_stage["dimensions"] = ["understanding", "correctness"]
    loaded = parse_recipe(raw, base_dir=REPO / "recipes")
    result = LocalExecutor(loaded, progress=False).run()
    flr = next(s for s in result.stages if s.name == "flr")
    assert flr.counters["judgments"] == 4 and not flr.counters.get("failed")
    rows = read_dataset(result.run_dir)
    assert 1 <= len(rows) <= 2
    for row in rows:
        assert row["judge"] == "flr" and row["chosen"] != row["rejected"]
        assert row["score_chosen"] > row["score_rejected"]
