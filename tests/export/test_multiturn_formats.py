"""Multi-turn records through every pair rule and every dataset format (issue 16), checked with TRL's
own dataset utilities (``trl.data_utils``) and the DPO and reward trainers' dataset preparation.

TRL's conversational form: the prompt is the whole conversation before the judged reply (system
prompt, earlier user and assistant turns, the user's final message), the completion (``chosen``,
``rejected``, ``completion``, each of ``completions``) the one assistant reply. The reward format's
implicit prompt is the same conversation, which ``maybe_extract_prompt`` recovers. Candidates branch
at the last turn, so every row of a record carries the same history.
"""

from __future__ import annotations

import asyncio

import pytest

from synthpref.executor import checkpoints as ck
from synthpref.export import export_all
from synthpref.records import Candidate, Judgment, Message, Record
from synthpref.stages.pairs import BuildPairs, PairsParams
from tests.export.test_formats import FORMATS, _load, _tiny

SYSTEM = "You are a friendly cooking assistant."
CONVERSATIONS = [
    ("I have eggs, flour and milk. What can I make?", "Pancakes or crepes would work well.",
     "How do I make the crepes thinner?"),
    ("Suggest a quick vegetarian dinner.", "Try a chickpea curry with rice.",
     "Can I make it without coconut milk?"),
    ("What goes well with salmon?", "Roast potatoes and green beans.",
     "And a sauce for it?"),
]  # fmt: skip
REPLIES = [
    ("Use a little more milk and swirl the pan quickly.", "Just cook them longer.", "Thinner."),
    ("Yes: use tomatoes and a spoon of yoghurt instead.", "No.", "Maybe with water."),
    ("A lemon and dill yoghurt sauce.", "Ketchup.", "Some sauce."),
]
SCORES = (5.0, 1.0, 3.0)


def history(k: int) -> list[dict]:
    u1, a1, u2 = CONVERSATIONS[k]
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": u1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": u2},
    ]


def judged_records() -> list[Record]:
    out = []
    for k in range(len(CONVERSATIONS)):
        r = Record(
            id=f"conv{k}",
            prompt=[Message(**m) for m in history(k)],
            candidates=[
                Candidate(id=f"conv{k}:c{i}", model=f"m{i}", text=t, finish_reason="stop")
                for i, t in enumerate(REPLIES[k])
            ],
        )
        for cand, score in zip(r.candidates, SCORES, strict=True):
            r.judgments.append(
                Judgment(judge="j", candidate_ids=[cand.id], score=score, scores={"help": score})
            )
        out.append(r)
    return out


def build(records: list[Record], rule: str) -> list[Record]:
    stage = BuildPairs("pairs", PairsParams(judge="j", rule=rule))
    stage.judge = "j"
    return asyncio.run(stage.process(records))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiturn")
    records = build(build(judged_records(), "best_worst"), "listwise")
    path = ck.shard_path(tmp / "ck", 0)
    ck.write_shard(path, records, {})
    return export_all(FORMATS, [path], tmp / "data")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from synthpref.backends.embedded import embedded_model_dir

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


def _args(config_cls, tmp_path):
    """As tests/export/test_formats.py, with room for a whole conversation (max_length 256)."""
    return config_cls(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=256,
        per_device_train_batch_size=2, dataset_num_proc=None,
    )  # fmt: skip


def record_index(row) -> int:
    return int(row["prompt_id"].removeprefix("conv"))


def assert_in_order(text: str, parts: list[str]) -> None:
    at = [text.index(p) for p in parts]
    assert at == sorted(at), (parts, text)


def test_every_format_carries_the_whole_conversation_as_prompt(exported, tokenizer):
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    for name in FORMATS:
        ds = _load(exported, name)
        assert len(ds) >= len(CONVERSATIONS), name
        for row in ds:
            k = record_index(row)
            assert is_conversational(row), name
            if name == "reward":  # implicit prompt: the conversation, then the reply
                for key in ("chosen", "rejected"):
                    assert row[key][:-1] == history(k), name
                    assert row[key][-1]["role"] == "assistant"
                continue
            assert row["prompt"] == history(k), name  # every earlier turn, in order
            replies = row.get("completions") or [
                row[key] for key in ("chosen", "rejected", "completion") if key in row
            ]
            for reply in replies:
                assert [m["role"] for m in reply] == ["assistant"]
                assert reply[0]["content"] in REPLIES[k]
                applied = maybe_apply_chat_template(
                    {"prompt": row["prompt"], "completion": reply}, tokenizer
                )
                # the rendered prompt holds every turn in order and asks for the assistant's reply
                assert_in_order(applied["prompt"], [m["content"] for m in history(k)])
                assert applied["prompt"].rstrip().endswith("assistant")
                assert applied["completion"].startswith(reply[0]["content"])


