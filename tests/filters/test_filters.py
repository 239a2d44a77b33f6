"""Curation filters: margin, consistency, length bias, dedup (across shards, under resume),
decontamination and reliability-aware filtering. Hand-built records; one end-to-end run on the
embedded model at the end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import polars as pl
import pytest

from synthpref.executor.local import RunError
from synthpref.filters.consistency import ConsistencyFilter, ConsistencyParams
from synthpref.filters.decontaminate import Decontaminate, DecontaminateParams
from synthpref.filters.dedup import Dedup, DedupParams
from synthpref.filters.length_bias import LengthBiasFilter, LengthBiasParams, length_stats
from synthpref.filters.margin import MarginFilter, MarginParams
from synthpref.filters.reliability import (
    ReliabilityFilter,
    ReliabilityParams,
    cross_validate,
    evaluate_policies,
    wilson_interval,
)
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import Message, Record
from synthpref.stages.base import Stage
from tests.curation_fixtures import FAKE, PROMPTS, pairwise_judgment, record, run_recipe


def run(stage: Stage, records: list[Record]) -> list[Record]:
    return asyncio.run(stage.process(records))


class _Named(Stage):
    """A stand-in for an earlier stage in check(previous)."""

    type_name = "stand_in"

    def __init__(self, name: str, kind: str, score_range=None, type_name: str = "stand_in"):
        super().__init__(name, None)
        self.kind = kind
        self.type_name = type_name
        if score_range:
            self.score_range = score_range

    async def process(self, records):
        return records


PREVIOUS = [
    _Named("gen", "generator"),
    _Named("rubric", "judge", (1.0, 5.0)),
    _Named("pw", "judge", (-1.0, 1.0)),
    _Named("pairs", "pairs"),
]


def make(cls, params_cls, previous=PREVIOUS, **params):
    stage = cls(cls.type_name, params_cls(**params))
    problems = stage.check(previous)
    assert problems == [], problems
    stage.bind(previous)
    return stage


# margin -----------------------------------------------------------------------------------------


def test_margin_filter_on_the_pairs_own_margin():
    records = [
        record("r1", scores={"rubric": {"a": 5, "b": 2}}, pairs=[("a", "b", "rubric")]),
        record("r2", scores={"rubric": {"a": 3.5, "b": 3}}, pairs=[("a", "b", "rubric")]),
        record("r3", scores={"rubric": {"a": 4, "b": 3}}, pairs=[("a", "b", "rubric")]),
    ]
    stage = make(MarginFilter, MarginParams, min_margin=1.0)
    out = run(stage, records)
    assert [len(r.pairs) for r in out] == [1, 0, 1]  # margin exactly 1.0 is kept
    assert stage.counters == {"pairs_in": 3, "kept": 2, "dropped:below_margin": 1}
    dropped = out[1].annotations["dropped_pairs"][0]
    assert dropped["stage"] == "margin_filter" and dropped["reason"] == "below_margin"
    assert len(out) == 3  # records stay


def test_margin_filter_per_judge_and_combined_with_normalisation():
    def rec(rid, rubric, pw_ab):
        r = record(rid, scores={"rubric": rubric}, pairs=[("a", "b", "rubric")])
        r.judgments.append(pairwise_judgment("pw", "a", "b", pw_ab, pw_ab))
        return r

    # rubric margins 3 (0.75 of 1-5) and 1 (0.25); pairwise margins 2*0.5=1.0 (0.5 of -1..1), -0.5
    records = [rec("both", {"a": 5, "b": 2}, 0.5), rec("split", {"a": 3, "b": 2}, -0.25)]
    each = make(MarginFilter, MarginParams, min_margin=0.5, judges=["rubric", "pw"], normalize=True)
    out = run(each, [r.model_copy(deep=True) for r in records])
    assert [len(r.pairs) for r in out] == [1, 0]
    assert each.counters["dropped:below_margin:rubric"] == 1

    mean = make(
        MarginFilter, MarginParams, min_margin=0.1, judges=["rubric", "pw"], combine="mean",
        normalize=True,
    )  # fmt: skip
    out = run(mean, [r.model_copy(deep=True) for r in records])
    # "split": (0.25 + (-0.5 / 2)) / 2 = 0 < 0.1
    assert [len(r.pairs) for r in out] == [1, 0]
    assert mean.counters["dropped:below_margin:mean"] == 1


def test_margin_filter_problems_are_reported_at_validation():
    stage = MarginFilter("m", MarginParams(min_margin=1, judges=["nope"], normalize=True))
    problems = stage.check([_Named("gen", "generator"), _Named("x", "judge")])
    assert any("put a 'pairs' stage before it" in p for p in problems)
    assert any("'nope' is not a judge stage" in p for p in problems)
    stage = MarginFilter("m", MarginParams(min_margin=1, judges=["x"], normalize=True))
    problems = stage.check([_Named("x", "judge"), _Named("p", "pairs")])
    assert problems == ["normalize: judge 'x' declares no score range to normalise by"]


# consistency ------------------------------------------------------------------------------------


def test_consistency_filter_counts_judges_that_agree():
    def rec(rid, second):
        return record(
            rid,
            scores={"rubric": {"a": 5, "b": 1}, "other": {"a": second[0], "b": second[1]}},
            pairs=[("a", "b", "rubric")],
        )

    previous = [_Named("rubric", "judge"), _Named("other", "judge"), _Named("p", "pairs")]
    records = [rec("agree", (4, 2)), rec("tie", (3, 3)), rec("disagree", (1, 5))]
    all_ = make(ConsistencyFilter, ConsistencyParams, previous)
    out = run(all_, [r.model_copy(deep=True) for r in records])
    assert [len(r.pairs) for r in out] == [1, 0, 0]
    assert all_.counters["dropped:judge_tie"] == 1
    assert all_.counters["dropped:judges_disagree"] == 1
    assert all_.counters["judge:other:agree"] == 1 and all_.counters["judge:rubric:agree"] == 3

    one = make(ConsistencyFilter, ConsistencyParams, previous, min_agree=1)
    out = run(one, [r.model_copy(deep=True) for r in records])
    assert [len(r.pairs) for r in out] == [1, 1, 1]


def test_consistency_filter_requires_both_orders_of_a_pairwise_judge():
    def rec(rid, ab, ba):
        r = record(rid, scores={"rubric": {"a": 5, "b": 1}}, pairs=[("a", "b", "rubric")])
        # stored as [b, a]: the preference must be read from the chosen candidate's side
        r.judgments.append(pairwise_judgment("pw", "b", "a", -ab, -ba))
        return r

    records = [rec("consistent", 1.0, 0.5), rec("flipped", 1.0, -0.5)]
    previous = [_Named("rubric", "judge"), _Named("pw", "judge"), _Named("p", "pairs")]
    strict = make(ConsistencyFilter, ConsistencyParams, previous, judges=["pw"])
    out = run(strict, [r.model_copy(deep=True) for r in records])
    assert [len(r.pairs) for r in out] == [1, 0]
    assert strict.counters["dropped:order_inconsistent"] == 1
    # without the order requirement, the mean preference (0.25 for a) counts as agreement
    loose = make(ConsistencyFilter, ConsistencyParams, previous, judges=["pw"], both_orders=False)
    out = run(loose, [r.model_copy(deep=True) for r in records])
    assert [len(r.pairs) for r in out] == [1, 1]


def test_consistency_filter_defaults_to_every_judge_but_juries():
    stage = ConsistencyFilter("c", ConsistencyParams())
    previous = [
        _Named("a", "judge"),
        _Named("b", "judge"),
        _Named("jury", "judge", type_name="jury"),
        _Named("p", "pairs"),
    ]
    assert stage.check(previous) == []
    stage.bind(previous)
    assert stage.judges == ["a", "b"]
    stage = ConsistencyFilter("c", ConsistencyParams(min_agree=3))
    assert "min_agree: 3 is more than the 2 judge(s)" in stage.check(previous)[0]


# length bias ------------------------------------------------------------------------------------


def _length_records():
    long = "word " * 30
    return [
        # 30 vs 10 words, narrow win: biased
        record("narrow", texts={"a": long, "b": "word " * 10},
               scores={"j": {"a": 3.5, "b": 3}}, pairs=[("a", "b", "j")]),
        # 30 vs 10 words but a clear win: kept
        record("clear", texts={"a": long, "b": "word " * 10},
               scores={"j": {"a": 5, "b": 1}}, pairs=[("a", "b", "j")]),
        # similar lengths: kept
        record("even", texts={"a": "word " * 11, "b": "word " * 10},
               scores={"j": {"a": 3.5, "b": 3}}, pairs=[("a", "b", "j")]),
    ]  # fmt: skip


def test_length_bias_guard_drops_long_narrow_wins_and_reports_lengths():
    stage = make(LengthBiasFilter, LengthBiasParams, max_ratio=2.0, margin_below=1.0)
    out = run(stage, _length_records())
    assert [len(r.pairs) for r in out] == [0, 1, 1]
    assert stage.counters["dropped:length_bias"] == 1
    stats = length_stats(stage.counters)
    assert stats["before"]["pairs"] == 3 and stats["after"]["pairs"] == 2
    assert stats["before"]["mean_chosen"] == pytest.approx((30 + 30 + 11) / 3)
    assert stats["after"]["mean_chosen"] == pytest.approx((30 + 11) / 2)
    assert stats["before"]["chosen_longer_share"] == 1.0
    assert stats["after"]["ratio_of_means"] < stats["before"]["ratio_of_means"]


def test_length_bias_guard_can_flag_instead_and_ignore_margins():
    stage = make(LengthBiasFilter, LengthBiasParams, max_ratio=2.0, action="flag")
    out = run(stage, _length_records())
    assert [len(r.pairs) for r in out] == [1, 1, 1]
    assert stage.counters["flagged:length_bias"] == 2  # any margin: "narrow" and "clear"
    flag = out[0].annotations["flags"][0]
    assert flag["flag"] == "length_bias" and flag["ratio"] == 3.0
    assert length_stats(stage.counters)["before"] == length_stats(stage.counters)["after"]


# dedup ------------------------------------------------------------------------------------------


def _prompt_records(texts: list[str]) -> list[Record]:
    return [
        Record(id=f"r{i}", prompt=[Message(role="user", content=t)], source_row=i + 1)
        for i, t in enumerate(texts)
    ]


NEAR = (
    "Write a short story about a robot who learns to paint landscapes in the mountains "
    "and becomes famous in the village"
)
TEXTS = [
    "What is the capital of France?",
    NEAR,
    "what is the capital of   FRANCE?",  # exact after case and whitespace normalisation
    NEAR.replace("short story", "short tale"),  # near duplicate
    "Explain how vaccines train the immune system.",
    "What is the capital of Spain?",  # similar but different: kept
]


def test_dedup_drops_exact_and_near_duplicates_keeping_the_first():
    records = _prompt_records(TEXTS)
    stage = Dedup("dedup", DedupParams(threshold=0.7))
    stage.prepare(records)
    out = run(stage, records[:3]) + run(stage, records[3:])
    assert [r.id for r in out] == ["r0", "r1", "r4", "r5"]
    assert stage.counters == {"kept": 4, "dropped:exact_duplicate": 1, "dropped:near_duplicate": 1}


def test_dedup_exact_only_and_flag_mode():
    records = _prompt_records(TEXTS)
    exact = Dedup("dedup", DedupParams(near=False))
    exact.prepare(records)
    assert [r.id for r in run(exact, records)] == ["r0", "r1", "r3", "r4", "r5"]
    flagging = Dedup("dedup", DedupParams(threshold=0.7, action="flag"))
    flagging.prepare(records)
    out = run(flagging, records)
    assert len(out) == 6
    flags = {r.id: r.annotations["flags"][0] for r in out if r.annotations.get("flags")}
    assert flags["r2"]["duplicate_of"] == "r0" and flags["r3"]["duplicate_of"] == "r1"
    assert flags["r3"]["flag"] == "near_duplicate"


# prompts that differ only in an operator or a symbol: different questions, never duplicates
DIFFERENT_BY_AN_OPERATOR = ["Is 5 > 3?", "Is 5 < 3?", "a + b", "a - b", "x = y", "x != y"]


def test_exact_dedup_keeps_prompts_that_differ_in_operators_or_punctuation():
    records = _prompt_records([*DIFFERENT_BY_AN_OPERATOR, "Hello, world.", "Hello world"])
    stage = Dedup("dedup", DedupParams(near=False))
    stage.prepare(records)
    assert len(run(stage, records)) == len(records)
    assert stage.counters == {"kept": len(records)}


def test_exact_dedup_normalises_case_whitespace_and_unicode_compatibility_forms():
    records = _prompt_records(
        [
            "Is 5 > 3?",
            "  IS 5\t>\n3?  ",  # case and whitespace
            "Ｉｓ ５ ＞ ３？",  # full-width forms: equal after NFKC
            "Is 5 &gt; 3?",  # a different text
        ]
    )
    stage = Dedup("dedup", DedupParams(near=False))
    stage.prepare(records)
    assert [r.id for r in run(stage, records)] == ["r0", "r3"]
    assert stage.counters["dropped:exact_duplicate"] == 2


def test_near_dedup_at_its_default_threshold_keeps_prompts_that_differ_in_an_operator():
    records = _prompt_records(
        [*DIFFERENT_BY_AN_OPERATOR, "What is 3 + 4?", "what is 3+4?", NEAR, NEAR + "!"]
    )
    stage = Dedup("dedup", DedupParams())
    stage.prepare(records)
    kept = [r.prompt[0].content for r in run(stage, records)]
    assert kept == [*DIFFERENT_BY_AN_OPERATOR, "What is 3 + 4?", NEAR]
    assert stage.counters["dropped:near_duplicate"] == 2  # spacing around '+', a trailing '!'


def test_near_dedup_finds_near_duplicates_just_above_the_threshold():
    """Pairs of 40-word prompts that differ in one middle word: Jaccard 35/41 = 0.85 >= 0.8. LSH is
    only the candidate search (every candidate is verified), so it must not miss a quarter of them."""
    import random

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    texts = []
    for _ in range(60):
        base = rng.sample(vocab, 40)
        changed = [*base[:20], "changed", *base[21:]]
        texts += [" ".join(base), " ".join(changed)]
    stage = Dedup("dedup", DedupParams())
    records = _prompt_records(texts)
    stage.prepare(records)
    run(stage, records)
    assert stage.counters["dropped:near_duplicate"] >= 55


class Interrupt(Stage):
    """Fails on a shard holding the record named in the flag file, while that file exists."""

    type_name = "interrupt"
    kind = "annotator"

    async def process(self, records):
        flag = Path(__file__).parent / ".interrupt-flag"
        if flag.exists() and any(r.id == flag.read_text().strip() for r in records):
            raise RuntimeError("simulated crash")
        for r in records:
            r.annotations["seen"] = True
        return records


def test_dedup_across_shards_is_exact_under_resume(tmp_path):
    """Duplicates of shard 0's prompts sit in shard 2. The first run crashes on shard 1, after shard 0
    finished and before dedup reached shard 2; the rerun resumes shards 0 and 1 from checkpoints (dedup
    never sees their prompts again) and must still drop the duplicates in shard 2, exactly as an
    uninterrupted run does."""
    prompts = [{"id": f"r{i}", "prompt": t} for i, t in enumerate(
        [TEXTS[0], NEAR, "Name three rivers in Africa.", "How do magnets work?",
         TEXTS[2], TEXTS[3], "Explain photosynthesis briefly."]
    )]  # fmt: skip
    stages = [{"type": "dedup", "threshold": 0.7}, {"type": "tests.filters.test_filters:Interrupt"}]
    flag = Path(__file__).parent / ".interrupt-flag"
    flag.write_text("r2")
    try:
        with pytest.raises(RunError, match="simulated crash"):
            run_recipe(tmp_path, prompts, stages, [])
    finally:
        flag.unlink()
    # the pipeline may have let dedup run ahead: forget what it did past shard 1
    for later in (tmp_path / "run" / "checkpoints").glob("00-dedup-*/shard-0000[2-9].parquet"):
        later.unlink()
    run_dir, result = run_recipe(tmp_path, prompts, stages, [])
    by_name = {s.name: s for s in result.stages}
    assert by_name["dedup"].shards_resumed == 2  # shards 0 and 1 counted from their checkpoints
    assert by_name["dedup"].counters["dropped:exact_duplicate"] == 1  # in shard 2
    assert by_name["dedup"].counters["dropped:near_duplicate"] == 1
    kept = pl.read_parquet(run_dir / "data" / "records.parquet")["id"].to_list()
    assert kept == ["r0", "r1", "r2", "r3", "r6"]
    # the dedup checkpoints together hold exactly one copy of each prompt, as an uninterrupted run
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    fresh_dir, _ = run_recipe(fresh, prompts, stages, [])
    assert pl.read_parquet(fresh_dir / "data" / "records.parquet")["id"].to_list() == kept


# decontamination --------------------------------------------------------------------------------

EVAL = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "What is the capital of Australia?",
]


def test_decontaminate_drops_prompts_overlapping_the_eval_set(tmp_path):
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in EVAL))
    records = _prompt_records(
        [
            # a paraphrase-free copy of an eval problem with a different ending: most 8-grams overlap
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
            "clips in May. How many clips did she sell?",
            "what is the capital of australia",  # short: exact match after normalisation
            "What is the capital of Australia and why was it chosen?",  # holds a short eval item
            "Describe the water cycle in three sentences for a science class.",
        ]
    )
    stage = Decontaminate(
        "decon", DecontaminateParams(eval_prompts=["eval.jsonl"], prompt_field="question")
    )
    recipe = parse_recipe(
        {"source": {"path": "x.jsonl"}, "stages": [{"type": "generate"}], "output": {"dir": "r"}},
        base_dir=tmp_path,
    ).recipe
    stage.prepare(records, recipe)
    out = run(stage, records)
    assert [r.id for r in out] == ["r3"]
    assert stage.counters == {"dropped:contaminated": 3, "kept": 1}
    assert stage.overlap(records[0].prompt[0].content) >= 0.5
    fp = stage.fingerprint()["eval_prompts"]
    (tmp_path / "eval.jsonl").write_text(
        json.dumps({"question": "Another test question here."}) + "\n"
    )
    stage.prepare(records, recipe)
    assert stage.fingerprint()["eval_prompts"] != fp  # an edited eval set re-runs the stage


def test_decontaminate_flags_and_reads_text_files(tmp_path):
    (tmp_path / "eval.txt").write_text("\n".join(EVAL) + "\n")
    stage = Decontaminate(
        "decon", DecontaminateParams(eval_prompts=[str(tmp_path / "eval.txt")], action="flag")
    )
    out = run(stage, _prompt_records(["What is the capital of Australia?", "Hello there friend"]))
    assert len(out) == 2
    assert out[0].annotations["flags"][0] == {
        "flag": "contaminated",
        "stage": "decon",
        "overlap": 1.0,
        "eval_item": 1,
        "eval_text": "What is the capital of Australia?",
    }
    assert "flags" not in out[1].annotations


GSM8K_LIKE = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
    "muffins for her friends every day with four. She sells the remainder at the farmers' market "
    "daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' "
    "market?"
)
INSTRUCTION = (
    "You are a careful and patient math tutor working with a student who is preparing for an "
    "important exam next week. Read the following word problem slowly, identify the quantities "
    "that matter, write out every intermediate step of your reasoning in full sentences, check "
    "the arithmetic twice, and finally give the answer as a single number on its own line. "
    "Problem:"
)
DECON_EVAL = [
    GSM8K_LIKE,
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Who wrote Hamlet?",
]


def _decontaminate(tmp_path, texts, **params):
    (tmp_path / "eval.txt").write_text("\n".join(DECON_EVAL) + "\n")
    stage = Decontaminate(
        "decon",
        DecontaminateParams(eval_prompts=[str(tmp_path / "eval.txt")], action="flag", **params),
    )
    out = run(stage, _prompt_records(texts))
    return stage, {r.id: r.annotations.get("flags", [None])[0] for r in out}


def test_decontaminate_finds_an_eval_item_pasted_after_a_long_instruction(tmp_path):
    assert len(INSTRUCTION.split()) >= 50
    prompt = INSTRUCTION + "\n\n" + GSM8K_LIKE
    stage, flags = _decontaminate(tmp_path, [prompt])
    # all of the eval item is inside the prompt, though it is under half of the prompt
    assert flags["r0"] == {
        "flag": "contaminated",
        "stage": "decon",
        "overlap": 1.0,
        "eval_item": 0,
        "eval_text": GSM8K_LIKE[:80] + "...",
    }
    assert stage.counters["flagged:contaminated"] == 1


def test_decontaminate_finds_short_eval_items_inside_prompts(tmp_path):
    _, flags = _decontaminate(
        tmp_path,
        [
            "Who wrote Hamlet? Answer in one word.",
            "Please tell me: who   WROTE hamlet",
            "Who wrote the play Hamlet, and when?",  # the item's words, not the item
        ],
    )
    assert flags["r0"]["eval_item"] == 2 and flags["r0"]["overlap"] == 1.0
    assert flags["r1"]["eval_item"] == 2
    assert flags["r2"] is None


def test_decontaminate_keeps_prompts_that_merely_share_common_words(tmp_path):
    prompts = [
        # many of the GSM8K item's words, in no long common sequence
        "My ducks lay eggs every day and I sell the eggs at the market for dollars. How much "
        "should I charge per egg so that I make money every day, given that I eat three each "
        "morning and bake muffins?",
        # a long instruction with ordinary words and one short shared phrase
        INSTRUCTION + " How much does a ticket to the farmers' market cost in dollars?",
        "She sold half as many clips as her friends did.",
    ]
    stage, flags = _decontaminate(tmp_path, prompts)
    assert flags == {"r0": None, "r1": None, "r2": None}
    assert stage.counters == {"kept": 3}
    for text in prompts:
        assert stage.overlap(text) < 0.5


def test_decontaminate_missing_eval_file_fails_before_any_shard(tmp_path):
    stages = [{"type": "decontaminate", "eval_prompts": ["missing.txt"]}]
    with pytest.raises(RunError, match=r"stage 'decontaminate'.*no such file .*missing.txt"):
        run_recipe(tmp_path, PROMPTS, stages, [])
    assert not (tmp_path / "run" / "checkpoints").exists()


# reliability ------------------------------------------------------------------------------------


def test_policy_selection_prefers_the_reliable_region():
    # the judge is right whenever its margin is >= 2 and a coin flip below
    gold = [(m, 3 + m / 2) for m in (3, 2.5, 2, 2, 3.5, 4)]
    gold += [(m, 3) for m in (0.5, -0.5, 1, -1, 0.5, -1.5, 1.5, -0.5)]
    best, results = evaluate_policies(gold, bands=0, min_keep=0.3)
    baseline = results[0]
    assert baseline.policy.kind == "all" and baseline.agreement == pytest.approx(10 / 14)
    assert best.policy.kind == "margin" and best.agreement == 1.0
    assert best.policy.low == pytest.approx(2.0)  # the lowest threshold reaching full agreement
    # a policy must keep enough gold pairs: with min_keep 0.9 only the baseline qualifies
    best, _ = evaluate_policies(gold, bands=0, min_keep=0.9)
    assert best.policy.kind == "all"


def test_policy_selection_with_score_bands():
    # reliable at high scores (PF-PPO's finding for reward models), noise at low ones
    gold = [(1.0, 4.5), (0.5, 4.8), (1.5, 4.2), (0.5, 4.6)]
    gold += [(-1.0, 1.5), (1.0, 1.8), (-0.5, 2.0), (0.5, 1.2), (-1.0, 2.2)]
    best, _ = evaluate_policies(gold, margins=[], bands=3, min_keep=0.3)
    assert best.policy.kind == "band" and best.agreement == 1.0
    assert best.policy.low >= 2.2 and best.kept == 4


def test_cross_validated_agreement_by_hand_on_five_gold_pairs():
    """Leave-one-out (5 pairs, 10 folds asked): policies 'all' and 'margin>=2' only.

    held out  training agreement: all | margin>=2   chosen      held-out pair
    +3        2/4 | 1/2 (tie: all keeps more) all   kept, agrees
    +2        2/4 | 1/2                      all    kept, agrees
    -1        3/4 | 2/3                      all    kept, disagrees
    +1        2/4 | 2/3                      margin not kept (|1| < 2)
    -2        3/4 | 2/2                      margin kept, disagrees
    Out of sample: 2 of 4 kept held-out pairs agree. In sample: margin>=2, 2 of 3.
    """
    gold = [(3.0, 4.0), (2.0, 4.0), (-1.0, 3.0), (1.0, 3.0), (-2.0, 4.0)]
    best, results = evaluate_policies(gold, margins=[2.0], bands=0, min_keep=0.3)
    assert best.policy.describe() == "margin>=2" and best.agreement == pytest.approx(2 / 3)
    assert results[0].agreement == pytest.approx(3 / 5)
    cv = cross_validate(gold, margins=[2.0], bands=0, min_keep=0.3, folds=10)
    assert (cv.folds, cv.kept, cv.agree, cv.total) == (5, 4, 2, 5)
    assert cv.agreement == 0.5
    lo, hi = cv.interval
    assert lo == pytest.approx(0.150, abs=5e-4) and hi == pytest.approx(0.850, abs=5e-4)


def test_wilson_interval_matches_the_formula():
    # 8 of 10: centre (0.8 + z^2/20) / (1 + z^2/10), half-width z sqrt(0.016 + z^2/400) / (1 + z^2/10)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(5, 5)
    assert hi == pytest.approx(1.0) and 0.5 < lo < 0.6


def test_out_of_sample_agreement_of_a_lucky_policy_is_near_chance():
    """With random gold labels every policy is a coin flip: the best of ~15 on the gold set looks
    better than chance in sample, and cross-validation sees through it."""
    import random

    in_sample, out_of_sample = [], []
    for seed in range(30):
        rng = random.Random(seed)
        gold = [
            (rng.choice((-1, 1)) * rng.uniform(0.1, 3.0), rng.uniform(1.0, 5.0)) for _ in range(40)
        ]
        best, results = evaluate_policies(gold)
        assert len(results) >= 12
        cv = cross_validate(gold)
        in_sample.append(best.agreement)
        out_of_sample.append(cv.agreement)
    mean_in = sum(in_sample) / len(in_sample)
    mean_out = sum(out_of_sample) / len(out_of_sample)
    assert mean_in > 0.58
    assert abs(mean_out - 0.5) < 0.06
    assert mean_in - mean_out > 0.1


class LengthScore(Stage):
    """A judge that scores responses by their word count (capped): right on big gaps only."""

    type_name = "length_score"
    kind = "judge"

    async def process(self, records):
        from synthpref.records import Judgment

        for r in records:
            for c in r.candidates:
                r.judgments.append(
                    Judgment(
                        judge=self.name, candidate_ids=[c.id], score=float(len(c.text.split()))
                    )
                )
        return records


def test_reliability_filter_replays_the_judge_on_gold_pairs(tmp_path):
    gold = []
    for i in range(6):  # big gaps: the longer answer really is better
        gold.append({"prompt": f"Q{i}", "chosen": "good " * 12, "rejected": "bad " * 3})
    for i in range(6):  # small gaps: humans preferred the shorter one
        gold.append({"prompt": f"S{i}", "chosen": "tight " * 4, "rejected": "loose " * 5})
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gold))
    judge = LengthScore("len", None)
    stage = ReliabilityFilter("rel", ReliabilityParams(gold="gold.jsonl", bands=0))
    previous = [_Named("gen", "generator"), judge, _Named("p", "pairs")]
    assert stage.check(previous) == []
    stage.bind(previous)
    recipe = parse_recipe(
        {"source": {"path": "x.jsonl"}, "stages": [{"type": "generate"}], "output": {"dir": "r"}},
        base_dir=tmp_path,
    ).recipe
    stage.prepare([], recipe)
    records = [
        record("big", scores={"len": {"a": 12, "b": 3}}, pairs=[("a", "b", "len")]),
        record("small", scores={"len": {"a": 5, "b": 4}}, pairs=[("a", "b", "len")]),
        record("other", scores={"x": {"a": 2, "b": 1}}, pairs=[("a", "b", "x")]),
    ]
    out = run(stage, records)
    assert stage.selected.policy.kind == "margin" and stage.selected.agreement == 1.0
    assert stage.baseline.agreement == pytest.approx(0.5)
    assert [len(r.pairs) for r in out] == [1, 0, 1]  # pairs of other judges are not its business
    assert stage.counters["dropped:unreliable_margin"] == 1
    key = next(k for k in stage.counters if k.startswith("selected:"))
    # big-gap pairs are kept and agree in every fold, small-gap ones dropped: 6 of 6 out of sample
    assert stage.cv.kept == 6 and stage.cv.agreement == 1.0 and stage.cv.folds == 10
    assert key == (
        "selected:margin>=9 out_of_sample_agreement=1.000 ci95=[0.610,1.000] held_out_kept=6/12 "
        "folds=10 in_sample_agreement=1.000 gold_kept=6/12 baseline_agreement=0.500"
    )
    assert stage.fingerprint()["gold"]


def test_reliability_report_leads_with_the_out_of_sample_agreement(tmp_path):
    from synthpref.report import build_report

    gold = [
        {"prompt": f"Q{i}", "chosen": "good " * (4 + i % 3), "rejected": "bad"} for i in range(8)
    ]
    gold += [{"prompt": f"S{i}", "chosen": "ok", "rejected": "meh " * 2} for i in range(4)]
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gold))
    stages = [
        {"type": FAKE + "FakeGenerate", "name": "gen", "n": 3},
        {"type": FAKE + "FakeJudge", "name": "len"},
        {"type": "pairs"},
        {"type": "reliability_filter", "gold": str(tmp_path / "gold.jsonl"), "folds": 4},
    ]
    run_dir, result = run_recipe(tmp_path, PROMPTS, stages, ["preference"])
    stage = next(s for s in result.stages if s.name == "reliability_filter")
    key = next(k for k in stage.counters if k.startswith("selected:"))
    assert "out_of_sample_agreement=" in key and "folds=4" in key
    md = build_report(run_dir).markdown.read_text()
    section = md[md.index("## Reliability filter `reliability_filter`") :]
    headline = section.split("\n")[2]
    assert headline.startswith("Selected policy **")
    assert "out-of-sample agreement with the gold labels" in headline
    assert "95% CI" in headline and "4-fold cross-validation" in headline
    assert "in-sample agreement" in section.lower() and "optimistic" in section


def test_reliability_filter_needs_a_readable_gold_file(tmp_path):
    stage = ReliabilityFilter("rel", ReliabilityParams(gold=str(tmp_path / "none.jsonl")))
    with pytest.raises(ValueError, match="gold: no such file"):
        stage.prepare([])


# validation of filters in recipes ---------------------------------------------------------------


def test_pair_filters_before_pairs_are_recipe_errors(tmp_path):
    raw = {
        "source": {"path": "p.jsonl"},
        "stages": [
            {"type": FAKE + "FakeGenerate"},
            {"type": FAKE + "FakeJudge", "name": "j"},
            {"type": "margin_filter", "min_margin": 1},
            {"type": "pairs"},
        ],
        "output": {"dir": "run"},
    }
    with pytest.raises(RecipeError, match=r"stages\[2\]: a pair filter needs pairs"):
        parse_recipe(raw, base_dir=tmp_path)


# end to end on the embedded model ---------------------------------------------------------------


@pytest.mark.slow
def test_curation_recipe_end_to_end_on_the_embedded_model(tmp_path):
    """dedup + decontaminate before generation, two judges, pairs, filters, four formats."""
    from typer.testing import CliRunner

    from synthpref.cli import app
    from tests.conftest import PROMPTS as TINY
    from tests.conftest import tiny_recipe, write_recipe

    prompts = [
        *TINY,
        {"id": "dup", "prompt": "what is  3 + 4?"},  # case and whitespace only
        {"id": "eval", "prompt": "Name a prime number."},
    ]
    (tmp_path / "eval.txt").write_text("Name a prime number.\n")
    recipe = tiny_recipe(tmp_path, prompts=prompts)
    recipe["stages"] = [
        {"type": "dedup"},
        {"type": "decontaminate", "eval_prompts": [str(tmp_path / "eval.txt")]},
        *recipe["stages"][:2],
        {"type": FAKE + "FakeJudge", "name": "length"},
        {"type": "pairs", "judge": "rating", "rule": "best_random"},
        {"type": "consistency_filter", "judges": ["rating", "length"], "min_agree": 1},
        {"type": "length_bias_filter", "max_ratio": 3.0, "action": "flag"},
        {"type": "margin_filter", "min_margin": 0.0},
    ]
    recipe["output"]["formats"] = ["preference", "kto", "reward", "pointwise"]
    path = write_recipe(tmp_path, recipe)
    result = CliRunner().invoke(app, ["run", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["dedup"]["counters"]["dropped:exact_duplicate"] == 1
    assert stages["decontaminate"]["counters"]["dropped:contaminated"] == 1
    assert stages["generate"]["records_in"] == len(TINY)
    pairs = stages["pairs"]["counters"].get("pairs", 0)
    assert stages["margin_filter"]["counters"].get("pairs_in", 0) <= pairs
    for fmt in ("preference", "kto", "reward", "pointwise"):
        assert (run_dir / "data" / f"{fmt}.parquet").is_file()
    assert pl.read_parquet(run_dir / "data" / "pointwise.parquet").height == 4 * len(TINY)
    report = CliRunner().invoke(app, ["report", str(run_dir)])
    assert report.exit_code == 0, report.output
    assert (run_dir / "report" / "report.md").read_text().count("## ") >= 5
