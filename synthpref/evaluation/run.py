"""``eval-judges``: run a recipe's judge stages on human-labelled pairs and measure them.

The labelled pairs become records with both responses pre-filled as candidates; a :class:`LoadedRecipe`
holding only the recipe's judge stages (and annotators, which prepare what judges read, such as
checklists or domains) runs them through the ordinary :class:`~synthpref.executor.local.LocalExecutor`.
So evaluation is cached, checkpointed and resumable exactly like a run, and works unchanged on whatever
backend the recipe names. Generators, filters and pair builders are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from rich.console import Console

from synthpref.errors import SynthprefError
from synthpref.evaluation.data import (
    EvalItem,
    data_stem,
    load_pairs,
    select_pairs,
    to_items,
)
from synthpref.evaluation.metrics import (
    JudgeVerdict,
    agreement,
    agreement_table,
    judge_verdict,
    longer_wins,
    random_verdicts,
    shown_order_labels,
    summarize,
)
from synthpref.executor.local import LocalExecutor, RunResult
from synthpref.recipes.loader import LoadedRecipe
from synthpref.recipes.schema import OutputSpec
from synthpref.records import records_from_arrow
from synthpref.sources import InputError

EVAL_KINDS = ("annotator", "judge")  # annotators run too: judges may read what they write


class EvalError(SynthprefError, ValueError):
    """``eval-judges`` has nothing to evaluate: the recipe has no judge stage, or the data no usable
    labelled pair."""


@dataclass
class EvalResult:
    report: dict[str, Any]
    out_dir: Path
    run: RunResult
    input_errors: list[InputError]
    files: dict[str, Path]


def default_output_dir(loaded: LoadedRecipe, data: str | Path) -> Path:
    """``<output.dir>/eval-judges/<data-stem>/`` of the recipe."""
    return loaded.recipe.resolve(loaded.recipe.output.dir) / "eval-judges" / data_stem(data)


def judge_recipe(loaded: LoadedRecipe, out_dir: Path, data: str | Path) -> LoadedRecipe:
    """The recipe reduced to its judge (and annotator) stages, exporting no dataset."""
    keep = [i for i, s in enumerate(loaded.stages) if s.kind in EVAL_KINDS]
    if not any(loaded.stages[i].kind == "judge" for i in keep):
        kinds = ", ".join(f"{s.name} ({s.kind})" for s in loaded.stages)
        raise EvalError(f"the recipe has no judge stage to evaluate (its stages: {kinds})")
    recipe = loaded.recipe.model_copy(update={"output": OutputSpec(dir=str(out_dir), formats=[])})
    raw = dict(loaded.raw)
    raw_stages = raw.get("stages")
    if isinstance(raw_stages, list) and len(raw_stages) == len(loaded.stages):
        raw["stages"] = [raw_stages[i] for i in keep]
    raw["eval_judges"] = {"data": str(data)}
    return LoadedRecipe(
        recipe=recipe,
        models=loaded.models,
        stages=[loaded.stages[i] for i in keep],
        path=loaded.path,
        raw=raw,
    )


def evaluate_judges(
    loaded: LoadedRecipe,
    data: str | Path,
    *,
    output: Path | None = None,
    limit: int | None = None,
    subsets: list[str] | None = None,
    seed: int = 0,
    split: str = "train",
    fresh: bool = False,
    console: Console | None = None,
    progress: bool = True,
) -> EvalResult:
    """Run the judges on the labelled pairs and write report.json, report.md and verdicts.jsonl."""
    out_dir = Path(output) if output is not None else default_output_dir(loaded, data)
    eval_loaded = judge_recipe(loaded, out_dir, data)
    pairs, errors = load_pairs(data, split=split)
    selected = select_pairs(pairs, subsets=subsets, limit=limit)
    if not selected:
        raise EvalError(
            f"no usable labelled pair in {data}"
            + (f" ({len(errors)} malformed row(s); first: {errors[0]})" if errors else "")
        )
    items = to_items(selected, seed=seed)
    executor = LocalExecutor(
        eval_loaded,
        run_dir=out_dir,
        fresh=fresh,
        console=console,
        progress=progress,
        records=[it.record for it in items],
        input_errors=errors,
    )
    run = executor.run()
    judged = {r.id: r for r in records_from_arrow(pq.read_table(run.outputs["records"]))}
    judges = [(s.name, s.type_name) for s in eval_loaded.stages if s.kind == "judge"]
    report, verdict_rows = build_report(items, judged, judges, seed=seed)
    report.update(
        {
            "recipe": str(loaded.path) if loaded.path else loaded.recipe.name,
            "data": str(data),
            "limit": limit,
            "subsets_selected": subsets or None,
            "input_rows": len(pairs) + len(errors),
            "input_errors": len(errors),
            "run": {
                "dir": str(out_dir),
                "fingerprint": run.fingerprint,
                "seconds": round(run.seconds, 2),
                "stages": [
                    {
                        "name": s.name,
                        "calls": s.calls,
                        "cache_hits": s.cache_hits,
                        "shards_resumed": s.shards_resumed,
                        "tokens": s.tokens,
                        "dollars": s.dollars,
                        "seconds": round(s.seconds, 2),
                        "counters": dict(s.counters),
                    }
                    for s in run.stages
                ],
            },
        }
    )
    from synthpref.evaluation.report import write_reports

    files = write_reports(report, verdict_rows, out_dir)
    return EvalResult(report, out_dir, run, errors, files)


_WORD = {1: "chosen", 0: "tie", -1: "rejected", None: None}


def build_report(
    items: list[EvalItem],
    judged: dict[str, Any],
    judges: list[tuple[str, str]],
    *,
    seed: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every metric, overall and per subset, from the judged records; plus one row per pair."""
    chosen_first = [it.chosen_first for it in items]
    subsets = [it.pair.subset for it in items]
    verdicts: dict[str, list[JudgeVerdict]] = {}
    for name, _ in judges:
        verdicts[name] = [
            judge_verdict(judged[it.record.id], name, it.chosen_id, it.rejected_id) for it in items
        ]
    longer = [longer_wins(it.pair.chosen, it.pair.rejected) for it in items]
    rand = random_verdicts(len(items), seed)
    human_ab = [1 if f else -1 for f in chosen_first]

    def by_subset(values: dict[str, list]) -> dict[str, dict[str, Any]]:
        out = {}
        for sub in sorted(set(subsets)):
            idx = [i for i, s in enumerate(subsets) if s == sub]
            out[sub] = summarize(
                **{k: [v[i] for i in idx] if v is not None else None for k, v in values.items()}
            )
        return out

    judge_entries = []
    ab_labels: dict[str, list] = {}
    for name, type_name in judges:
        vs = verdicts[name]
        plain = [v.verdict for v in vs]
        pairwise = any(v.pairwise for v in vs)
        values = {
            "verdicts": plain,
            "chosen_first": chosen_first,
            "consistent": [v.consistent for v in vs] if pairwise else None,
            "position_bias": [v.position_bias for v in vs] if pairwise else None,
        }
        overall = summarize(**values)
        ab_labels[name] = shown_order_labels(plain, chosen_first)
        human = agreement(ab_labels[name], human_ab)
        overall["kappa_human"] = human["kappa"]
        errors: dict[str, int] = {}
        for v in vs:
            if v.error:
                key = v.error.splitlines()[0][:120]
                errors[key] = errors.get(key, 0) + 1
        judge_entries.append(
            {
                "name": name,
                "type": type_name,
                "kind": "pairwise" if pairwise else "pointwise",
                "overall": overall,
                "by_subset": by_subset(values),
                "failure_reasons": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
            }
        )
    ab_labels["longer_wins"] = shown_order_labels(longer, chosen_first)
    ab_labels["human"] = human_ab
    baselines = [
        {
            "name": "longer_wins",
            "description": "the longer response (characters) wins; equal lengths tie",
            "overall": summarize(longer, chosen_first),
            "by_subset": by_subset({"verdicts": longer, "chosen_first": chosen_first}),
        },
        {
            "name": "random",
            "description": f"a fair coin per pair (seed {seed}); expected accuracy 0.5",
            "seed": seed,
            "expected_accuracy": 0.5,
            "overall": summarize(rand, chosen_first),
            "by_subset": by_subset({"verdicts": rand, "chosen_first": chosen_first}),
        },
    ]
    subset_counts: dict[str, int] = {}
    for s in subsets:
        subset_counts[s] = subset_counts.get(s, 0) + 1
    report = {
        "pairs": len(items),
        "chosen_first": sum(chosen_first),
        "seed": seed,
        "subsets": dict(sorted(subset_counts.items())),
        "judges": judge_entries,
        "baselines": baselines,
        "agreement": agreement_table(ab_labels),
    }
    rows = []
    for i, it in enumerate(items):
        row: dict[str, Any] = {
            "id": it.pair.id,
            "row": it.pair.row,
            "subset": it.pair.subset,
            "chosen": it.chosen_id,
            "judges": {},
            "longer_wins": _WORD[longer[i]],
            "random": _WORD[rand[i]],
        }
        for name, _ in judges:
            v = verdicts[name][i]
            entry: dict[str, Any] = {
                "verdict": _WORD[v.verdict],
                "chosen_score": v.chosen_score,
                "rejected_score": v.rejected_score,
            }
            if v.pairwise:
                entry["consistent"] = v.consistent
            if v.error:
                entry["error"] = v.error
            row["judges"][name] = entry
        rows.append(row)
    return report, rows
