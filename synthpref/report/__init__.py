"""The run report: ``synthpref report RUN_DIR`` writes ``RUN_DIR/report/`` with ``report.md``,
``report.json`` and PNG figures (records and pairs per stage, judge score histograms, Cohen's kappa
between judges, chosen/rejected lengths, top dropped reasons). The dataset card embeds the same
Markdown.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from synthpref.report.collect import (
    CheckedRun,
    ReportError,
    RunStats,
    check_run_dir,
    collect,
)

__all__ = [
    "CheckedRun",
    "Report",
    "ReportError",
    "RunStats",
    "build_report",
    "check_run_dir",
    "collect",
]


@dataclass
class Report:
    stats: RunStats
    out_dir: Path
    markdown: Path
    json: Path
    figures: dict[str, Path]

    def card_markdown(self, image_prefix: str = "report/", heading: int = 2) -> str:
        from synthpref.report.markdown import render

        return render(self.stats, self.figures, image_prefix=image_prefix, heading=heading)


def build_report(
    run_dir: Path, out_dir: Path | None = None, checked: CheckedRun | None = None
) -> Report:
    from synthpref.report.markdown import render
    from synthpref.report.plots import draw_all

    run_dir = Path(run_dir)
    stats = collect(run_dir, checked)
    out_dir = out_dir or run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = draw_all(stats, out_dir)
    md = out_dir / "report.md"
    md.write_text(render(stats, figures), encoding="utf-8")
    js = out_dir / "report.json"
    js.write_text(json.dumps(_as_json(stats, figures), indent=2, default=_plain), encoding="utf-8")
    return Report(stats, out_dir, md, js, figures)


def _plain(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _as_json(stats: RunStats, figures: dict[str, Path]) -> dict:
    pairs = stats.pair_lengths
    return {
        "name": stats.name,
        "fingerprint": stats.fingerprint,
        "input_rows": stats.input_rows,
        "input_errors": len(stats.input_errors),
        "records": stats.records,
        "candidates": stats.candidates,
        "pairs": len(pairs),
        "rankings": stats.rankings,
        "stages": [
            {
                "name": s.name,
                "type": s.type,
                "records_in": s.records_in,
                "records_out": s.records_out,
                "pairs_in": s.pairs_in,
                "pairs_out": s.pairs_out,
                "counters": dict(s.counters),
                "seconds": round(s.seconds, 3),
                "source": s.source,
                "dollars": s.dollars,
                "models": s.models,
            }
            for s in stats.stages
        ],
        "cost": {
            "dollars": stats.cost.dollars,
            "models": stats.cost.spend.models if stats.cost.spend is not None else {},
            "source": stats.cost.spend_source,
            "prices": stats.cost.price_sources,
            "price_table": stats.cost.price_table,
        },
        "dropped": [{"stage": st, "reason": r, "rows": n} for st, r, n in stats.dropped_reasons()],
        "judges": {
            j.name: {
                "judgments": j.judgments,
                "failed": j.failed,
                "pairwise": j.pairwise,
                "mean": sum(j.scores) / len(j.scores) if j.scores else None,
                "histogram": _histogram(j.scores),
            }
            for j in stats.judges.values()
        },
        "kappa": [{"judges": list(k), **v} for k, v in sorted(stats.kappas.items())],
        "lengths": {
            "chosen_mean_words": sum(c for c, _, _ in pairs) / len(pairs) if pairs else None,
            "rejected_mean_words": sum(r for _, r, _ in pairs) / len(pairs) if pairs else None,
            "chosen_longer_share": sum(c > r for c, r, _ in pairs) / len(pairs) if pairs else None,
        },
        "flags": dict(stats.flags),
        "formats": {
            k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in stats.formats.items()
        },
        "figures": sorted(figures),
    }


def _histogram(values: list[float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in sorted(values):
        key = f"{v:g}"
        out[key] = out.get(key, 0) + 1
    return out if len(out) <= 25 else {}
