"""The eval-judges report: a rich table on the terminal, report.json, report.md and verdicts.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from synthpref.console import literal, say
from synthpref.executor.run_meta import format_usd

COLUMNS = (
    "judge",
    "kind",
    "n",
    "accuracy",
    "95% CI",
    "acc. decided",
    "ties",
    "failures",
    "pos. consistency",
    "κ human",
)
# the terminal table is narrower: no kind column, short headers, two decimals
TERMINAL = ("judge", "n", "acc", "95% CI", "decided", "ties", "fail", "consist", "κ hum")


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ci(ci: Any) -> str:
    return "–" if not ci else f"{ci[0]:.2f}–{ci[1]:.2f}"


def overview_rows(report: dict[str, Any], digits: int = 3, kind: bool = True) -> list[list[str]]:
    """One row per judge, then the baselines (random: seeded coins; its expectation is 0.5)."""
    rows = []
    raters = [(j["name"], j["kind"], j["overall"]) for j in report["judges"]]
    for b in report["baselines"]:
        name = "longer wins" if b["name"] == "longer_wins" else f"random (seed {b['seed']}, E=0.5)"
        raters.append((name, "baseline", b["overall"]))
    for name, kind_, o in raters:
        row = [
            name,
            *([kind_] if kind else []),
            str(o["n"]),
            _f(o["accuracy"], digits),
            _ci(o["accuracy_ci95"]),
            _f(o["accuracy_decided"], digits),
            _f(o["tie_rate"], digits),
            _f(o["failure_rate"], digits),
            _f(o.get("position_consistency"), digits),
            _f(o.get("kappa_human"), digits),
        ]
        rows.append(row)
    return rows


def subset_rows(report: dict[str, Any], digits: int = 3) -> tuple[list[str], list[list[str]]]:
    """Accuracy per subset: one column per judge and baseline."""
    raters = [(j["name"], j["by_subset"]) for j in report["judges"]] + [
        ("longer wins" if b["name"] == "longer_wins" else "random", b["by_subset"])
        for b in report["baselines"]
    ]
    header = ["subset", "n", *[name for name, _ in raters]]
    rows = []
    for subset, n in report["subsets"].items():
        rows.append([subset, str(n), *[_f(by[subset]["accuracy"], digits) for _, by in raters]])
    return header, rows


def agreement_rows(report: dict[str, Any]) -> list[list[str]]:
    return [
        [a["a"], a["b"], str(a["n"]), _f(a["kappa"]), _f(a["agreement"])]
        for a in report["agreement"]
    ]


def _title(report: dict[str, Any]) -> str:
    scope = f"{report['pairs']} pairs"
    if report.get("subsets_selected"):
        scope += f", subsets {', '.join(report['subsets_selected'])}"
    if report.get("limit"):
        scope += f", --limit {report['limit']}"
    return f"eval-judges · {report.get('recipe', '')} on {report.get('data', '')} ({scope})"


def print_report(report: dict[str, Any], console: Console, files: dict[str, Path] | None = None):
    table = Table(title=literal(_title(report)), title_justify="left", pad_edge=False)
    for header in TERMINAL:
        table.add_column(header, justify="left" if header == "judge" else "right")
    for row in overview_rows(report, digits=2, kind=False):
        table.add_row(*map(literal, row))
    console.print(table)
    if len(report["subsets"]) > 1:
        header, rows = subset_rows(report, digits=2)
        sub = Table(title="accuracy per subset", title_justify="left", pad_edge=False)
        for h in header:
            sub.add_column(literal(h), justify="left" if h == "subset" else "right")
        for row in rows:
            sub.add_row(*map(literal, row))
        console.print(sub)
    agree = Table(
        title="agreement: Cohen's κ on which response wins",
        title_justify="left",
        pad_edge=False,
    )
    for h in ("rater", "rater", "n", "κ", "agreement"):
        agree.add_column(h, justify="left" if h == "rater" else "right")
    for row in agreement_rows(report):
        agree.add_row(*map(literal, row))
    console.print(agree)
    for j in report["judges"]:
        for reason, count in j.get("failure_reasons", {}).items():
            say(console, f"  {j['name']}: {count} failed: {reason}")
    if report.get("input_errors"):
        say(
            console,
            f"{report['input_errors']} malformed pair row(s) skipped; see "
            f"{Path(report['run']['dir']) / 'errors.jsonl'}",
            style="yellow",
        )
    for name, path in (files or {}).items():
        say(console, f"{name}: {path}")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    right = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(right) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    parts = [
        f"# {_title(report)}",
        "",
        f"{report['chosen_first']} of {report['pairs']} pairs list the chosen response first "
        f"(seeded, balanced shuffle; seed {report['seed']}). Accuracy counts ties and failures as "
        "wrong; *acc. decided* is the accuracy on pairs the judge did not tie or fail; the CI is a 95% "
        "Wilson interval. Position consistency: share of pairwise judgments whose two orders name the "
        "same winner. κ human: Cohen's kappa between the judge's pick and the human label.",
        "",
        _md_table(list(COLUMNS), overview_rows(report)),
        "",
    ]
    if len(report["subsets"]) > 1:
        header, rows = subset_rows(report)
        parts += ["## Accuracy per subset", "", _md_table(header, rows), ""]
    parts += [
        "## Agreement between raters",
        "",
        "Cohen's κ on which response wins (A, B or tie), on the pairs both raters gave a verdict for. "
        "A high κ with `longer_wins` means the judge mostly follows length.",
        "",
        _md_table(["rater", "rater", "n", "κ", "agreement"], agreement_rows(report)),
        "",
    ]
    failures = [
        f"- `{j['name']}`: {count} × {reason}"
        for j in report["judges"]
        for reason, count in j.get("failure_reasons", {}).items()
    ]
    if failures:
        parts += ["## Most common failures", "", *failures, ""]
    run = report.get("run")
    if run:
        stage_lines = [
            f"- `{s['name']}`: {s['calls']} model calls, {s['cache_hits']} cache hits, "
            + (f"{format_usd(s['dollars'])}, " if s.get("dollars") else "")
            + f"{s['shards_resumed']} shard(s) resumed, {s['seconds']:.1f}s"
            for s in run["stages"]
        ]
        parts += ["## Run", "", f"Directory `{run['dir']}`.", "", *stage_lines, ""]
    if report.get("input_errors"):
        parts += [f"{report['input_errors']} malformed pair row(s) skipped (errors.jsonl).", ""]
    return "\n".join(parts)


def write_reports(
    report: dict[str, Any], verdict_rows: list[dict[str, Any]], out_dir: Path
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "report.json": out_dir / "report.json",
        "report.md": out_dir / "report.md",
        "verdicts.jsonl": out_dir / "verdicts.jsonl",
    }
    files["report.json"].write_text(
        json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n"
    )
    files["report.md"].write_text(markdown(report))
    with files["verdicts.jsonl"].open("w", encoding="utf-8") as fh:
        for row in verdict_rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return files
