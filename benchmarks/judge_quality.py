"""How well do the shipped judge recipes agree with humans? ``eval-judges`` on every one of them.

Every ``recipes/*.yaml`` whose stages include a judge is found at run time (recipes added later are
picked up; those whose judges need another backend than the embedded model, e.g. vLLM on a GPU, are
skipped unless ``--all-backends``), loaded unchanged, and its judge stages are run by ``synthpref.evaluation`` on a seeded
sample of human-labelled pairs from each set in ``../shared/evaldata`` (PandaLM, HHH alignment,
EvalBiasBench; see their READMEs for provenance). The sets are merged into one file whose ``subset``
is the set's name, so each recipe is one cached, resumable run and its per-subset figures are the
per-set figures. Printed per recipe, judge and set: accuracy, accuracy on decided pairs, tie rate,
failure rate, position consistency (pairwise judges) and the two baselines on the same pairs.

The default of 3 pairs per set keeps a run of the shipped recipes to minutes on 2 CPU cores; figures on
so few pairs are noise (use ``--limit 50`` or more to compare judges). The embedded 135M model is far
too small to judge well: expect accuracies near (or below) chance. What this shows is that every
shipped judge runs end to end on labelled data and what its failure modes are (ties, failures,
position bias), not how good a real judge would be. These sets measure; do not tune prompts to them.

    python benchmarks/judge_quality.py                 # 3 pairs per set, every judge recipe
    python benchmarks/judge_quality.py --limit 20 --recipes quickstart pairwise
    python benchmarks/judge_quality.py --sets hhh_alignment --limit 40

Reruns are served from the checkpoints and request cache under ``runs/judge-quality/``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETS = ("pandalm", "hhh_alignment", "evalbiasbench")


def evaldata_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    shared = REPO.parent / "shared" / "evaldata"
    if shared.is_dir():
        return shared
    fixtures = REPO / "tests" / "fixtures" / "evaldata"
    print(f"../shared/evaldata not found; using the test slices in {fixtures}", file=sys.stderr)
    return fixtures


def set_file(root: Path, name: str) -> Path:
    for candidate in (root / name / "pairs.jsonl", root / f"{name}.jsonl"):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"no pairs for {name!r} under {root}")


def sample_pairs(root: Path, sets: list[str], limit: int, seed: int, out: Path) -> dict[str, int]:
    """A seeded sample of ``limit`` rows per set, merged with ``subset`` = the set's name."""
    counts = {}
    rows = []
    for name in sets:
        lines = [ln for ln in set_file(root, name).read_text().splitlines() if ln.strip()]
        order = list(range(len(lines)))
        random.Random(f"{seed}:{name}").shuffle(order)
        picked = sorted(
            order[:limit]
        )  # a larger --limit extends the sample: cached calls stay useful
        for i in picked:
            row = json.loads(lines[i])
            row["source_subset"] = row.get("subset")
            row["subset"] = name
            rows.append(row)
        counts[name] = len(picked)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return counts


def judge_recipes(names: list[str] | None, all_backends: bool = False):
    from synthpref.evaluation.run import EVAL_KINDS
    from synthpref.recipes.loader import RecipeError, load_recipe

    found = []
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        if names and path.stem not in names:
            continue
        try:
            loaded = load_recipe(path)
        except RecipeError as exc:
            print(f"skipping {path.name}: {exc}", file=sys.stderr)
            continue
        if not any(s.kind == "judge" for s in loaded.stages):
            continue
        used = {m for s in loaded.stages if s.kind in EVAL_KINDS for m in s.models_used()}
        other = sorted({loaded.models[m].backend for m in used} - {"embedded"})
        if other and not all_backends:
            print(
                f"skipping {path.name}: its judges use the {', '.join(other)} backend (this benchmark "
                "runs the embedded model; --all-backends includes it, or run synthpref eval-judges "
                "on a machine that serves it)",
                file=sys.stderr,
            )
            continue
        found.append((path, loaded))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=3, help="pairs per set (default 3)")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--recipes", nargs="+", help="recipe stems (default: every judge recipe)")
    parser.add_argument("--evaldata", help="folder of the pair sets (default ../shared/evaldata)")
    parser.add_argument("--seed", type=int, default=0, help="sample, A/B order and random baseline")
    parser.add_argument("--out", default=str(REPO / "runs" / "judge-quality"))
    parser.add_argument("--fresh", action="store_true", help="discard checkpoints and caches")
    parser.add_argument(
        "--all-backends",
        action="store_true",
        help="also run recipes whose judges use other backends than the embedded model (vllm, ...)",
    )
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from synthpref.evaluation import evaluate_judges

    console = Console(width=None if sys.stdout.isatty() else 150)
    out = Path(args.out)
    data = out / f"pairs-{args.limit}-{args.seed}.jsonl"
    counts = sample_pairs(evaldata_dir(args.evaldata), args.sets, args.limit, args.seed, data)
    recipes = judge_recipes(args.recipes, args.all_backends)
    console.print(
        f"{len(recipes)} judge recipe(s): {', '.join(p.stem for p, _ in recipes)}; pairs per set: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )

    table = Table(
        title="judge quality on human-labelled pairs (embedded model)", title_justify="left"
    )
    for col in ("recipe", "judge", "set", "n", "acc", "decided", "ties", "fail", "consist", "longer",
                "random"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("recipe", "judge", "set") else "right")

    def f(x):
        return "–" if x is None else f"{x:.2f}"

    timings = []
    for path, loaded in recipes:
        t0 = time.perf_counter()
        try:
            result = evaluate_judges(
                loaded, data, output=out / path.stem, seed=args.seed, fresh=args.fresh,
                progress=False, console=Console(stderr=True, quiet=True),
            )  # fmt: skip
        except Exception as exc:  # one broken recipe should not hide the others' figures
            console.print(f"[red]{path.name}: {type(exc).__name__}: {exc}[/]")
            continue
        seconds = time.perf_counter() - t0
        report = result.report
        calls = sum(s["calls"] for s in report["run"]["stages"])
        timings.append((path.stem, seconds, calls))
        base = {b["name"]: b["by_subset"] for b in report["baselines"]}
        for j in report["judges"]:
            for name in args.sets:
                s = j["by_subset"].get(name)
                if s is None:
                    continue
                table.add_row(
                    path.stem, j["name"], name, str(s["n"]), f(s["accuracy"]),
                    f(s["accuracy_decided"]), f(s["tie_rate"]), f(s["failure_rate"]),
                    f(s.get("position_consistency")), f(base["longer_wins"][name]["accuracy"]),
                    f(base["random"][name]["accuracy"]),
                )  # fmt: skip
            o = j["overall"]
            table.add_row(
                path.stem, j["name"], "all", str(o["n"]), f(o["accuracy"]), f(o["accuracy_decided"]),
                f(o["tie_rate"]), f(o["failure_rate"]), f(o.get("position_consistency")),
                f(report["baselines"][0]["overall"]["accuracy"]),
                f(report["baselines"][1]["overall"]["accuracy"]), end_section=True,
            )  # fmt: skip
    console.print(table)
    console.print("random: seeded coins (expected accuracy 0.5); longer: the longer response wins")
    for stem, seconds, calls in timings:
        console.print(f"{stem}: {seconds:.0f}s, {calls} model calls (0 = served from cache)")
    console.print(f"reports: {out}/<recipe>/report.md")


if __name__ == "__main__":
    main()
