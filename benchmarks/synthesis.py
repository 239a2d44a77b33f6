"""Prompt synthesis throughput: prompts per second from the ``magpie`` and ``evol_instruct`` stages,
run as a recipe, vs the raw backend making the very same calls; and the distinct-prompt rate after
``dedup``.

Equal work by construction: the stage side runs the recipe (source, the synthesis stage, dedup) on
the embedded model through ``synthpref.run`` in a fresh run directory (no cache to reuse), and
records every batch of requests the stage handed the backend, in order. The raw side, in another
fresh process, builds the same backend and sends exactly those batches (``complete`` for Magpie,
``generate`` for Evol-Instruct) with nothing around them: no records, templates, checkpoints or
cache. Both sides print prompt and generated tokens (equal when the work is: seeded sampling gives
the same text), wall time and prompts/s; the stage side counts the prompts it kept. Each
measurement runs in its own process, one after the other, after one untimed warm-up call on a
single request (model load and first-call costs out of both sides). Target: stage >= 0.9x raw.

    python benchmarks/synthesis.py                  # Magpie 48 seeds, Evol-Instruct 20 prompts, 1 round
    python benchmarks/synthesis.py --seeds 96 --evol-prompts 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from _shared import child_job, run_job

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def recipe(kind: str, tmp: Path, cfg: dict) -> dict:
    if kind == "magpie":
        source = {"seeds": cfg["seeds"]}
        stage = {"type": "magpie", "model": "m", "n": 1, "max_tokens": cfg["max_tokens"]}
    else:
        source = {
            "path": str(REPO / "recipes/data/quickstart.jsonl"),
            "id_field": "id",
            "limit": cfg["evol_prompts"],
        }
        stage = {
            "type": "evol_instruct",
            "model": "m",
            "rounds": 1,
            "max_tokens": cfg["max_tokens"],
            "keep": "final",
        }
    return {
        "name": f"bench-{kind}",
        "source": source,
        "models": {"m": {"backend": "embedded", "batch_size": cfg["batch_size"]}},
        "stages": [stage, {"type": "dedup"}],
        "output": {"dir": str(tmp / "run"), "formats": []},
        "settings": {"shard_size": 1024},
    }


def _tokens(results) -> tuple[int, int]:
    prompt = sum(r.prompt_tokens for r in results)
    generated = sum(c.completion_tokens for r in results for c in r.completions)
    return prompt, generated


def stage_job(cfg: dict, out: str) -> None:
    """The recipe through synthpref.run, recording the request batches the backend receives."""
    import synthpref
    from synthpref.backends.transformers_backend import TransformersBackend
    from synthpref.backends.types import CompletionRequest, GenerationRequest, SamplingParams
    from synthpref.records import Message

    method = "complete" if cfg["kind"] == "magpie" else "generate"
    original = getattr(TransformersBackend, method)
    batches: list[list[dict]] = []
    results_seen: list = []

    backend_seconds = []

    async def recording(self, requests, on_result=None):
        batches.append([r.model_dump() for r in requests])
        t = time.perf_counter()
        results = await original(self, requests, on_result)
        backend_seconds.append(time.perf_counter() - t)
        results_seen.extend(results)
        return results

    # warm-up: load the model and run one small call outside the timing
    from synthpref.backends.builtin import EmbeddedSpec

    warm = EmbeddedSpec(batch_size=cfg["batch_size"]).build()
    params = SamplingParams(max_tokens=8)
    if method == "complete":
        asyncio.run(warm.complete([CompletionRequest(prompt="<|im_start|>user\n", params=params)]))
    else:
        messages = [Message(role="user", content="Hi")]
        asyncio.run(warm.generate([GenerationRequest(messages=messages, params=params)]))
    setattr(TransformersBackend, method, recording)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = synthpref.run(recipe(cfg["kind"], Path(tmp), cfg), progress=False)
        seconds = time.perf_counter() - t0
        stages = {s.name: s for s in result.stages}
    synth = stages[cfg["kind"]]
    dedup = stages["dedup"]
    prompt, generated = _tokens(results_seen)
    Path(cfg["batches"]).write_text(json.dumps(batches))
    Path(out).write_text(
        json.dumps(
            {
                "seconds": seconds,
                "backend_seconds": sum(backend_seconds),
                "requests": sum(len(b) for b in batches),
                "batches": len(batches),
                "prompt_tokens": prompt,
                "generated_tokens": generated,
                "prompts": synth.records_out,
                "counters": dict(synth.counters),
                "after_dedup": dedup.records_out,
            }
        )
    )


def raw_job(cfg: dict, out: str) -> None:
    """The same request batches straight to a fresh embedded backend."""
    from synthpref.backends.builtin import EmbeddedSpec
    from synthpref.backends.types import CompletionRequest, GenerationRequest, SamplingParams
    from synthpref.records import Message

    backend = EmbeddedSpec(batch_size=cfg["batch_size"]).build()
    batches = json.loads(Path(cfg["batches"]).read_text())
    params = SamplingParams(max_tokens=8)
    if cfg["kind"] == "magpie":
        kind, call = CompletionRequest, backend.complete
        asyncio.run(call([CompletionRequest(prompt="<|im_start|>user\n", params=params)]))
    else:
        kind, call = GenerationRequest, backend.generate
        messages = [Message(role="user", content="Hi")]
        asyncio.run(call([GenerationRequest(messages=messages, params=params)]))
    requests = [[kind.model_validate(r) for r in batch] for batch in batches]
    results = []
    t0 = time.perf_counter()
    for batch in requests:
        results.extend(asyncio.run(call(batch)))
    seconds = time.perf_counter() - t0
    prompt, generated = _tokens(results)
    Path(out).write_text(
        json.dumps(
            {
                "seconds": seconds,
                "requests": sum(len(b) for b in requests),
                "prompt_tokens": prompt,
                "generated_tokens": generated,
            }
        )
    )


def main() -> None:
    if child_job("--stage", stage_job) or child_job("--raw", raw_job):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=48, help="Magpie: seed records")
    ap.add_argument("--evol-prompts", type=int, default=20, help="Evol-Instruct: input prompts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    env = {**__import__("os").environ, "TOKENIZERS_PARALLELISM": "false"}
    me = [sys.executable, __file__]
    for kind in ("magpie", "evol_instruct"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = {
                "kind": kind,
                "seeds": args.seeds,
                "evol_prompts": args.evol_prompts,
                "max_tokens": args.max_tokens,
                "batch_size": args.batch_size,
                "batches": str(Path(tmp) / "batches.json"),
            }
            stage = run_job([*me, "--stage"], cfg, env, f"{kind} stage")
            raw = run_job([*me, "--raw"], cfg, env, f"{kind} raw backend")
        same = (stage["prompt_tokens"], stage["generated_tokens"]) == (
            raw["prompt_tokens"],
            raw["generated_tokens"],
        )
        print(
            f"{kind}: {stage['requests']} requests in {stage['batches']} batches; tokens prompt/"
            f"generated: stage {stage['prompt_tokens']}/{stage['generated_tokens']}, raw "
            f"{raw['prompt_tokens']}/{raw['generated_tokens']} ({'equal' if same else 'DIFFER'})"
        )
        stage_rate = stage["prompts"] / stage["seconds"]
        raw_rate = stage["prompts"] / raw["seconds"]
        print(
            f"  stage {stage['seconds']:.1f}s (of which in the backend "
            f"{stage['backend_seconds']:.1f}s), {stage['prompts']} prompts kept "
            f"({stage_rate:.2f}/s); raw backend {raw['seconds']:.1f}s for the same calls "
            f"({raw_rate:.2f}/s): {stage_rate / raw_rate:.2f}x (target >= 0.9)"
        )
        distinct = stage["after_dedup"] / stage["prompts"] if stage["prompts"] else 0.0
        print(
            f"  distinct after dedup: {stage['after_dedup']} of {stage['prompts']} "
            f"({distinct:.0%}); stage counters {stage['counters']}"
        )


if __name__ == "__main__":
    main()
