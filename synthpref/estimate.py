"""``synthpref estimate``: what a whole run will cost, from a real run of its first prompts.

The pilot is the run itself, limited to the first ``K`` prompts and run online, in a scratch
directory but on the real run directory's request cache: the full run that follows answers those
prompts' calls from the cache and pays for them once, and the run directory's checkpoints, data and
``run.json`` are not touched (a new run directory is created holding only its cache and a
``run.json`` marking it as a run). Batch-mode models are asked online in the pilot (their cache keys are the same
in both modes), and the projection prices their generation calls both ways.

What is projected, per stage and per model, is the pilot's work scaled by ``N / K`` (``N``: the
usable prompts of the whole source): requests, prompt and output tokens as the provider billed
them (prompt-cache reads included, so a projection assumes the pilot's cache hit rate), dollars at
the spec's price online and, for models with a batch API, in batch mode. Wall time is projected
from the pilot's own stage times when the pilot made its calls now; a pilot answered from the cache
has no time to scale, and says so. Stages whose work is not proportional to the prompts (a
run-level de-duplication that drops more of a bigger source) make the projection approximate: it is
an estimate, printed with the sizes it came from.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from synthpref.recipes.loader import LoadedRecipe


@dataclass
class ModelProjection:
    stage: str
    model: str
    requests: float
    prompt_tokens: float
    output_tokens: float
    dollars_online: float
    dollars_batch: float | None  # None: the model has no batch API
    priced: bool


@dataclass
class Estimate:
    prompts: int
    pilot_prompts: int
    pilot_seconds: float
    pilot_calls: int
    rows: list[ModelProjection] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def factor(self) -> float:
        return self.prompts / self.pilot_prompts if self.pilot_prompts else 0.0

    @property
    def dollars_online(self) -> float:
        return sum(r.dollars_online for r in self.rows)

    @property
    def dollars_batch(self) -> float:
        """Every model that has a batch API in batch mode, the rest online."""
        return sum(
            r.dollars_online if r.dollars_batch is None else r.dollars_batch for r in self.rows
        )

    @property
    def timed(self) -> bool:
        """Whether the pilot's time says anything: it made calls now rather than reading them."""
        return self.pilot_calls > 0


def pilot_recipe(loaded: LoadedRecipe, prompts: int) -> LoadedRecipe:
    """``loaded`` limited to its first ``prompts`` prompts, with batch-mode models asked online."""
    recipe = loaded.recipe
    limit = min(prompts, recipe.source.limit) if recipe.source.limit else prompts
    source = recipe.source.model_copy(update={"limit": limit})
    models = {
        name: spec.model_copy(update={"mode": "online"})
        if getattr(spec, "mode", "online") == "batch"
        else spec
        for name, spec in loaded.models.items()
    }
    return dataclasses.replace(
        loaded, recipe=recipe.model_copy(update={"source": source}), models=models
    )


