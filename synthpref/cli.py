"""The ``synthpref`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Build synthetic preference datasets (DPO, KTO, reward models) from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", exists=False)]


def _load(recipe: Path):
    from synthpref.recipes.loader import RecipeError, load_recipe

    try:
        loaded = load_recipe(recipe)
    except RecipeError as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(2) from None
    for warning in loaded.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    from synthpref.export.needs import recipe_problems

    problems = recipe_problems(loaded.recipe.output.formats, loaded.stages)
    if problems:
        console.print(f"[red]invalid recipe {recipe}:[/]", highlight=False)
        for problem in problems:
            console.print(f"  - {problem}", highlight=False)
        raise typer.Exit(2)
    return loaded


@app.command()
def run(
    recipe: RecipeArg,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="discard checkpoints and cache; start over")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="run directory (overrides output.dir)")
    ] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    executor: Annotated[
        str,
        typer.Option(
            "--executor",
            help="local: one process; ray: shards over Ray actors (pip install 'synthpref[ray]')",
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            help="ray: cluster to join (auto, ray://host:10001); default: start a local one"
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="ray: model replicas (default: one per GPU, else one per node)"),
    ] = None,
) -> None:
    """Run a recipe. Rerunning the same command resumes where it stopped (with either executor)."""
    from synthpref.executor import EXECUTORS, create_executor
    from synthpref.executor.local import RunError
    from synthpref.sources import SourceError

    if executor not in EXECUTORS:
        raise typer.BadParameter(f"choose one of {', '.join(EXECUTORS)}", param_hint="--executor")
    if executor != "ray" and (address is not None or workers is not None):
        raise typer.BadParameter("--address and --workers need --executor ray")
    loaded = _load(recipe)
    try:
        result = create_executor(
            loaded,
            executor,
            address=address,
            workers=workers,
            run_dir=output,
            fresh=fresh,
            console=console,
            progress=progress,
        ).run()
    except (RunError, SourceError) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    _print_summary(result)


def _print_summary(result) -> None:
    table = Table(title=f"synthpref run · {result.run_dir}", title_justify="left")
    for col in ("stage", "in", "out", "resumed", "calls", "cached", "tokens", "time"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in result.stages:
        table.add_row(
            s.name,
            str(s.records_in),
            str(s.records_out),
            str(s.shards_resumed),
            str(s.calls),
            str(s.cache_hits),
            str(s.tokens),
            f"{s.seconds:.1f}s",
        )
    console.print(table)
    for s in result.stages:
        if s.counters:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(s.counters.items()))
            console.print(f"  {s.name}: {counts}", highlight=False)
    if result.input_errors:
        console.print(
            f"[yellow]{len(result.input_errors)} malformed input row(s) skipped; "
            f"see {result.run_dir / 'errors.jsonl'}[/]"
        )
    for name, path in result.outputs.items():
        console.print(f"{name}: {path}")
    console.print(f"done in {result.seconds:.1f}s")


@app.command()
def validate(recipe: RecipeArg) -> None:
    """Check a recipe without running anything: schema, models, stages and capabilities."""
    loaded = _load(recipe)
    stages = ", ".join(f"{s.name} ({s.type_name})" for s in loaded.stages)
    console.print(f"[green]ok[/] {recipe}: {len(loaded.models)} model(s); stages: {stages}")


@app.command()
def stages(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List every registered stage and judge with its parameters."""
    from synthpref.stages.registry import builtin_stages, plugin_stages, resolve_stage

    catalogue = {}
    all_stages = {**builtin_stages()}
    for name in plugin_stages():
        all_stages[name] = resolve_stage(name)
    for name, cls in sorted(all_stages.items()):
        catalogue[name] = {
            "kind": cls.kind,
            "doc": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
            "params": _params(cls.Params),
        }
    if as_json:
        out.print_json(json.dumps(catalogue))
        return
    for name, info in catalogue.items():
        out.print(f"[bold]{name}[/] ({info['kind']}) {info['doc']}")
        for p, d in info["params"].items():
            out.print(f"    {p}: {d['type']} = {d['default']}  {d['help']}", highlight=False)


