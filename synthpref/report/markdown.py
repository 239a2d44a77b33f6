"""The report as Markdown: tables and the figures, linked with a configurable path prefix (``report/``
in the dataset card, nothing inside the report folder)."""

from __future__ import annotations

import math
import re
from typing import Any

from synthpref.executor.run_meta import format_usd
from synthpref.filters.length_bias import length_stats
from synthpref.report.collect import RunStats

_SELECTED = re.compile(
    r"^selected:(?P<policy>.+?) out_of_sample_agreement=(?P<cv>\S+) ci95=\[(?P<lo>[^,]+),(?P<hi>[^\]]+)\] "
    r"held_out_kept=(?P<cv_kept>\S+) folds=(?P<folds>\d+) in_sample_agreement=(?P<agree>\S+) "
    r"gold_kept=(?P<kept>\S+) baseline_agreement=(?P<base>\S+)$"
)
# the key of runs made before the out-of-sample figure existed: in-sample only
_SELECTED_IN_SAMPLE = re.compile(
    r"^selected:(?P<policy>.+?) agreement=(?P<agree>\S+) gold_kept=(?P<kept>\S+) baseline_agreement=(?P<base>\S+)$"
)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.3g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return mean, math.sqrt(var)


def _median(values: list[float]) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def render(
    stats: RunStats, figures: dict[str, Any], image_prefix: str = "", heading: int = 1
) -> str:
    h = "#" * heading
    hh = h + "#"
    img = lambda name, alt: f"![{alt}]({image_prefix}{name})" if name in figures else ""  # noqa: E731
    pairs = len(stats.pair_lengths)
    out = [f"{h} Run report: {stats.name}", ""]
    if stats.description:
        out += [stats.description, ""]
    out += [
        _table(
            [
                "input rows",
                "malformed rows",
                "records out",
                "candidates",
                "pairs",
                "rankings",
                "run fingerprint",
            ],
            [
                [
                    stats.input_rows,
                    len(stats.input_errors),
                    stats.records,
                    stats.candidates,
                    pairs,
                    stats.rankings,
                    f"`{stats.fingerprint[:12]}`",
                ]
            ],
        ),
        "",
    ]

    out += [f"{hh} Stages", ""]
    paid = any(s.dollars for s in stats.stages)
    rows = []
    for s in stats.stages:
        pair_cell = ""
        if s.pairs_out is not None:
            pair_cell = (
                f"{s.pairs_in} → {s.pairs_out}" if s.pairs_in is not None else f"{s.pairs_out}"
            )
        rows.append(
            [
                s.name,
                s.type,
                s.records_in,
                s.records_out,
                pair_cell,
                s.calls,
                s.tokens,
                *([format_usd(s.dollars) if s.models else ""] if paid else []),
                f"{s.seconds:.1f}s",
            ]
        )
    header = ["stage", "type", "records in", "records out", "pairs", "calls*", "tokens*"]
    out += [
        _table([*header, *(["cost*"] if paid else []), "time"], rows),
        "",
        f"\\* {'model calls, tokens and dollars' if paid else 'model calls and tokens'} of the last "
        "invocation (a resumed run reuses earlier work).",
        "",
        img("funnel.png", "records and pairs per stage"),
        "",
    ]
    out += _cost_section(stats, hh)

    reasons = stats.dropped_reasons()
    out += [f"{hh} Dropped rows", ""]
    if reasons:
        out += [
            _table(["stage", "reason", "rows"], [list(r) for r in reasons[:15]]),
            "",
            img("dropped.png", "top dropped reasons"),
            "",
        ]
    else:
        out += ["Nothing was dropped.", ""]
    out += _truncation_lines(stats)
    if stats.flags:
        out += [
            "Flagged (kept, marked in `annotations.flags`): "
            + ", ".join(f"{k}: {v}" for k, v in stats.flags.most_common()),
            "",
        ]

    out += [f"{hh} Failures", ""]
    failures = []
    if stats.input_errors:
        first = stats.input_errors[0]
        failures.append(
            f"- {len(stats.input_errors)} malformed input row(s) skipped (first: row {first.get('row')}, "
            f"{first.get('field')}: {first.get('message')}); listed in `errors.jsonl`"
        )
    for judge in stats.judges.values():
        if judge.failed:
            kinds = ", ".join(f"{k} ({n})" for k, n in judge.errors.most_common(3))
            failures.append(
                f"- judge `{judge.name}`: {judge.failed} of {judge.judgments} judgments failed: {kinds}"
            )
    out += (failures or ["No failures."]) + [""]

    if stats.judges:
        out += [f"{hh} Judge scores", ""]
        rows = []
        for judge in stats.judges.values():
            mean, std = _mean_std(judge.scores)
            rows.append(
                [
                    judge.name,
                    "pairwise" if judge.pairwise else "pointwise",
                    judge.judgments,
                    judge.failed,
                    mean,
                    std,
                    min(judge.scores, default=math.nan),
                    max(judge.scores, default=math.nan),
                ]
            )
        out += [
            _table(["judge", "kind", "judgments", "failed", "mean", "std", "min", "max"], rows),
            "",
            img("scores.png", "judge score histograms"),
            "",
        ]
    if stats.kappas:
        out += [f"{hh} Agreement between judges", ""]
        out += [
            "For every pair of candidates of a prompt each judge implies a winner (or a tie); "
            "Cohen's kappa corrects their raw agreement for chance (1: perfect, 0: chance level).",
            "",
            _table(
                ["judge A", "judge B", "candidate pairs", "raw agreement", "Cohen's kappa"],
                [
                    [a, b, v["n"], v["agreement"], math.nan if v["kappa"] is None else v["kappa"]]
                    for (a, b), v in sorted(stats.kappas.items())
                ],
            ),
            "",
            img("agreement.png", "kappa heatmap"),
            "",
        ]

    if stats.pair_lengths:
        chosen = [c for c, _, _ in stats.pair_lengths]
        rejected = [r for _, r, _ in stats.pair_lengths]
        margins = [m for _, _, m in stats.pair_lengths]
        longer = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
        out += [f"{hh} Pairs: lengths and margins", ""]
        out += [
            _table(
                ["", "mean", "median", "min", "max"],
                [
                    [
                        "chosen length (words)",
                        _mean_std(chosen)[0],
                        _median(chosen),
                        min(chosen),
                        max(chosen),
                    ],
                    [
                        "rejected length (words)",
                        _mean_std(rejected)[0],
                        _median(rejected),
                        min(rejected),
                        max(rejected),
                    ],
                    ["margin", _mean_std(margins)[0], _median(margins), min(margins), max(margins)],
                ],
            ),
            "",
            f"The chosen response is the longer one in {longer:.0%} of the pairs.",
            "",
            img("lengths.png", "chosen vs rejected lengths"),
            "",
        ]

    out += _filter_sections(stats, hh)

    if stats.formats:
        out += [f"{hh} Dataset formats", ""]
        rows = [[f"`{name}`", info["rows"]] for name, info in stats.formats.items()]
        out += [_table(["format", "rows"], rows), ""]
        kto = stats.formats.get("kto", {}).get("balance")
        if kto:
            share = kto["desirable_share"]
            line = (
                f"KTO balance: {kto['desirable']} desirable vs {kto['undesirable']} undesirable "
                f"({share:.0%} desirable)."
            )
            if "suggested_desirable_weight" in kto:
                line += (
                    f" Suggested `KTOConfig(desirable_weight={kto['suggested_desirable_weight']}, "
                    "undesirable_weight=1.0)` to balance the classes."
                )
            out += [line, ""]
    return "\n".join(line for line in _squeeze(out)) + "\n"


