"""synthpref vs distilabel 1.5.3 on their transformers paths: N prompts x 2 candidates + one rating
judge, in-process on CPU.

What this measures: each tool's *local transformers* path. synthpref batches (continuous batching,
``decode_loop.py``); distilabel's TransformersLLM sends its prompts through a transformers pipeline one
at a time. The judge prompts differ too (distilabel's UltraFeedback template rates both candidates in
one long call; synthpref's rubric frame rates each candidate): the prompt tokens each side ran are
printed so that difference is visible. For the same work on one server, see vs_peers_server.py.

The job, on both sides, with the same model files (the safetensors copy of the embedded
SmolLM2-135M-Instruct), float32 on CPU, the same prompts and the same sampling settings:

- synthpref: a recipe written to a temp dir; `transformers` backend on the model directory;
  `generate` (n=2, temperature, top_p=1, max_tokens) -> `rubric_judge` (UltraFeedback-style
  helpfulness rating, greedy, `judge_max_tokens` per candidate).
- distilabel: a Pipeline LoadDataFromDicts -> TextGeneration(num_generations=2) ->
  UltraFeedback(aspect="helpfulness"), both tasks on TransformersLLM (do_sample for generation with
  the same temperature/top_p/top_k=0 and repetition_penalty=1.0; greedy for the judge). UltraFeedback
  rates all of a prompt's candidates in one call, so its call gets 2 x judge_max_tokens: both sides
  may spend the same judge tokens per candidate.

Each side runs in a fresh subprocess (model load, pipeline start-up included), best of --repeats. Both
the whole-process wall time and the time of the run call alone are printed, with the tokens each side
generated (generation and judge separately) so the comparison can be checked for equal work.

distilabel lives in its own venv so that it does not disturb synthpref's dependencies:

    python3 -m venv /work/venv-distilabel
    /work/venv-distilabel/bin/pip install torch==2.13.0          # the CPU wheel; never unpinned
    /work/venv-distilabel/bin/pip install distilabel==1.5.3 requests accelerate transformers gguf

then (target: synthpref >= 4x faster):

    SYNTHPREF_CACHE=/tmp/spc python benchmarks/vs_distilabel.py \\
        --distilabel-python /work/venv-distilabel/bin/python --prompts 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _shared import child_job, run_job

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def load_prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in (REPO / "recipes/data/quickstart.jsonl").open()]
    prompts = [r["prompt"] for r in rows if isinstance(r.get("prompt"), str)]
    if n > len(prompts):
        prompts = [f"{p} (variant {i})" for i, p in enumerate(prompts * (n // len(prompts) + 1))]
    return prompts[:n]


def synthpref_job(cfg: dict, out_path: str) -> None:
    """The synthpref side, in its own process (called through --_synthpref-job)."""
    t_import = time.perf_counter()
    from synthpref.executor.local import LocalExecutor
    from synthpref.recipes.loader import parse_recipe

    import_s = time.perf_counter() - t_import
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in cfg["prompts"]))
        recipe = {
            "source": {"path": str(data)},
            "models": {
                "m": {
                    "backend": "transformers",
                    "model": cfg["model"],
                    "dtype": "float32",
                    "device": "cpu",
                    "batch_size": cfg["batch_size"],
                }
            },
            "stages": [
                {
                    "type": "generate",
                    "models": ["m"],
                    "n": cfg["n"],
                    "temperature": cfg["temperature"],
                    "top_p": cfg["top_p"],
                    "max_tokens": cfg["max_tokens"],
                    "seed": 0,
                },
                {
                    "type": "rubric_judge",
                    "name": "rating",
                    "model": "m",
                    "aspects": ["helpfulness"],
                    "max_tokens": cfg["judge_max_tokens"],
                },
            ],
            "output": {"dir": str(Path(tmp) / "run"), "formats": []},
            "settings": {"shard_size": cfg["shard_size"]},
        }
        executor = LocalExecutor(parse_recipe(recipe), progress=False)
        t0 = time.perf_counter()
        result = executor.run()
        run_s = time.perf_counter() - t0
        stages = {s.name: s for s in result.stages}
        gen, judge = stages["generate"], stages["rating"]
        out = {
            "run_s": run_s,
            "import_s": import_s,
            "rows": gen.records_out,
            "generations": gen.counters.get("candidates", 0),
            "ratings_parsed": judge.counters.get("judgments", 0) - judge.counters.get("failed", 0),
            "generation_tokens": gen.tokens,
            "judge_tokens": judge.tokens,
            # prompt tokens once per request (a request for n samples counts its prompt once)
            "generation_prompt_tokens": int(
                sum(m.get("input_tokens", 0) for m in gen.models.values())
            ),
            "judge_prompt_tokens": int(
                sum(m.get("input_tokens", 0) for m in judge.models.values())
            ),
            "judge_calls": judge.calls,
            "generate_stage_s": gen.seconds,
            "judge_stage_s": judge.seconds,
        }
    Path(out_path).write_text(json.dumps(out))


def main() -> None:
    if child_job("--_synthpref-job", synthpref_job):
        return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--distilabel-python", required=True, help="python of distilabel's venv")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=2, help="candidates per prompt")
    ap.add_argument("--max-tokens", type=int, default=128, help="per candidate")
    ap.add_argument("--judge-max-tokens", type=int, default=48, help="per candidate rating")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--batch-size", type=int, default=32, help="synthpref's transformers batch")
    ap.add_argument("--repeats", type=int, default=1, help="best of N for each side")
    ap.add_argument("--threads", type=int, default=None, help="OMP threads per process")
    args = ap.parse_args()

    from synthpref.backends.embedded import embedded_model_dir

    model = str(embedded_model_dir())
    prompts = load_prompts(args.prompts)
    common = {
        "model": model,
        "prompts": prompts,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": 1.0,
    }
    sp_cfg = {
        **common,
        "judge_max_tokens": args.judge_max_tokens,
        "batch_size": args.batch_size,
        "shard_size": len(prompts),
    }
    # UltraFeedback rates all n candidates of a prompt in one reply: the same budget per candidate
    dl_cfg = {**common, "judge_max_tokens": args.judge_max_tokens * args.n}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    sp_runs, dl_runs = [], []
    for _ in range(args.repeats):
        sp_runs.append(run_job([sys.executable, __file__, "--_synthpref-job"], sp_cfg, env))
        dl_runs.append(
            run_job([args.distilabel_python, str(HERE / "_distilabel_job.py")], dl_cfg, env)
        )
    sp = min(sp_runs, key=lambda r: r["wall_s"])
    dl = min(dl_runs, key=lambda r: r["wall_s"])

    print(
        f"prompts={len(prompts)} candidates/prompt={args.n} max_tokens={args.max_tokens} "
        f"judge_max_tokens/candidate={args.judge_max_tokens} temperature={args.temperature} "
        f"top_p=1.0 model={Path(model).name} device=cpu float32"
    )
    print(f"{'':28}{'synthpref':>12}{'distilabel':>12}")

    def row(label: str, key: str, fmt: str = "{:12.2f}") -> None:
        print(f"{label:28}" + fmt.format(sp[key]) + fmt.format(dl[key]))

    row("process wall time (s)", "wall_s")
    row("run call (s)", "run_s")
    row("imports (s)", "import_s")
    row("candidates generated", "generations", "{:12d}")
    row("ratings parsed", "ratings_parsed", "{:12d}")
    row("generation prompt tokens", "generation_prompt_tokens", "{:12d}")
    row("generation tokens", "generation_tokens", "{:12d}")
    row("judge prompt tokens", "judge_prompt_tokens", "{:12d}")
    row("judge tokens", "judge_tokens", "{:12d}")
    for name, runs in (("synthpref", sp_runs), ("distilabel", dl_runs)):
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in runs)
        print(f"  {name} runs (wall s): {walls}")

    def gen_tps(r: dict) -> float:
        return (r["generation_tokens"] + r["judge_tokens"]) / r["run_s"]

    print(
        f"synthpref stages            : generate {sp['generate_stage_s']:.2f} s, "
        f"rating judge {sp['judge_stage_s']:.2f} s ({sp['judge_calls']} calls)"
    )
    print(
        f"tokens/s over the run call  : synthpref {gen_tps(sp):.1f}, distilabel {gen_tps(dl):.1f}"
    )
    print(f"speed-up (process wall)     : {dl['wall_s'] / sp['wall_s']:6.2f}x  (target >= 4)")
    print(f"speed-up (run call)         : {dl['run_s'] / sp['run_s']:6.2f}x")


if __name__ == "__main__":
    main()
