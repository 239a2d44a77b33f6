"""eval-judges: verdicts and metrics on hand-built judgments, the seeded balanced A/B order, malformed
pair rows, and a real run of the quickstart recipe's rubric judge on the embedded model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from synthpref.cli import app
from synthpref.evaluation.data import (
    FIRST,
    SECOND,
    LabelledPair,
    chosen_first_flags,
    data_stem,
    load_pairs,
    rows_to_pairs,
    select_pairs,
    to_items,
)
from synthpref.evaluation.metrics import (
    agreement,
    judge_verdict,
    longer_wins,
    random_verdicts,
    shown_order_labels,
    summarize,
    wilson_interval,
)
from synthpref.evaluation.run import build_report
from synthpref.records import Candidate, Judgment, Message, Record
from synthpref.sources import SourceError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "evaldata"
ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _pair(i: int, chosen: str = "good answer", rejected: str = "bad", subset: str = "s"):
    return LabelledPair(
        id=f"p{i}",
        row=i + 1,
        prompt=[Message(role="user", content=f"question {i}")],
        chosen=chosen,
        rejected=rejected,
        subset=subset,
    )


def _record(*judgments: Judgment) -> Record:
    return Record(
        id="r",
        prompt=[Message(role="user", content="q")],
        candidates=[Candidate(id="A", model="d", text="x"), Candidate(id="B", model="d", text="y")],
        judgments=list(judgments),
    )


def _point(judge: str, cand: str, score: float | None, status: str = "ok") -> Judgment:
    return Judgment(judge=judge, candidate_ids=[cand], score=score, status=status)


def _pairwise(score: float | None, agree: bool | None = None, bias: float | None = None):
    details = {}
    if agree is not None:
        details["agree"] = agree
    if bias is not None:
        details["position_bias"] = bias
    return Judgment(
        judge="pw",
        candidate_ids=["A", "B"],
        score=score,
        status="ok" if score is not None else "failed",
        error=None if score is not None else "no parseable verdict",
        details=details,
    )


# verdicts -------------------------------------------------------------------------------------


def test_pointwise_verdict_compares_scores_and_equal_is_a_tie():
    rec = _record(_point("r", "A", 4.0), _point("r", "B", 2.5))
    v = judge_verdict(rec, "r", chosen_id="A", rejected_id="B")
    assert (v.verdict, v.chosen_score, v.rejected_score, v.pairwise) == (1, 4.0, 2.5, False)
    assert judge_verdict(rec, "r", chosen_id="B", rejected_id="A").verdict == -1
    tie = _record(_point("r", "A", 3.0), _point("r", "B", 3.0))
    assert judge_verdict(tie, "r", "A", "B").verdict == 0


def test_failed_or_missing_judgments_are_failures_with_a_reason():
    failed = _record(
        _point("r", "A", 4.0),
        Judgment(judge="r", candidate_ids=["B"], status="failed", error="no rating"),
    )
    v = judge_verdict(failed, "r", "A", "B")
    assert v.verdict is None and v.error == "no rating"
    assert judge_verdict(_record(), "r", "A", "B").error == "no judgment"


def test_pairwise_verdict_is_the_sign_of_the_preference_for_the_first_candidate():
    rec = _record(_pairwise(0.5, agree=True, bias=0.25))
    v = judge_verdict(rec, "pw", chosen_id="A", rejected_id="B")
    assert (v.verdict, v.pairwise, v.consistent, v.position_bias) == (1, True, True, 0.25)
    assert judge_verdict(rec, "pw", chosen_id="B", rejected_id="A").verdict == -1
    assert judge_verdict(_record(_pairwise(0.0, agree=False)), "pw", "A", "B").verdict == 0
    failed = judge_verdict(_record(_pairwise(None)), "pw", "A", "B")
    assert failed.verdict is None and failed.pairwise and failed.consistent is None


# metrics --------------------------------------------------------------------------------------


def test_summary_counts_ties_and_failures_as_wrong_and_reports_decided_accuracy():
    verdicts = [1, 1, 1, -1, 0, None, 1, -1]
    first = [True, False, True, False, True, False, True, False]
    consistent = [True, True, False, None, True, None, True, False]
    s = summarize(verdicts, first, consistent, [0.5, None, -0.5, None, 0.0, None, 1.0, 0.0])
    assert (s["n"], s["correct"], s["wrong"], s["ties"], s["failures"]) == (8, 4, 2, 1, 1)
    assert s["accuracy"] == 4 / 8
    assert s["accuracy_decided"] == 4 / 6
    assert s["tie_rate"] == 1 / 8 and s["failure_rate"] == 1 / 8
    assert s["accuracy_chosen_first"] == 3 / 4  # [1, 1, 0, 1]
    assert s["accuracy_chosen_second"] == 1 / 4  # [1, -1, None, -1]
    assert s["position_consistency"] == 4 / 6 and s["position_consistency_n"] == 6
    assert s["position_bias"] == pytest.approx(1.0 / 5)
    lo, hi = s["accuracy_ci95"]
    assert lo < 0.5 < hi
    empty = summarize([])
    assert empty["accuracy"] is None and empty["accuracy_ci95"] is None


def test_wilson_interval_matches_the_formula():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_kappa_and_agreement_exactly():
    a = [1, 1, 1, -1, -1, 0, None]
    b = [1, 1, -1, -1, 1, 0, 1]
    out = agreement(a, b)  # the None pair is dropped
    # 6 items, observed 4/6; marginals a: 1:3 -1:2 0:1, b: 1:3 -1:2 0:1
    p_o, p_e = 4 / 6, (3 * 3 + 2 * 2 + 1 * 1) / 36
    assert out["n"] == 6
    assert out["agreement"] == pytest.approx(p_o)
    assert out["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))
    assert agreement([None], [1]) == {"n": 0, "kappa": None, "agreement": None}


def test_shown_order_labels_flip_when_chosen_is_second():
    assert shown_order_labels([1, 1, -1, 0, None], [True, False, False, True, True]) == [
        1,
        -1,
        1,
        0,
        None,
    ]


def test_baselines():
    assert longer_wins("longer text", "short") == 1
    assert longer_wins("x", "xyz") == -1
    assert longer_wins("abc", "xyz") == 0
    assert random_verdicts(50, 0) == random_verdicts(50, 0)
    assert random_verdicts(50, 0) != random_verdicts(50, 1)
    coins = random_verdicts(4000, 7)
    assert set(coins) == {1, -1}
    assert abs(coins.count(1) / 4000 - 0.5) < 0.03


def test_report_on_hand_built_judgments():
    pairs = [
        _pair(0, chosen="a long good answer", rejected="bad", subset="x"),
        _pair(1, chosen="ok", rejected="a long bad answer", subset="x"),
        _pair(2, chosen="good", rejected="nope", subset="y"),
        _pair(3, chosen="fine answer", rejected="no", subset="y"),
    ]
    items = to_items(pairs, seed=3)
    # judge "r" (pointwise) gives the chosen response 5 and the rejected 1, except: pair 1 reversed,
    # pair 2 tied; pairwise judge "pw" prefers the chosen one on every pair, consistent on two;
    # pair 3 fails for both.
    judged = {}
    for k, it in enumerate(items):
        c, r = it.chosen_id, it.rejected_id
        js = []
        if k == 3:
            js.append(Judgment(judge="r", candidate_ids=[c], status="failed", error="boom"))
            js.append(_point("r", r, 1.0))
            js.append(_pairwise(None))
        else:
            hi, lo = {0: (5.0, 1.0), 1: (1.0, 5.0), 2: (3.0, 3.0)}[k]
            js += [_point("r", c, hi), _point("r", r, lo)]
            pref = 1.0 if c == "A" else -1.0
            js.append(_pairwise(pref, agree=k != 1))
        judged[it.record.id] = it.record.model_copy(update={"judgments": js})
    report, rows = build_report(items, judged, [("r", "rubric_judge"), ("pw", "pairwise_judge")])
    r, pw = report["judges"]
    assert (r["kind"], pw["kind"]) == ("pointwise", "pairwise")
    assert r["overall"]["accuracy"] == 1 / 4
    assert r["overall"]["tie_rate"] == 1 / 4 and r["overall"]["failure_rate"] == 1 / 4
    assert r["overall"]["accuracy_decided"] == 1 / 2
    assert r["overall"].get("position_consistency") is None
    assert r["failure_reasons"] == {"boom": 1}
    assert pw["overall"]["accuracy"] == 3 / 4 and pw["overall"]["accuracy_decided"] == 1.0
    assert pw["overall"]["position_consistency"] == 2 / 3
    assert pw["overall"]["kappa_human"] == 1.0
    assert r["by_subset"]["x"]["accuracy"] == 1 / 2 and r["by_subset"]["y"]["accuracy"] == 0.0
    longer, rand = report["baselines"]
    # longer wins: pair 1's chosen is the shorter, "good" and "nope" have equal length
    assert longer["overall"]["accuracy"] == 2 / 4 and longer["overall"]["tie_rate"] == 1 / 4
    assert rand["expected_accuracy"] == 0.5 and rand["seed"] == 0
    assert rand["overall"]["accuracy"] == random_verdicts(4, 0).count(1) / 4
    assert report["subsets"] == {"x": 2, "y": 2} and report["chosen_first"] == 2
    kappas = {(a["a"], a["b"]): a for a in report["agreement"]}
    assert kappas[("r", "pw")]["n"] == 3
    assert kappas[("pw", "human")]["kappa"] == 1.0
    assert rows[0]["judges"]["r"]["verdict"] == "chosen"
    assert rows[3]["judges"]["pw"]["verdict"] is None
    assert {row["chosen"] for row in rows} == {"A", "B"}


# A/B order -------------------------------------------------------------------------------------


def test_ab_order_is_seeded_and_balanced_overall_and_per_subset():
    pairs = [_pair(i, subset=s) for i, s in enumerate("aaaaabbbbbbbccc")]
    flags = chosen_first_flags(pairs, seed=0)
    assert flags == chosen_first_flags(pairs, seed=0)
    assert any(chosen_first_flags(pairs, seed=s) != flags for s in range(1, 5))
    assert abs(sum(flags) - len(flags) / 2) <= 1
    for subset, n in Counter(p.subset for p in pairs).items():
        got = sum(f for f, p in zip(flags, pairs, strict=True) if p.subset == subset)
        assert got in (n // 2, (n + 1) // 2)
    even = [_pair(i) for i in range(10)]
    assert sum(chosen_first_flags(even, seed=42)) == 5


def test_items_put_the_chosen_text_where_the_label_says_and_hide_the_label():
    pairs = [_pair(i, chosen=f"good {i}", rejected=f"bad {i}") for i in range(6)]
    items = to_items(pairs, seed=1)
    for it in items:
        by_id = {c.id: c.text for c in it.record.candidates}
        assert [c.id for c in it.record.candidates] == [FIRST, SECOND]
        assert by_id[it.chosen_id] == it.pair.chosen and by_id[it.rejected_id] == it.pair.rejected
        dumped = it.record.model_dump_json()
        assert '"chosen"' not in dumped and "chosen_id" not in dumped
    assert {it.chosen_id for it in items} == {FIRST, SECOND}


def test_source_sets_listing_the_chosen_answer_first_are_shuffled():
    pairs, errors = load_pairs(FIXTURES / "hhh_alignment.jsonl")
    assert not errors and all(p.metadata["chosen_position"] == 1 for p in pairs)
    items = to_items(pairs, seed=0)
    assert sum(it.chosen_first for it in items) == len(items) // 2


# reading and validating -------------------------------------------------------------------------


def test_malformed_pair_rows_are_named_by_row_and_field(tmp_path):
    lines = [
        json.dumps({"id": "ok", "prompt": "q", "chosen": "a", "rejected": "b", "subset": "s"}),
        json.dumps({"id": "nochosen", "prompt": "q", "rejected": "b"}),
        json.dumps({"id": "norej", "prompt": "q", "chosen": "a", "rejected": None}),
        json.dumps({"id": "noprompt", "chosen": "a", "rejected": "b"}),
        "{broken",
        json.dumps({"id": "ok", "prompt": "q2", "chosen": "a", "rejected": "b"}),
        json.dumps({"id": "same", "prompt": "q", "chosen": "same", "rejected": "same"}),
        json.dumps({"id": "numchosen", "prompt": "q", "chosen": 3, "rejected": "b"}),
        json.dumps({"id": "badsub", "prompt": "q", "chosen": "a", "rejected": "b", "subset": [1]}),
        json.dumps({"id": "emptyprompt", "prompt": " ", "chosen": "a", "rejected": "b"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"id": "lastuser", "prompt": "q", "chosen": [{"role": "user", "content": "x"}]}),
        json.dumps({"id": "empty-ok", "prompt": "q", "chosen": "a", "rejected": ""}),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pairs, errors = load_pairs(path)
    assert [p.id for p in pairs] == ["ok", "empty-ok"]
    found = {(e.row, e.field): e.message for e in errors}
    assert found[(2, "chosen")] == "missing"
    assert found[(3, "rejected")] == "missing"
    assert found[(4, "prompt")] == "missing"
    assert "not valid JSON" in found[(5, "<line>")]
    assert "duplicate of row 1" in found[(6, "id")]
    assert "identical to 'chosen'" in found[(7, "rejected")]
    assert "got int" in found[(8, "chosen")]
    assert "expected a string" in found[(9, "subset")]
    assert found[(10, "prompt")] == "empty prompt"
    assert "got list" in found[(11, "<row>")]
    assert "assistant" in found[(12, "chosen")]  # read before the missing 'rejected'
    assert len(errors) == 11
    assert str(errors[0]) == "row 2, field 'chosen': missing"


def test_trl_conversational_rows_and_ids_from_content():
    convo = [{"role": "user", "content": "hi"}]
    rows = [
        (
            1,
            {
                "chosen": [*convo, {"role": "assistant", "content": "hello!"}],
                "rejected": [*convo, {"role": "assistant", "content": "go away"}],
            },
        ),
        (
            2,
            {
                "prompt": convo,
                "chosen": [{"role": "assistant", "content": "hey"}],
                "rejected": [{"role": "assistant", "content": "no"}],
            },
        ),
        (
            3,
            {
                "chosen": [*convo, {"role": "assistant", "content": "a"}],
                "rejected": [
                    {"role": "user", "content": "other"},
                    {"role": "assistant", "content": "b"},
                ],
            },
        ),
        (4, {"prompt": "hi", "chosen": "x", "rejected": "y"}),
        (5, {"prompt": "hi", "chosen": "x", "rejected": "y"}),
    ]
    pairs, errors = rows_to_pairs(rows)
    assert [p.prompt[0].content for p in pairs] == ["hi", "hi", "hi"]
    assert (pairs[0].chosen, pairs[0].rejected, pairs[0].subset) == ("hello!", "go away", "(none)")
    assert len(pairs[2].id) == 16
    found = {(e.row, e.field): e.message for e in errors}
    assert "differ" in found[(3, "prompt")]
    assert "duplicate of row 4" in found[(5, "<row>")]


def test_parquet_input_selection_and_output_names(tmp_path):
    rows = [
        {"id": f"q{i}", "prompt": f"p{i}", "chosen": "c", "rejected": "r", "subset": "ab"[i % 2]}
        for i in range(6)
    ]
    pl.DataFrame(rows).write_parquet(tmp_path / "set.parquet")
    pairs, errors = load_pairs(tmp_path / "set.parquet")
    assert not errors and len(pairs) == 6
    assert [p.id for p in select_pairs(pairs, subsets=["b"], limit=2)] == ["q1", "q3"]
    with pytest.raises(SourceError, match="the data has: 'a', 'b'"):
        select_pairs(pairs, subsets=["c"])
    with pytest.raises(SourceError, match="--data: no such file"):
        load_pairs(tmp_path / "missing.jsonl")
    assert data_stem("x/pandalm/pairs.jsonl") == "pandalm-pairs"
    assert data_stem("x/my_set.parquet") == "my_set"
    assert data_stem("allenai/reward-bench") == "allenai__reward-bench"


def test_fixture_slices_keep_their_provenance():
    readme = (FIXTURES / "README.md").read_text()
    for name in ("pandalm", "hhh_alignment", "evalbiasbench"):
        pairs, errors = load_pairs(FIXTURES / f"{name}.jsonl")
        assert pairs and not errors
        assert f"`{name}.jsonl`" in readme
    assert "3871806e72b4832f815ecafd24d3503c73403f48" in readme


def test_a_recipe_without_judges_is_refused(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    recipe["stages"] = [s for s in recipe["stages"] if s["type"] == "generate"]
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(
        app, ["eval-judges", str(path), "--data", str(FIXTURES / "pandalm.jsonl"), "--no-progress"]
    )
    assert result.exit_code == 1
    assert "no judge stage" in result.output


# the embedded model, end to end ------------------------------------------------------------------


def _quickstart_judge_recipe(tmp_path: Path) -> Path:
    """The quickstart recipe with a tiny judge budget (the score comes from the rating token)."""
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    for stage in recipe["stages"]:
        if stage["type"] == "rubric_judge":
            stage["max_tokens"] = 3
            stage["max_retries"] = 1
    recipe["output"]["dir"] = str(tmp_path / "run")
    recipe["settings"]["shard_size"] = 4
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
def test_eval_judges_end_to_end_on_the_embedded_model(tmp_path, embedded_dir):
    recipe = _quickstart_judge_recipe(tmp_path)
    data = FIXTURES / "evalbiasbench.jsonl"
    args = ["eval-judges", str(recipe), "--data", str(data), "--limit", "6", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "eval-judges" / "evalbiasbench"
    report = json.loads((out / "report.json").read_text())
    assert report["pairs"] == 6 and report["chosen_first"] == 3
    (judge,) = report["judges"]
    assert (judge["name"], judge["type"], judge["kind"]) == ("rating", "rubric_judge", "pointwise")
    o = judge["overall"]
    assert o["correct"] + o["wrong"] + o["ties"] + o["failures"] == 6
    assert report["baselines"][0]["overall"]["n"] == 6
    assert {a["a"] for a in report["agreement"]} >= {"rating"}
    (stage,) = report["run"]["stages"]
    assert stage["name"] == "rating" and stage["calls"] > 0
    assert stage["counters"]["judgments"] == 12  # 6 pairs x 2 responses, generate/pairs skipped
    md = (out / "report.md").read_text()
    assert "| rating | pointwise | 6 |" in md and "longer wins" in md
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == 6 and all(v["chosen"] in ("A", "B") for v in verdicts)
    assert "rating" in result.output and "longer wins" in result.output

    # a rerun is served from the checkpoints: no model call, same figures
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    report2 = json.loads((out / "report.json").read_text())
    (stage2,) = report2["run"]["stages"]
    assert stage2["calls"] == 0 and stage2["shards_resumed"] == 2
    assert report2["judges"] == report["judges"]

    # fewer pairs: new shards, but every request is answered by the request cache
    fewer = runner.invoke(app, [*args[:-3], "--limit", "5", "--no-progress"])
    assert fewer.exit_code == 0, fewer.output
    (stage3,) = json.loads((out / "report.json").read_text())["run"]["stages"]
    assert stage3["calls"] == 0 and stage3["cache_hits"] > 0