def _cost_section(stats: RunStats, hh: str) -> list[str]:
    """Calls, billed tokens and dollars per stage and model (last invocation), the run directory's
    total over every invocation, and where the prices came from; nothing for a run without models."""
    cost = stats.cost
    if not stats.model_calls and not cost.dollars:
        return []
    rows = [(s.name, name, m) for s in stats.stages for name, m in s.models.items()]
    write = any(m.get("cache_write_tokens") for _, _, m in rows)
    batch = any(m.get("batch_calls") for _, _, m in rows)
    header = ["stage", "model", "calls", "cache hits", "input tokens", "cached input tokens"]
    header += [*(["cache write tokens"] if write else []), "output tokens"]
    header += [*(["batch calls"] if batch else []), "cost"]
    keys = ["calls", "cache_hits", "input_tokens", "cached_input_tokens"]
    keys += [*(["cache_write_tokens"] if write else []), "output_tokens"]
    keys += ["batch_calls"] if batch else []
    body = [[f"`{st}`", f"`{name}`", *(int(m.get(k, 0)) for k in keys),
             format_usd(m.get("dollars", 0.0))] for st, name, m in rows]  # fmt: skip
    if len(rows) > 1:
        body.append(["total", "", *(sum(int(m.get(k, 0)) for _, _, m in rows) for k in keys),
                     format_usd(sum(s.dollars for s in stats.stages))])  # fmt: skip
    out = [f"{hh} Model calls and cost", ""]
    if rows:
        out += [
            _table(header, body),
            "",
            "Calls, prompt and output tokens (as billed, for a hosted API) and US dollars of the "
            "last invocation; answers served from the run's request cache cost nothing.",
            "",
        ]
    if cost.spend is not None and (cost.dollars or any(s.dollars for s in stats.stages)):
        per = ", ".join(
            f"`{name}` {format_usd(d)}" for name, d in sorted(cost.spend.models.items()) if d
        )
        out += [
            f"This run directory's model calls have cost **{format_usd(cost.dollars)}** in all, over "
            f"every invocation{f' ({per})' if per else ''}, as billed (recorded in "
            f"`{cost.spend_source}` with each paid call).",
            "",
        ]
    by_source: dict[str, list[str]] = {}
    for name, source in cost.price_sources.items():
        by_source.setdefault(source, []).append(f"`{name}`")
    described = {
        "recipe": "the recipe's `price:`",
        "table": f"synthpref's shipped price table as of {cost.price_table} (providers change their "
        "prices; a spec's `price:` overrides it)",
        "backend": "the backend's own price",
    }
    if by_source:
        parts = [f"{', '.join(names)} from {described[src]}" for src, names in by_source.items()]
        out += [
            f"Prices: {'; '.join(parts)}. Models without a price (local models, self-hosted "
            "servers, hosted models missing from the price table) count as $0.",
            "",
        ]
    return out


