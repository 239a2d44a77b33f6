"""Dataset formats and pair rules: each format is loaded with ``datasets`` and checked with TRL's own
utilities (``trl.data_utils``) and trainers' dataset preparation (CPU, tiny random models with the
embedded model's tokenizer). Records are built by hand."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthpref.executor import checkpoints as ck
from synthpref.export import export_all
from synthpref.export.kto import kto_balance
from synthpref.export.needs import missing_data, recipe_problems
from synthpref.records import Judgment
from synthpref.stages.pairs import BuildPairs, PairsParams
from tests.curation_fixtures import FAKE, record

FORMATS = ["preference", "kto", "reward", "listwise", "pointwise"]


def _records():
    recs = []
    for i in range(4):
        r = record(
            f"p{i}",
            prompt=f"Question number {i}?",
            texts={"a": f"Best answer {i}.", "b": f"Middle answer {i}, a bit longer.", "c": "Bad."},
            scores={"j": {"a": 5.0, "b": 3.0 + 0.5 * (i % 2), "c": 1.0}},
            pairs=[("a", "c", "j")],
        )
        r.annotations["ranking"] = {"judge": "j", "candidate_ids": ["a", "b", "c"],
                                    "scores": [5.0, r.judgments[1].score, 1.0]}  # fmt: skip
        recs.append(r)
    recs[0].judgments.append(Judgment(judge="j", candidate_ids=["c"], status="failed", error="x"))
    return recs


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    shards = []
    records = _records()
    for k in range(2):  # two shards, as a run writes them
        path = ck.shard_path(tmp / "ck", k)
        ck.write_shard(path, records[2 * k : 2 * k + 2], {})
        shards.append(path)
    return export_all(FORMATS, shards, tmp / "data")


def _load(exported, name):
    import datasets

    return datasets.load_dataset("parquet", data_files=str(exported[name]), split="train")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from synthpref.backends.embedded import embedded_model_dir

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


def _tiny(cls, tokenizer, **extra):
    """A randomly initialised 1-layer Llama with the embedded tokenizer's vocabulary: TRL's dataset
    preparation needs a model object, not a good one."""
    import torch
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id, **extra,
    )  # fmt: skip
    return cls(config)


def _args(config_cls, tmp_path, **extra):
    return config_cls(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=64,
        per_device_train_batch_size=2, dataset_num_proc=None, **extra,
    )  # fmt: skip


def test_every_format_loads_with_datasets_and_is_conversational(exported, tokenizer):
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    for name in FORMATS:
        ds = _load(exported, name)
        assert len(ds) > 0, name
        row = ds[0]
        assert is_conversational(row), name
        if name == "listwise":
            for completion in row["completions"]:
                text = maybe_apply_chat_template(
                    {"prompt": row["prompt"], "completion": completion}, tokenizer
                )
                assert text["completion"].strip().startswith(completion[0]["content"])
        else:
            applied = maybe_apply_chat_template(dict(row), tokenizer)
            for key in ("prompt", "chosen", "rejected", "completion"):
                if key in applied:
                    assert isinstance(applied[key], str) and applied[key], (name, key)


def test_preference_format_passes_dpo_dataset_preparation(exported, tokenizer, tmp_path):
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    ds = _load(exported, "preference")
    assert ds.column_names[:4] == ["prompt_id", "prompt", "chosen", "rejected"]
    assert all(r["score_chosen"] - r["score_rejected"] == pytest.approx(r["margin"]) for r in ds)
    trainer = DPOTrainer(
        model=_tiny(LlamaForCausalLM, tokenizer), ref_model=_tiny(LlamaForCausalLM, tokenizer),
        args=_args(DPOConfig, tmp_path), train_dataset=ds, processing_class=tokenizer,
    )  # fmt: skip
    prepared = trainer.train_dataset
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(prepared.column_names)
    assert len(prepared) == len(ds) == 4


def test_kto_format_matches_trl_unpairing_and_passes_kto_preparation(exported, tokenizer, tmp_path):
    from transformers import LlamaForCausalLM
    from trl import KTOConfig, KTOTrainer
    from trl.data_utils import unpair_preference_dataset

    kto = _load(exported, "kto")
    assert kto.features["label"].dtype == "bool"
    # best-vs-worst pairs: our KTO rows are exactly TRL's own unpairing of the preference rows
    unpaired = unpair_preference_dataset(_load(exported, "preference"))
    ours = sorted((r["completion"][0]["content"], r["label"]) for r in kto)
    theirs = sorted((r["completion"][0]["content"], r["label"]) for r in unpaired)
    assert ours == theirs
    labels = kto["label"]
    assert kto_balance(sum(labels), len(labels) - sum(labels)) == {
        "desirable": 4, "undesirable": 4, "desirable_share": 0.5,
        "suggested_desirable_weight": 1.0, "suggested_undesirable_weight": 1.0,
    }  # fmt: skip
    trainer = KTOTrainer(
        model=_tiny(LlamaForCausalLM, tokenizer), ref_model=_tiny(LlamaForCausalLM, tokenizer),
        args=_args(KTOConfig, tmp_path), train_dataset=kto, processing_class=tokenizer,
    )  # fmt: skip
    assert {"prompt_ids", "completion_ids"} <= set(trainer.train_dataset.column_names)


def test_kto_balance_suggests_weights():
    assert kto_balance(10, 30)["suggested_desirable_weight"] == 3.0
    assert "suggested_desirable_weight" not in kto_balance(5, 0)


def test_reward_format_passes_reward_preparation_with_margin(exported, tokenizer, tmp_path):
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    ds = _load(exported, "reward")
    row = ds[0]
    assert [m["role"] for m in row["chosen"]] == ["user", "assistant"]  # implicit prompt
    assert row["chosen"][:-1] == row["rejected"][:-1]
    assert row["margin"] == pytest.approx(4.0)
    trainer = RewardTrainer(
        model=_tiny(LlamaForSequenceClassification, tokenizer, num_labels=1),
        args=_args(RewardConfig, tmp_path), train_dataset=ds, processing_class=tokenizer,
    )  # fmt: skip
    prepared = trainer.train_dataset
    assert {"chosen_ids", "rejected_ids", "margin"} <= set(prepared.column_names)
    batch = trainer.data_collator([prepared[0], prepared[1]])
    assert batch["margin"].tolist() == pytest.approx([4.0, 4.0])


def test_listwise_and_pointwise_content(exported):
    listwise = _load(exported, "listwise")
    row = listwise[1]
    assert row["scores"] == sorted(row["scores"], reverse=True) == [5.0, 3.5, 1.0]
    assert row["completions"][0][0]["content"] == "Best answer 1."
    assert row["models"] == ["model-a", "model-b", "model-c"]
    pointwise = _load(exported, "pointwise")
    assert len(pointwise) == 4 * 3  # a failed judgment beside an ok one does not add a row
    p0c = [r for r in pointwise if r["prompt_id"] == "p0" and r["candidate_id"] == "c"]
    assert [r["score"] for r in p0c] == [1.0]
    first = pointwise[0]
    assert first["judge"] == "j" and first["aspects"] == [{"name": "helpfulness", "score": 5.0}]


# what formats need ------------------------------------------------------------------------------


def _loaded(tmp_path, stages, formats):
    from synthpref.recipes.loader import parse_recipe

    raw = {
        "source": {"path": "p.jsonl"},
        "stages": stages,
        "output": {"dir": "run", "formats": formats},
    }
    return parse_recipe(raw, base_dir=tmp_path)


def test_formats_that_need_missing_data_are_recipe_errors(tmp_path):
    gen = {"type": FAKE + "FakeGenerate"}
    judge = {"type": FAKE + "FakeJudge", "name": "j"}
    loaded = _loaded(tmp_path, [gen], ["pointwise", "kto", "nope"])
    problems = recipe_problems(loaded.recipe.output.formats, loaded.stages)
    assert any("'pointwise' needs judge scores" in p for p in problems)
    assert any("'kto' needs preference pairs" in p for p in problems)
    assert any("unknown format 'nope'" in p for p in problems)
    loaded = _loaded(tmp_path, [gen, judge, {"type": "pairs"}], ["listwise", "pointwise"])
    problems = recipe_problems(loaded.recipe.output.formats, loaded.stages)
    assert problems == [
        "output.formats: format 'listwise' needs per-prompt rankings: add a 'pairs' stage with "
        "'rule: listwise' after a judge"
    ]
    loaded = _loaded(tmp_path, [gen, judge, {"type": "pairs", "rule": "listwise"}], ["listwise"])
    assert recipe_problems(loaded.recipe.output.formats, loaded.stages) == []


def test_cli_validate_reports_a_format_without_scores(tmp_path):
    from synthpref.cli import app

    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "source: {path: p.jsonl}\nstages:\n  - type: tests.curation_fixtures:FakeGenerate\n"
        "output: {dir: run, formats: [pointwise]}\n"
    )
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2
    assert "format 'pointwise' needs judge scores" in result.output


def test_missing_data_is_read_from_records():
    scored = record("s", scores={"j": {"a": 1, "b": 2}})
    assert missing_data(["pointwise", "preference"], [scored]) == {
        "preference": "format 'preference' needs preference pairs, which the run did not produce "
        "(to get them, add a 'pairs' stage (rule: best_worst, best_random or all_pairs) after a judge)"
    }
    assert missing_data(["pointwise"], [record("bare")]).keys() == {"pointwise"}


# pair rules -------------------------------------------------------------------------------------


def _builder(rule, **params):
    stage = BuildPairs("pairs", PairsParams(judge="j", rule=rule, **params))
    stage.judge = "j"
    return stage


def _build(stage, records):
    return asyncio.run(stage.process(records))


FOUR = {"a": "Alpha.", "b": "Beta.", "c": "Gamma.", "d": "Delta."}


def test_best_random_is_the_ultrafeedback_binarized_rule():
    scores = {"a": 5.0, "b": 3.0, "c": 2.0, "d": 1.0}
    picks = set()
    for i in range(40):
        r = _build(_builder("best_random"), [record(f"r{i}", texts=FOUR, scores={"j": scores})])[0]
        (pair,) = r.pairs
        assert pair.chosen_id == "a" and pair.rejected_id in "bcd" and pair.rule == "best_random"
        picks.add(pair.rejected_id)
    assert picks == {"b", "c", "d"}  # a random other, not always the worst
    # seeded per prompt: the same record gives the same pair, whatever else is in the shard
    one = _build(_builder("best_random", seed=7), [record("r5", texts=FOUR, scores={"j": scores})])
    again = _build(
        _builder("best_random", seed=7),
        [
            record("zz", texts=FOUR, scores={"j": scores}),
            record("r5", texts=FOUR, scores={"j": scores}),
        ],
    )
    assert one[0].pairs == again[1].pairs


def test_best_random_skips_ties_identical_texts_and_small_margins():
    stage = _builder("best_random", min_margin=1.5)
    records = [
        record("tied", texts=FOUR, scores={"j": {"a": 3, "b": 3, "c": 3}}),
        record("same", texts={"a": "Same.", "b": " Same. "}, scores={"j": {"a": 4, "b": 1}}),
        record("close", texts=FOUR, scores={"j": {"a": 4, "b": 3}}),
        record("top_tie", texts=FOUR, scores={"j": {"a": 4, "b": 4, "c": 1}}),
    ]
    out = _build(stage, records)
    assert [len(r.pairs) for r in out] == [0, 0, 0, 1]
    assert out[3].pairs[0].rejected_id == "c"  # a co-winner is never the rejected response
    assert stage.counters == {
        "skipped_all_tied": 1, "skipped_identical_texts": 1, "skipped_below_margin": 1, "pairs": 1
    }  # fmt: skip


def test_all_pairs_above_a_margin():
    stage = _builder("all_pairs", min_margin=1.0)
    scores = {"a": 5.0, "b": 4.5, "c": 3.0, "d": 1.0}
    (r,) = _build(stage, [record("r", texts=FOUR, scores={"j": scores})])
    got = {(p.chosen_id, p.rejected_id) for p in r.pairs}
    assert got == {("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")}
    assert all(p.margin >= 1.0 for p in r.pairs)
    assert stage.counters["pair_rows"] == 5


def test_listwise_ranking_keeps_other_pairs():
    scores = {"a": 2.0, "b": 5.0, "c": 3.0}
    r = record("r", texts={"a": "One.", "b": "Two.", "c": "Two."}, scores={"j": scores},
               pairs=[("b", "a", "j")])  # fmt: skip
    (out,) = _build(_builder("listwise"), [r])
    assert out.annotations["ranking"] == {
        "judge": "j",
        "candidate_ids": ["b", "a"],
        "scores": [5.0, 2.0],
    }
    assert len(out.pairs) == 1  # the best_worst pairs of an earlier stage survive


def test_listwise_format_is_empty_without_rankings(tmp_path):
    r = record("r", scores={"j": {"a": 1, "b": 2}})
    path = ck.shard_path(tmp_path, 0)
    ck.write_shard(path, [r], {})
    out = export_all(["listwise"], [path], tmp_path / "data")
    import pyarrow.parquet as pq

    assert pq.read_table(out["listwise"]).num_rows == 0
    assert Path(out["records"]).is_file()