def _params(model) -> dict:
    out_ = {}
    for name, field in model.model_fields.items():
        default = (
            field.get_default(call_default_factory=True)
            if not field.is_required()
            else "(required)"
        )
        annotation = getattr(field.annotation, "__name__", None) or str(field.annotation)
        out_[name] = {
            "type": annotation.replace("typing.", ""),
            "default": default
            if isinstance(default, str | int | float | bool | list | dict | type(None))
            else str(default),
            "help": field.description or "",
        }
    return out_


@app.command()
def backends() -> None:
    """List the model backends a recipe can name."""
    from synthpref.backends.specs import backend_names, spec_class

    for name in backend_names():
        cls = spec_class(name)
        out.print(f"[bold]{name}[/]: {(cls.__doc__ or '').strip().splitlines()[0]}")
        for p, d in _params(cls).items():
            if p != "backend":
                out.print(f"    {p}: {d['type']} = {d['default']}  {d['help']}", highlight=False)


@app.command("eval-judges")
def eval_judges(
    recipe: RecipeArg,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="labelled pairs (prompt, chosen, rejected[, subset, id]): .jsonl/.json/.parquet/"
            ".csv, a saved datasets directory, or a Hub dataset name",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="default: <output.dir>/eval-judges/<data-stem>/"),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="judge only the first N pairs")] = None,
    subset: Annotated[
        list[str] | None, typer.Option("--subset", help="only this subset (repeatable)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the A/B order and the random baseline")] = 0,
    split: Annotated[str, typer.Option(help="split of a datasets dataset")] = "train",
    fresh: Annotated[bool, typer.Option("--fresh", help="discard checkpoints and cache")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Measure a recipe's judges against human-labelled preference pairs (accuracy, ties, kappa)."""
    from synthpref.evaluation import EvalError, evaluate_judges
    from synthpref.evaluation.report import print_report
    from synthpref.executor.local import RunError
    from synthpref.recipes.loader import RecipeError, load_recipe
    from synthpref.sources import SourceError

    try:
        loaded = load_recipe(recipe)  # not _load: its self-preference warnings concern generators
    except RecipeError as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(2) from None
    try:
        result = evaluate_judges(
            loaded,
            data,
            output=output,
            limit=limit,
            subsets=subset or None,
            seed=seed,
            split=split,
            fresh=fresh,
            console=console,
            progress=progress,
        )
    except (EvalError, RunError, SourceError) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    print_report(result.report, out, result.files)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a finished run directory")]) -> None:
    """Write the run report (Markdown, JSON and PNG figures) into RUN_DIR/report/."""
    from synthpref.report import ReportError, build_report

    try:
        result = build_report(run_dir)
    except ReportError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"report: {result.markdown} ({len(result.figures)} figures)")


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    repo_id: Annotated[str, typer.Argument(help="dataset repository, e.g. my-org/my-prefs")],
    private: Annotated[bool, typer.Option("--private", help="create the repo as private")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only write the folder that would be uploaded")
    ] = False,
    folder: Annotated[
        Path | None, typer.Option(help="--dry-run's folder (default: RUN_DIR/hub-upload)")
    ] = None,
    fmt: Annotated[
        list[str] | None,
        typer.Option("--format", help="format to upload (repeatable; default: the run's formats)"),
    ] = None,
    license: Annotated[str, typer.Option(help="license id for the card")] = "other",
) -> None:
    """Upload a run to the Hugging Face Hub: Parquet data, dataset card, recipe and report."""
    from synthpref.hub import PushError
    from synthpref.hub import push as push_run

    try:
        result = push_run(
            run_dir, repo_id, private=private, dry_run=dry_run, folder=folder, formats=fmt,
            license=license,
        )  # fmt: skip
    except PushError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    rows = ", ".join(f"{k}: {v}" for k, v in result.formats.items())
    if result.dry_run:
        console.print(f"dry run: {len(result.files)} files in {result.folder} ({rows})")
    else:
        console.print(f"pushed {len(result.files)} files to {result.url} ({rows})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