def _filter_sections(stats: RunStats, hh: str) -> list[str]:
    out = []
    for s in stats.stages:
        if s.type == "length_bias_filter":
            ls = length_stats(s.counters)
            if ls:
                out += [f"{hh} Length-bias guard `{s.name}`", ""]
                rows = [
                    [
                        when,
                        v["pairs"],
                        v["mean_chosen"],
                        v["mean_rejected"],
                        v["ratio_of_means"],
                        f"{v['chosen_longer_share']:.0%}",
                    ]
                    for when, v in ls.items()
                ]
                out += [
                    _table(
                        ["", "pairs", "mean chosen", "mean rejected", "ratio", "chosen longer"],
                        rows,
                    ),
                    "",
                ]
                flagged = s.counters.get("flagged:length_bias", 0)
                dropped = s.counters.get("dropped:length_bias", 0)
                out += [f"Dropped {dropped}, flagged {flagged} length-biased pair(s).", ""]
        if s.type == "reliability_filter":
            for key in s.counters:
                out += _reliability_section(s, key, hh)
        if s.type == "consistency_filter":
            per = {}
            for key, n in s.counters.items():
                if key.startswith("judge:"):
                    _, judge, status = key.split(":", 2)
                    per.setdefault(judge, {})[status] = n
            if per:
                statuses = sorted({st for v in per.values() for st in v})
                out += [f"{hh} Consistency filter `{s.name}`", ""]
                out += [
                    _table(
                        ["judge", *statuses],
                        [[j, *(v.get(st, 0) for st in statuses)] for j, v in per.items()],
                    ),
                    "",
                    f"Kept {s.counters.get('kept', 0)} of {s.pairs_in or 0} pairs.",
                    "",
                ]
    return out


def _truncation_lines(stats: RunStats) -> list[str]:
    """Candidates cut off at max_tokens are per candidate, not per row, so they get their own line."""
    out = []
    for s in stats.stages:
        if n := s.counters.get("truncated_candidates_excluded", 0):
            out += [
                f"Stage `{s.name}` left out {n} candidate(s) cut off at max_tokens (finish reason "
                "`length`) from its pairs; `allow_truncated: true` on the stage pairs them.",
                "",
            ]
    return out


def _reliability_section(s: Any, key: str, hh: str) -> list[str]:
    """The out-of-sample agreement first; the in-sample one is optimistic (chosen on the same pairs)."""
    dropped = s.counters.get("dropped:unreliable_margin", 0) + s.counters.get(
        "dropped:unreliable_band", 0
    )
    tail = f"Dropped {dropped} of {s.pairs_in or 0} run pairs."
    m = _SELECTED.match(key)
    if m:
        lines = [
            f"Selected policy **{m['policy']}**: out-of-sample agreement with the gold labels "
            f"{m['cv']} (95% CI {m['lo']}–{m['hi']}) by {m['folds']}-fold cross-validation: the "
            f"policy chosen on the other folds kept {m['cv_kept']} held-out gold pairs.",
            "",
            f"In-sample agreement {m['agree']} on {m['kept']} gold pairs kept (chosen and measured on "
            f"the same pairs, so optimistic); all pairs: {m['base']}. {tail}",
        ]
    else:
        m = _SELECTED_IN_SAMPLE.match(key)
        if not m:
            return []
        lines = [
            f"Selected policy **{m['policy']}**: in-sample agreement with the gold labels "
            f"{m['agree']} on {m['kept']} gold pairs kept (chosen and measured on the same pairs, so "
            f"optimistic; this run predates the out-of-sample figure); all pairs: {m['base']}. {tail}"
        ]
    return [f"{hh} Reliability filter `{s.name}`", "", *lines, ""]


def _squeeze(lines: list[str]) -> list[str]:
    """Drop empty image lines and repeated blank lines."""
    out: list[str] = []
    for line in lines:
        if line == "" and out and out[-1] == "":
            continue
        out.append(line)
    return out
