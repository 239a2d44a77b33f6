"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no display needed)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from synthpref.report.collect import RunStats

DPI = 110
_BLUE, _ORANGE, _GREY, _RED = "#3a6ea5", "#e07b39", "#9a9a9a", "#c0392b"


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return path


def _style(ax) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def _legend_above(ax) -> None:
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8, frameon=False)


def funnel(stats: RunStats, path: Path) -> Path | None:
    """Records in/out per stage, and pairs after every stage that builds or filters them."""
    if not stats.stages:
        return None
    names = [s.name for s in stats.stages]
    pair_stages = [s for s in stats.stages if s.pairs_out is not None]
    ncols = 2 if pair_stages else 1
    fig = Figure(figsize=(5.2 * ncols, 0.5 * len(names) + 1.6))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    ax = axes[0]
    y = list(range(len(names)))[::-1]
    ins = [s.records_in for s in stats.stages]
    outs = [s.records_out for s in stats.stages]
    ax.barh([v + 0.2 for v in y], ins, height=0.4, color=_GREY, label="records in")
    ax.barh([v - 0.2 for v in y], outs, height=0.4, color=_BLUE, label="records out")
    for v, n in zip(y, outs, strict=True):
        ax.text(n, v - 0.2, f" {n}", va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.set_xlabel("records (prompts)")
    ax.set_title("Records per stage", pad=22)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_above(ax)
    _style(ax)
    if pair_stages:
        ax = axes[1]
        py = list(range(len(pair_stages)))[::-1]
        counts = [s.pairs_out or 0 for s in pair_stages]
        dropped = [(s.pairs_in or 0) - (s.pairs_out or 0) if s.pairs_in else 0 for s in pair_stages]
        ax.barh(py, counts, color=_ORANGE, label="pairs kept")
        ax.barh(py, dropped, left=counts, color=_GREY, alpha=0.5, label="pairs dropped")
        for v, n in zip(py, counts, strict=True):
            ax.text(n, v, f" {n}", va="center", fontsize=8)
        ax.set_yticks(py, [s.name for s in pair_stages])
        ax.set_xlabel("pairs")
        ax.set_title("Pairs after each pair stage / filter", pad=22)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _legend_above(ax)
        _style(ax)
    fig.tight_layout()
    return _save(fig, path)


def score_histograms(stats: RunStats, path: Path) -> Path | None:
    judges = [j for j in stats.judges.values() if j.scores]
    if not judges:
        return None
    ncols = min(3, len(judges))
    nrows = math.ceil(len(judges) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, judge in zip(axes, judges, strict=False):
        values = judge.scores
        distinct = sorted(set(values))
        if len(distinct) <= 12:
            counts = [values.count(v) for v in distinct]
            width = (
                (min(b - a for a, b in itertools.pairwise(distinct)) * 0.8)
                if len(distinct) > 1
                else 0.5
            )
            ax.bar(distinct, counts, width=width, color=_BLUE)
            ax.set_xticks(distinct, [f"{v:g}" for v in distinct], fontsize=8)
        else:
            ax.hist(values, bins=20, color=_BLUE)
        what = "preference for the first response" if judge.pairwise else "score"
        ax.set_xlabel(what)
        ax.set_ylabel("judgments")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        failed = f", {judge.failed} failed" if judge.failed else ""
        ax.set_title(f"{judge.name} (n={len(values)}{failed})", fontsize=10)
        _style(ax)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(judges) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def lengths(stats: RunStats, path: Path) -> Path | None:
    if not stats.pair_lengths:
        return None
    chosen = [c for c, _, _ in stats.pair_lengths]
    rejected = [r for _, r, _ in stats.pair_lengths]
    fig = Figure(figsize=(10.4, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    top = max(chosen + rejected) or 1
    bins = [top * k / 20 for k in range(21)]
    ax1.hist(chosen, bins=bins, color=_BLUE, alpha=0.6, label=f"chosen (mean {_mean(chosen):.0f})")
    ax1.hist(
        rejected,
        bins=bins,
        color=_ORANGE,
        alpha=0.6,
        label=f"rejected (mean {_mean(rejected):.0f})",
    )
    ax1.set_xlabel("response length (words)")
    ax1.set_ylabel("pairs")
    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_title("Chosen vs rejected length")
    ax1.legend(fontsize=8, frameon=False)
    _style(ax1)
    diff = [c - r for c, r, _ in stats.pair_lengths]
    margins = [m for _, _, m in stats.pair_lengths]
    ax2.scatter(diff, margins, s=14, color=_BLUE, alpha=0.6)
    ax2.axvline(0, color=_GREY, lw=0.8)
    ax2.set_xlabel("chosen minus rejected length (words)")
    ax2.set_ylabel("score margin")
    longer = sum(d > 0 for d in diff) / len(diff)
    ax2.set_title(f"Length gap vs margin (chosen longer in {longer:.0%})")
    _style(ax2)
    fig.tight_layout()
    return _save(fig, path)


def agreement(stats: RunStats, path: Path) -> Path | None:
    names = sorted({n for pair in stats.kappas for n in pair})
    if len(names) < 2:
        return None
    size = len(names)
    grid = [[math.nan] * size for _ in range(size)]
    for i in range(size):
        grid[i][i] = 1.0
    for (a, b), info in stats.kappas.items():
        k = info["kappa"]
        i, j = names.index(a), names.index(b)
        grid[i][j] = grid[j][i] = math.nan if k is None else k
    fig = Figure(figsize=(1.3 * size + 2.4, 1.1 * size + 1.2))
    ax = fig.subplots()
    image = ax.imshow(grid, vmin=-1, vmax=1, cmap="RdBu")
    for i in range(size):
        for j in range(size):
            value = grid[i][j]
            label = "n/a" if math.isnan(value) else f"{value:.2f}"
            ax.text(j, i, label, ha="center", va="center", fontsize=9,
                    color="white" if not math.isnan(value) and abs(value) > 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(size), names, rotation=30, ha="right")
    ax.set_yticks(range(size), names)
    ax.set_title("Cohen's kappa between judges\n(winner of each candidate pair)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path)


def dropped(stats: RunStats, path: Path, top: int = 12) -> Path | None:
    reasons = stats.dropped_reasons()[:top]
    if not reasons:
        return None
    labels = [f"{stage}: {reason}" for stage, reason, _ in reasons][::-1]
    counts = [n for _, _, n in reasons][::-1]
    fig = Figure(figsize=(7.5, 0.38 * len(reasons) + 1.2))
    ax = fig.subplots()
    ax.barh(range(len(counts)), counts, color=_RED, alpha=0.75)
    for v, n in enumerate(counts):
        ax.text(n, v, f" {n}", va="center", fontsize=8)
    ax.set_yticks(range(len(counts)), labels, fontsize=8)
    ax.set_xlabel("rows dropped or skipped")
    ax.set_title("Top reasons rows were dropped")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _style(ax)
    fig.tight_layout()
    return _save(fig, path)


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


FIGURES = {
    "funnel.png": funnel,
    "scores.png": score_histograms,
    "agreement.png": agreement,
    "lengths.png": lengths,
    "dropped.png": dropped,
}


def draw_all(stats: RunStats, out_dir: Path) -> dict[str, Path]:
    out = {}
    for name, draw in FIGURES.items():
        target = out_dir / name
        target.unlink(missing_ok=True)
        path = draw(stats, target)
        if path is not None:
            out[name] = path
    return out