def test_rows_of_a_record_share_its_history(exported):
    for name in FORMATS:
        ds = _load(exported, name)
        by_record: dict[str, list] = {}
        for row in ds:
            prompt = row["prompt"] if "prompt" in row else row["chosen"][:-1]
            by_record.setdefault(row["prompt_id"], []).append(prompt)
            if name == "reward":
                assert row["rejected"][:-1] == prompt
        assert len(by_record) == len(CONVERSATIONS), name
        for prompts in by_record.values():
            assert all(p == prompts[0] for p in prompts), name
    pointwise = _load(exported, "pointwise")
    assert len(pointwise) == 3 * 3  # every candidate of every record, each with the same history


def test_reward_rows_give_the_conversation_back_to_trl_prompt_extraction(exported):
    from trl.data_utils import maybe_extract_prompt

    for row in _load(exported, "reward"):
        k = record_index(row)
        extracted = maybe_extract_prompt(dict(row))
        assert extracted["prompt"] == history(k)
        assert extracted["chosen"] == [{"role": "assistant", "content": REPLIES[k][0]}]
        assert extracted["rejected"] == [{"role": "assistant", "content": REPLIES[k][1]}]


def test_kto_rows_are_trl_unpairing_of_the_preference_rows(exported):
    from trl.data_utils import unpair_preference_dataset

    kto = _load(exported, "kto")
    unpaired = unpair_preference_dataset(_load(exported, "preference"))

    def key(r):
        return (r["prompt_id"], tuple(m["content"] for m in r["prompt"]),
                r["completion"][0]["content"], r["label"])  # fmt: skip

    assert sorted(map(key, kto)) == sorted(map(key, unpaired))


def test_listwise_ranks_the_replies_under_the_shared_conversation(exported):
    for row in _load(exported, "listwise"):
        k = record_index(row)
        assert row["scores"] == [5.0, 3.0, 1.0]
        assert [c[0]["content"] for c in row["completions"]] == [
            REPLIES[k][0], REPLIES[k][2], REPLIES[k][1]
        ]  # fmt: skip


@pytest.mark.parametrize("rule", ["best_worst", "best_random", "all_pairs"])
def test_every_pair_rule_emits_multi_turn_prompts(rule):
    from trl.data_utils import is_conversational

    from synthpref.export.preference import preference_rows

    records = build(judged_records(), rule)
    rows = [row for r in records for row in preference_rows(r)]
    assert len(rows) == (3 * 3 if rule == "all_pairs" else 3)
    for row in rows:
        k = record_index(row)
        assert is_conversational(row)
        assert row["prompt"] == history(k)
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
        assert {row["chosen"][0]["content"], row["rejected"][0]["content"]} <= set(REPLIES[k])


def test_multi_turn_preference_rows_pass_dpo_dataset_preparation(exported, tokenizer, tmp_path):
    """TRL tokenizes the whole conversation as the prompt: the prompt ids decode to every turn."""
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    ds = _load(exported, "preference")
    trainer = DPOTrainer(
        model=_tiny(LlamaForCausalLM, tokenizer), ref_model=_tiny(LlamaForCausalLM, tokenizer),
        args=_args(DPOConfig, tmp_path), train_dataset=ds,
        processing_class=tokenizer,
    )  # fmt: skip
    prepared = trainer.train_dataset
    assert len(prepared) == len(ds)
    for row, source in zip(prepared, ds, strict=True):
        text = tokenizer.decode(row["prompt_ids"])
        assert_in_order(text, [m["content"] for m in history(record_index(source))])
        assert tokenizer.decode(row["chosen_ids"]).startswith(source["chosen"][0]["content"])


def test_multi_turn_reward_rows_pass_reward_preparation(exported, tokenizer, tmp_path):
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    ds = _load(exported, "reward")
    trainer = RewardTrainer(
        model=_tiny(LlamaForSequenceClassification, tokenizer, num_labels=1),
        args=_args(RewardConfig, tmp_path), train_dataset=ds,
        processing_class=tokenizer,
    )  # fmt: skip
    prepared = trainer.train_dataset
    for row, source in zip(prepared, ds, strict=True):
        chosen = tokenizer.decode(row["chosen_ids"])
        assert_in_order(chosen, [m["content"] for m in source["chosen"]])
