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
        return load_recipe(recipe)
    except RecipeError as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(2) from None


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
) -> None:
    """Run a recipe. Rerunning the same command resumes where it stopped."""
    from synthpref.executor.local import LocalExecutor, RunError
    from synthpref.sources import SourceError

    loaded = _load(recipe)
    executor = LocalExecutor(
        loaded, run_dir=output, fresh=fresh, console=console, progress=progress
    )
    try:
        result = executor.run()
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
