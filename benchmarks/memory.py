"""Peak memory of a run against the number of prompts: it should stay flat.

The executor streams shards through the stages and export reads the final checkpoints one shard at a
time, so what a run holds at once is one shard per stage (plus the input prompts themselves), not
every record. This runs the same cheap recipe (embedded model, `generate` with a few tokens per
prompt, a large shard, records export) on synthetic prompts at each size, each size in a fresh
subprocess, and prints that process's peak RSS (ru_maxrss), its RSS once the model is loaded, and
the growth between the two, and the highest RSS in each tenth of the run (flat over time if nothing
builds up); then the ratios against the smallest size. Target: peak RSS at 10,000
prompts within ~10% of that at 1,000.

    SYNTHPREF_CACHE=/tmp/spc python benchmarks/memory.py --sizes 1000 10000

``--source-rows N ...`` measures the source-size axis instead: how the size of the *input* moves
peak RSS when the source is streamed (``sources.py``, ``executor/common.py``). Each size gets a
JSONL of N rows and a whole run over every row through a prompt filter that needs no model
(``decontaminate`` against three evaluation prompts: it reads every prompt and keeps nothing per
prompt), so the source is read end to end twice (planning, then the shards) and checkpointed shard
by shard. A warm-up run on two shards comes before the baseline, so imports, one-time allocations
and a shard in flight are not counted as growth. What still grows with N, by design, is the
planning read's duplicate-id index (about 25 bytes per row) and a 16-byte digest per shard. Target:
peak RSS up to the export at the largest size within 10% of that at the smallest. The whole run's
peak is printed too: the export of ``records.parquet`` writes a row group per shard and pyarrow
holds every row group's metadata until the file closes, so it grows with the number of shards.

    python benchmarks/memory.py --source-rows 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from _shared import child_job, run_job

WORDS = (
    "river lantern copper meadow signal harbor violet engine orchard pebble summit canvas "
    "thunder marble falcon velvet glacier compass ember willow"
).split()


def synthetic_prompt(i: int) -> str:
    words = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(12))
    return f"Prompt {i}: reply with one word that fits these: {words}."


def synthetic_prompts(n: int) -> list[str]:
    return [synthetic_prompt(i) for i in range(n)]


def rss_now_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def job(cfg: dict, out_path: str) -> None:
    """One size, in its own process (called through --_job)."""
    from synthpref.backends.embedded import embedded_model_dir
    from synthpref.backends.transformers_backend import load_model
    from synthpref.executor.local import LocalExecutor
    from synthpref.recipes.loader import parse_recipe

    load_model(str(embedded_model_dir()), "cpu", "float32", False)  # weights before the baseline
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.jsonl"
        with data.open("w") as fh:
            for k, p in enumerate(synthetic_prompts(cfg["prompts"])):
                fh.write(json.dumps({"id": f"p{k}", "prompt": p}) + "\n")
        recipe = {
            "source": {"path": str(data), "id_field": "id"},
            "models": {"m": {"backend": "embedded", "batch_size": cfg["batch_size"]}},
            "stages": [
                {
                    "type": "generate",
                    "models": ["m"],
                    "n": 1,
                    "temperature": 0.8,
                    "max_tokens": cfg["max_tokens"],
                }
            ],
            "output": {"dir": str(Path(tmp) / "run"), "formats": []},
            "settings": {"shard_size": cfg["shard_size"]},
        }
        loaded = parse_recipe(recipe)
        base_rss = rss_now_kib()
        base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with rss_samples() as samples:
            t0 = time.perf_counter()
            result = LocalExecutor(loaded, progress=False).run()
            seconds = time.perf_counter() - t0
        records_out = result.stages[-1].records_out
    out = {
        "prompts": cfg["prompts"],
        "records_out": records_out,
        "seconds": seconds,
        "base_rss_kib": base_rss,
        "base_peak_kib": base_peak,
        "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "end_rss_kib": rss_now_kib(),
        "tenths_kib": tenths(samples),
    }
    Path(out_path).write_text(json.dumps(out))


@contextlib.contextmanager
def rss_samples(every: float = 0.25) -> Iterator[list[int]]:
    """The process's RSS (KiB) every ``every`` seconds while the block runs, from a thread."""
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            samples.append(rss_now_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join()


def tenths(samples: list[int]) -> list[int]:
    """The highest RSS seen in each tenth of the run: flat if memory does not build up over time."""
    return [
        max(samples[k * len(samples) // 10 : (k + 1) * len(samples) // 10] or [0])
        for k in range(10)
    ]


def source_job(cfg: dict, out_path: str) -> None:
    """One source size, in its own process (called through --_source_job). Records the peak RSS
    when the export begins too: up to there is reading, planning and the shards; the export of
    ``records.parquet`` after it holds per-row-group metadata, one row group per shard."""
    from synthpref.executor import common
    from synthpref.executor.local import LocalExecutor
    from synthpref.recipes.loader import parse_recipe

    export_all = common.export_all
    before_export: list[int] = []

    def measured_export(*args, **kwargs):
        before_export.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return export_all(*args, **kwargs)

    common.export_all = measured_export

    with tempfile.TemporaryDirectory() as tmp:
        evals = Path(tmp) / "eval.txt"
        evals.write_text("What is the capital of France?\nName three prime numbers.\nSpell cat.\n")

        def run(rows: int, name: str):
            data = Path(tmp) / f"{name}.jsonl"
            with data.open("w") as fh:  # written a line at a time: no list of N prompts
                for k in range(rows):
                    fh.write(json.dumps({"id": f"p{k}", "prompt": synthetic_prompt(k)}) + "\n")
            recipe = {
                "source": {"path": str(data), "id_field": "id"},
                "stages": [{"type": "decontaminate", "eval_prompts": [str(evals)]}],
                "output": {"dir": str(Path(tmp) / f"run-{name}"), "formats": []},
                "settings": {"shard_size": cfg["shard_size"]},
            }
            return LocalExecutor(parse_recipe(recipe), progress=False).run()

        run(2 * cfg["shard_size"], "warmup")  # full shards, as the measured run has
        base_rss = rss_now_kib()
        with rss_samples() as samples:
            result = run(cfg["rows"], "source")
    out = {
        "rows": cfg["rows"],
        "records_out": result.stages[-1].records_out,
        "base_rss_kib": base_rss,
        "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "peak_before_export_kib": before_export[-1],
        "tenths_kib": tenths(samples),
    }
    Path(out_path).write_text(json.dumps(out))


def source_axis(sizes: list[int], shard_size: int) -> None:
    """Peak RSS per source size, and the ratio of the largest size's to the smallest's."""
    results = []
    for n in sizes:
        cfg = {"rows": n, "shard_size": shard_size}
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        r = run_job([sys.executable, __file__, "--_source_job"], cfg, env, f"the run at {n} rows")
        results.append(r)
        growth = r["peak_before_export_kib"] - r["base_rss_kib"]
        print(
            f"{n:>8} source rows: peak RSS {r['peak_kib'] / 1024:7.1f} MiB, up to the export "
            f"{r['peak_before_export_kib'] / 1024:7.1f} MiB | before the run "
            f"{r['base_rss_kib'] / 1024:7.1f} MiB | growth up to the export {growth / 1024:6.1f} "
            f"MiB ({growth * 1024 / n:.1f} bytes per row) | {r['records_out']} records out",
            flush=True,
        )
        tenths = " ".join(f"{k / 1024:.0f}" for k in r["tenths_kib"])
        print(f"{'':>21}highest RSS in each tenth of the run (MiB): {tenths}", flush=True)
    first, last = results[0], results[-1]
    print(
        f"ratio {last['rows']} / {first['rows']} source rows: peak RSS up to the export "
        f"{last['peak_before_export_kib'] / first['peak_before_export_kib']:.3f} (target <= 1.10); "
        f"whole run {last['peak_kib'] / first['peak_kib']:.3f}"
    )


def main() -> None:
    if child_job("--_job", job) or child_job("--_source_job", source_job):
        return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--source-rows",
        type=int,
        nargs="+",
        help="measure the source-size axis at these sizes instead (no model; see above)",
    )
    ap.add_argument(
        "--source-shard-size", type=int, default=1000, help="shard size of the source-size runs"
    )
    args = ap.parse_args()
    if args.source_rows:
        source_axis(args.source_rows, args.source_shard_size)
        return

    results = []
    for n in args.sizes:
        cfg = {
            "prompts": n,
            "max_tokens": args.max_tokens,
            "shard_size": args.shard_size,
            "batch_size": args.batch_size,
        }
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        r = run_job([sys.executable, __file__, "--_job"], cfg, env, f"the run at {n} prompts")
        results.append(r)
        print(
            f"{n:>7} prompts: peak RSS {r['peak_kib'] / 1024:7.1f} MiB | after model load "
            f"{r['base_rss_kib'] / 1024:7.1f} MiB | growth during run "
            f"{(r['peak_kib'] - r['base_rss_kib']) / 1024:6.1f} MiB | {r['seconds']:6.1f} s, "
            f"{r['records_out']} records",
            flush=True,
        )
        tenths = " ".join(f"{k / 1024:.0f}" for k in r["tenths_kib"])
        print(f"{'':>16}highest RSS in each tenth of the run (MiB): {tenths}", flush=True)
    first = results[0]
    for r in results[1:]:
        grow_first = first["peak_kib"] - first["base_rss_kib"]
        grow = r["peak_kib"] - r["base_rss_kib"]
        print(
            f"ratio {r['prompts']} / {first['prompts']} prompts: peak RSS "
            f"{r['peak_kib'] / first['peak_kib']:.3f} (target <= 1.10); growth during run "
            f"{grow / 1024:.1f} vs {grow_first / 1024:.1f} MiB "
            f"(+{(grow - grow_first) / 1024:.1f} MiB for {r['prompts'] - first['prompts']} "
            "more prompts)"
        )


if __name__ == "__main__":
    main()
