"""The ``synthpref`` command line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from synthpref.console import literal, say

app = typer.Typer(
    help="Build synthetic preference datasets (DPO, KTO, reward models) from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", exists=False)]


@contextmanager
def _errors() -> Iterator[None]:
    """End the command on a failure synthpref detected: its message, a non-zero exit, no traceback.

    Those are :class:`~synthpref.errors.SynthprefError` and every other exception class defined in
    synthpref (each names the file, YAML path, row or field at fault). Anything else is a bug and
    keeps its traceback. A recipe problem exits with 2, everything else with 1."""
    from synthpref.recipes.loader import RecipeError

    try:
        yield
    except RecipeError as exc:
        say(console, exc, style="red")
        raise typer.Exit(2) from None
    except Exception as exc:
        if not _is_synthpref_error(exc):
            raise
        say(console, exc, label="error:", style="red")
        raise typer.Exit(1) from None


def _is_synthpref_error(exc: BaseException) -> bool:
    from synthpref.errors import SynthprefError

    module = type(exc).__module__ or ""
    return (
        isinstance(exc, SynthprefError) or module == "synthpref" or module.startswith("synthpref.")
    )


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
    import synthpref
    from synthpref.executor import EXECUTORS

    if executor not in EXECUTORS:
        raise typer.BadParameter(f"choose one of {', '.join(EXECUTORS)}", param_hint="--executor")
    if executor != "ray" and (address is not None or workers is not None):
        raise typer.BadParameter("--address and --workers need --executor ray")
    with _errors():
        result = synthpref.run(
            recipe,
            fresh=fresh,
            output=output,
            progress=progress,
            executor=executor,
            address=address,
            workers=workers,
            console=console,
        )
    print_summary(result, console)


def print_summary(result, console: Console) -> None:
    """The run's table of stages, its counters and output files; names are printed literally."""
    table = Table(title=literal(f"synthpref run · {result.run_dir}"), title_justify="left")
    for col in ("stage", "in", "out", "resumed", "calls", "cached", "tokens", "time"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in result.stages:
        table.add_row(
            literal(s.name),
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
            say(console, f"  {s.name}: {counts}")
    if result.input_errors:
        say(
            console,
            f"{len(result.input_errors)} malformed input row(s) skipped; "
            f"see {result.run_dir / 'errors.jsonl'}",
            style="yellow",
        )
    for name, path in result.outputs.items():
        say(console, f"{name}: {path}")
    say(console, f"done in {result.seconds:.1f}s")


@app.command()
def validate(recipe: RecipeArg) -> None:
    """Check a recipe without running anything: schema, models, stages, capabilities, what its
    output formats need, and its models' API keys."""
    from synthpref.checks import checked_recipe

    with _errors():
        loaded, warnings = checked_recipe(recipe, for_run=False)
    for warning in warnings:
        say(console, warning, label="warning:", style="yellow")
    stages = ", ".join(f"{s.name} ({s.type_name})" for s in loaded.stages)
    say(
        console,
        f"{recipe}: {len(loaded.models)} model(s); stages: {stages}",
        label="ok",
        style="green",
    )


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
        out.print(f"[bold]{escape(name)}[/] ({info['kind']}) {escape(info['doc'])}")
        for p, d in info["params"].items():
            say(out, f"    {p}: {d['type']} = {d['default']}  {d['help']}")


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
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        out.print(f"[bold]{escape(name)}[/]: {escape(doc)}")
        for p, d in _params(cls).items():
            if p != "backend":
                say(out, f"    {p}: {d['type']} = {d['default']}  {d['help']}")


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
    from synthpref.evaluation import evaluate_judges
    from synthpref.evaluation.report import print_report
    from synthpref.recipes.loader import load_recipe

    with _errors():
        loaded = load_recipe(
            recipe
        )  # no run checks: its self-preference warnings concern generators
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
    print_report(result.report, out, result.files)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a finished run directory")]) -> None:
    """Write the run report (Markdown, JSON and PNG figures) into RUN_DIR/report/."""
    from synthpref.report import build_report

    with _errors():
        result = build_report(run_dir)
    say(console, f"report: {result.markdown} ({len(result.figures)} figures)")


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
    records: Annotated[
        bool,
        typer.Option(
            "--records",
            help="also upload data/records.parquet (candidates, raw judge output); its metadata "
            "(the source's other columns) is emptied unless --keep-metadata",
        ),
    ] = False,
    keep_metadata: Annotated[
        bool, typer.Option("--keep-metadata", help="with --records: keep the source's columns")
    ] = False,
    drop_column: Annotated[
        list[str] | None,
        typer.Option(
            "--drop-column",
            help="leave a column out of every uploaded file (repeatable, or a,b); metadata.KEY "
            "leaves one source column out of the kept metadata",
        ),
    ] = None,
) -> None:
    """Upload a run to the Hugging Face Hub: Parquet data, dataset card, recipe and report.

    Only the dataset formats are uploaded unless --records is given; the card lists every file and
    column that was uploaded."""
    from synthpref.hub import push as push_run

    with _errors():
        result = push_run(
            run_dir, repo_id, private=private, dry_run=dry_run, folder=folder, formats=fmt,
            license=license, records=records, keep_metadata=keep_metadata,
            drop_columns=drop_column or [],
        )  # fmt: skip
    rows = ", ".join(f"{k}: {v}" for k, v in result.formats.items())
    if result.dry_run:
        say(console, f"dry run: {len(result.files)} files in {result.folder} ({rows})")
    else:
        say(console, f"pushed {len(result.files)} files to {result.url} ({rows})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