def estimate(
    recipe: str | Path,
    *,
    pilot: int = 10,
    output: str | Path | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> Estimate:
    """Run the first ``pilot`` prompts for real and project the whole source (see module text)."""
    from synthpref.checks import check_run_dir_writable, checked_recipe
    from synthpref.console import say
    from synthpref.executor.local import LocalExecutor
    from synthpref.sources import count_records

    console = console or Console(stderr=True)
    loaded, warnings = checked_recipe(recipe, for_run=True)
    for warning in warnings:
        say(console, warning, label="warning:", style="yellow")
    prompts = count_records(loaded.recipe)  # one streaming read: the source is never held
    run_dir = Path(output) if output else loaded.recipe.resolve(loaded.recipe.output.dir)
    check_run_dir_writable(run_dir, "output (--output)" if output else "output.dir")
    _mark_run_dir(loaded, run_dir)
    small = pilot_recipe(loaded, pilot)
    with tempfile.TemporaryDirectory(prefix="synthpref-pilot-") as scratch:
        executor = LocalExecutor(
            small,
            run_dir=Path(scratch) / "run",
            cache_path=run_dir / "cache.sqlite",
            console=console,
            progress=progress,
        )
        result = executor.run()
    est = Estimate(
        prompts=prompts,
        pilot_prompts=result.stages[0].records_in if result.stages else 0,
        pilot_seconds=result.seconds,
        pilot_calls=sum(c.calls for per in executor.clients.values() for c in per.values()),
        stage_seconds={s.name: s.seconds for s in result.stages},
    )
    f = est.factor
    for stage, per in executor.clients.items():
        for name, client in per.items():
            work = client.work
            price = client.price
            batch_capable = hasattr(loaded.models[name], "mode")
            est.rows.append(
                ModelProjection(
                    stage=stage,
                    model=name,
                    requests=client.requests * f,
                    prompt_tokens=(
                        work.input_tokens + work.cached_input_tokens + work.cache_write_tokens
                    )
                    * f,
                    output_tokens=work.output_tokens * f,
                    dollars_online=work.dollars * f,
                    dollars_batch=(
                        work.dollars * f * price.batch_discount
                        if batch_capable and price is not None
                        else (work.dollars * f if batch_capable else None)
                    ),
                    priced=price is not None,
                )
            )
    return est


def _mark_run_dir(loaded: LoadedRecipe, run_dir: Path) -> None:
    """Make ``run_dir`` a run directory (as a run's first step does) unless it is one already, so
    the pilot's cache may live there; refuses what a run would refuse."""
    from synthpref.executor.durable import write_json
    from synthpref.executor.run_dir import check_output_dir, is_run_dir
    from synthpref.executor.run_meta import RUN_LAYOUT

    recipe = loaded.recipe
    sources = [recipe.resolve(recipe.source.path)] if recipe.source.path else []
    check_output_dir(run_dir, recipe_dir=recipe.base_dir, recipe_file=loaded.path, sources=sources)
    if not is_run_dir(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        marker = {"synthpref_run": RUN_LAYOUT, "fingerprint": None, "recipe": loaded.raw}
        write_json(run_dir / "run.json", marker, default=str)


def render(est: Estimate, console: Console) -> None:
    """The projection as a table per stage and model, with the sizes it is scaled from."""
    from rich.table import Table

    from synthpref.console import literal, say

    table = Table(
        title=literal(
            f"synthpref estimate · {est.prompts} prompts, projected from a pilot of "
            f"{est.pilot_prompts} (×{est.factor:.1f})"
        ),
        title_justify="left",
    )
    for col in ("stage", "model", "requests", "prompt tok", "output tok", "$ online", "$ batch"):
        table.add_column(col, justify="left" if col in ("stage", "model") else "right")
    for r in est.rows:
        table.add_row(
            literal(r.stage),
            literal(r.model),
            f"{r.requests:,.0f}",
            f"{r.prompt_tokens:,.0f}",
            f"{r.output_tokens:,.0f}",
            f"{r.dollars_online:,.2f}" if r.priced else "no price",
            "n/a"
            if r.dollars_batch is None
            else (f"{r.dollars_batch:,.2f}" if r.priced else "no price"),
        )
    console.print(table)
    say(
        console,
        f"total: ${est.dollars_online:,.2f} online, ${est.dollars_batch:,.2f} with every model that "
        "has a batch API in batch mode (results within 24 h)",
    )
    if est.timed:
        say(
            console,
            f"time online: about {est.pilot_seconds * est.factor / 60:,.1f} min at the pilot's "
            f"pace ({est.pilot_seconds:.1f}s for {est.pilot_prompts} prompts)",
        )
    else:
        say(
            console,
            "time: not projected: the pilot's calls were all answered from the cache (an earlier "
            "run or estimate made them)",
        )
    unpriced = sorted({r.model for r in est.rows if not r.priced})
    if unpriced:
        say(
            console,
            f"no price for {', '.join(unpriced)}: a local model or self-hosted server costs "
            "nothing here; set price: in a model's spec to count it",
        )
    say(
        console,
        "the pilot's calls are cached in the run directory: the full run reuses them",
    )
