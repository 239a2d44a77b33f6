"""Engine overhead: the same generation calls through `synthpref run` and through a plain loop.

Both sides use one TransformersBackend on the embedded model (weights loaded once, before timing),
the same prompts, sampling parameters and batch size. The synthpref side pays for everything the
engine adds: reading the source, sharding, the request cache, checkpoints, export. Target: <= 1.05.

    python benchmarks/overhead.py --prompts 16 --max-tokens 64 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each side")
    args = ap.parse_args()

    from synthpref.backends.embedded import embedded_model_dir
    from synthpref.backends.transformers_backend import TransformersBackend
    from synthpref.backends.types import GenerationRequest, SamplingParams
    from synthpref.executor.local import LocalExecutor
    from synthpref.recipes.loader import parse_recipe
    from synthpref.records import Message

    prompts = [
        json.loads(line)["prompt"] for line in (REPO / "recipes/data/quickstart.jsonl").open()
    ]
    prompts = [p for p in prompts if isinstance(p, str)]
    prompts = (prompts * (args.prompts // len(prompts) + 1))[: args.prompts]
    prompts = [f"{p} (variant {i})" for i, p in enumerate(prompts)]
    params = SamplingParams(n=1, temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, seed=0)

    backend = TransformersBackend(str(embedded_model_dir()), batch_size=args.batch_size)
    backend.model  # load weights before any timing  # noqa: B018

    def plain() -> float:
        requests = [
            GenerationRequest(messages=[Message(role="user", content=p)], params=params)
            for p in prompts
        ]
        t0 = time.perf_counter()
        asyncio.run(backend.generate(requests))
        return time.perf_counter() - t0

    def engine() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "prompts.jsonl"
            data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
            recipe = {
                "source": {"path": str(data)},
                "models": {"m": {"backend": "embedded", "batch_size": args.batch_size}},
                "stages": [
                    {
                        "type": "generate",
                        "models": ["m"],
                        "n": 1,
                        "temperature": 0.8,
                        "top_p": 0.95,
                        "max_tokens": args.max_tokens,
                        "seed": 0,
                    }
                ],
                "output": {"dir": str(Path(tmp) / "run"), "formats": []},
                "settings": {"shard_size": len(prompts)},
            }
            executor = LocalExecutor(parse_recipe(recipe), progress=False)
            t0 = time.perf_counter()
            executor.run()
            return time.perf_counter() - t0

    plain_times, engine_times = [], []
    for _ in range(args.repeats):
        plain_times.append(plain())
        engine_times.append(engine())
    p, e = min(plain_times), min(engine_times)
    print(f"prompts={len(prompts)} max_tokens={args.max_tokens} batch_size={args.batch_size}")
    print(
        f"plain loop over the backend : {p:8.2f} s  (runs: {', '.join(f'{t:.2f}' for t in plain_times)})"
    )
    print(
        f"synthpref run               : {e:8.2f} s  (runs: {', '.join(f'{t:.2f}' for t in engine_times)})"
    )
    print(f"ratio synthpref / plain     : {e / p:8.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
