"""The ``synthpref`` command line.

One module because each command is a thin layer over the library (``synthpref.run``/``validate``,
the registries, ``report``, ``hub``): what stays here is its options and help texts, how its result
is printed, and the one error handler they all share, which read best side by side.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, get_origin

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

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
JsonFlag = Annotated[bool, typer.Option("--json", help="machine-readable output")]


@contextmanager
def _errors() -> Iterator[None]:
    """End the command on a failure synthpref detected: its message, a non-zero exit, no traceback.

    Those are the :class:`~synthpref.errors.SynthprefError` subclasses (each names the file, YAML
    path, row or field at fault); a :class:`~synthpref.errors.ConfigError` (the recipe or an option)
    exits with 2, a :class:`~synthpref.errors.RunPaused` (a clean stop the same command resumes: a
    spending cap reached, batch jobs still running) with 3, everything else with 1. Any other
    exception is a bug and keeps its traceback."""
    from synthpref.errors import ConfigError, RunPaused, SynthprefError
    from synthpref.recipes.loader import RecipeError

    try:
        yield
    except SynthprefError as exc:
        # a RecipeError's message starts "invalid recipe <file>:" and lists its problems below
        if isinstance(exc, RunPaused):
            say(console, exc, label="paused:", style="yellow")
            raise typer.Exit(3) from None
        label = "" if isinstance(exc, RecipeError) else "error:"
        say(console, exc, label=label, style="red")
        raise typer.Exit(2 if isinstance(exc, ConfigError) else 1) from None


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
    wait: Annotated[
        bool | None,
        typer.Option(
            "--wait/--no-wait",
            help="mode: batch models: wait for the provider's jobs, or submit and stop (exit 3; "
            "rerun to collect); default: settings.batch.wait",
        ),
    ] = None,
) -> None:
    """Run a recipe. Rerunning the same command resumes where it stopped (with either executor).

    Exit status: 0 done, 1 failed, 2 the recipe or options are wrong, 3 stopped cleanly before the
    end (spending cap reached, batch jobs still running): the same command resumes."""
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
            batch_wait=wait,
        )
    print_summary(result, console)


def print_summary(result, console: Console) -> None:
    """The run's table of stages, its counters and output files; names are printed literally.

    A ``cost`` column and a total line appear when this invocation's model calls cost money; the
    run directory's total over every invocation (from its request cache) is added when known, so a
    resumed run that cost nothing new still says what the directory has cost."""
    from synthpref.executor.run_meta import format_usd, read_spend

    dollars = sum(getattr(s, "dollars", 0.0) for s in result.stages)
    columns = ["stage", "in", "out", "resumed", "calls", "cached", "tokens", "time"]
    if dollars:
        columns.insert(-1, "cost")
    # the run directory on a line of its own: a table title is wrapped to the table's width,
    # which broke a long path inside a name
    say(console, f"synthpref run · {result.run_dir}")
    table = Table()
    for col in columns:
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in result.stages:
        row = [
            literal(s.name),
            str(s.records_in),
            str(s.records_out),
            str(s.shards_resumed),
            str(s.calls),
            str(s.cache_hits),
            str(s.tokens),
            f"{s.seconds:.1f}s",
        ]
        if dollars:
            row.insert(-1, format_usd(s.dollars) if getattr(s, "models", None) else "")
        table.add_row(*row)
    console.print(table)
    for s in result.stages:
        if s.counters:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(s.counters.items()))
            say(console, f"  {s.name}: {counts}")
    spend = read_spend(result.run_dir)
    total = spend.dollars if spend is not None else None
    if dollars or total:
        line = f"cost: {format_usd(dollars)} in this invocation (cache hits cost nothing)"
        if total is not None and abs(total - dollars) > 1e-9:
            line += f"; {format_usd(total)} for this run directory in all"
        say(console, line)
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
def estimate(
    recipe: RecipeArg,
    pilot: Annotated[
        int, typer.Option("--pilot", min=1, help="prompts run for real to project from")
    ] = 10,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="run directory (overrides output.dir)")
    ] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Project a run's calls, tokens, dollars (online and batch) and time from a pilot of its first
    prompts, run for real online in a scratch directory on the run directory's request cache (the
    full run reuses those calls; its checkpoints and data are not touched)."""
    from synthpref.estimate import estimate as run_estimate
    from synthpref.estimate import render

    with _errors():
        est = run_estimate(recipe, pilot=pilot, output=output, console=console, progress=progress)
    render(est, console)


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
def stages(as_json: JsonFlag = False) -> None:
    """List every stage and judge, built-in and from installed plugins, with its parameters."""
    from synthpref.stages.registry import STAGES

    _list(
        STAGES,
        lambda cls: {"kind": cls.kind, "doc": _doc_line(cls), "params": _params(cls.Params)},
        {"kind": None, "doc": "", "params": {}},
        lambda info: f" ({info['kind']}) {info['doc']}",
        "params",
        as_json=as_json,
    )


def _params(model) -> dict:
    """Each field of a pydantic model: its type (with a Literal's choices), default and help."""
    out_ = {}
    for name, field in model.model_fields.items():
        default = (
            field.get_default(call_default_factory=True)
            if not field.is_required()
            else "(required)"
        )
        annotation = field.annotation
        if get_origin(annotation) is not None or not hasattr(annotation, "__name__"):
            text = str(annotation)  # Literal['a', 'b'], int | None, list[str]...
        else:
            text = annotation.__name__
        out_[name] = {
            "type": text.replace("typing.", ""),
            "default": default
            if isinstance(default, str | int | float | bool | list | dict | type(None))
            else str(default),
            "help": field.description or "",
        }
    return out_


def _doc_line(obj: object) -> str:
    doc = (obj.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def _list(registry, describe, empty: dict, headline, details: str, *, as_json: bool) -> None:
    """Every entry of ``registry`` as JSON, or one headline each with its ``details`` (parameters
    or columns) below it; see :func:`_catalogue` and :func:`_print_catalogue`."""
    catalogue = _catalogue(registry.items(), describe, empty)
    if as_json:
        out.print_json(json.dumps(catalogue))
    else:
        _print_catalogue(catalogue, headline, details)


def _catalogue(entries, describe, empty: dict) -> dict:
    """Name -> description of every registry entry; one that fails to load keeps ``empty``'s keys
    and says why in ``error``, with the package it came from in ``source``."""
    catalogue = {}
    for entry in entries:
        info = describe(entry.obj) if entry.obj is not None else dict(empty)
        catalogue[entry.name] = {
            **info,
            "source": entry.source,
            "error": entry.error,
            "shadowed": list(entry.shadowed),
        }
    return catalogue


def _print_catalogue(catalogue: dict, headline, details: str) -> None:
    """Human-readable listing; names, docs and plugin text are printed literally (never markup)."""
    for name, info in catalogue.items():
        line = Text(name, style="bold")
        if info["error"]:
            line.append(f" ({info['source']}): ", style="red")
            line.append(info["error"], style="red")
            out.print(line, soft_wrap=True, highlight=False)
            continue
        line.append(headline(info))
        if info["source"] != "built-in":
            line.append(f"  [{info['source']}]", style="dim")
        out.print(line, soft_wrap=True, highlight=False)
        for key, d in info[details].items():
            if isinstance(d, dict):
                say(out, f"    {key}: {d['type']} = {d['default']}  {d['help']}")
            else:
                say(out, f"    {key}: {d}")
        for note in info["shadowed"]:
            say(out, f"    {note}", style="yellow")


@app.command()
def backends(as_json: JsonFlag = False) -> None:
    """List the model backends a recipe can name (built-in and plugins) with their settings."""
    from synthpref.backends.specs import BACKENDS

    _list(
        BACKENDS,
        lambda cls: {
            "doc": _doc_line(cls),
            "params": {k: v for k, v in _params(cls).items() if k != "backend"},
        },
        {"doc": "", "params": {}},
        lambda info: f": {info['doc']}",
        "params",
        as_json=as_json,
    )


@app.command()
def formats(as_json: JsonFlag = False) -> None:
    """List the dataset formats output.formats can name (built-in and plugins) with their columns."""
    from synthpref.export import FORMATS

    _list(
        FORMATS,
        lambda fmt: {"doc": fmt.description, "columns": fmt.columns()},
        {"doc": "", "columns": {}},
        lambda info: f": {info['doc']}",
        "columns",
        as_json=as_json,
    )


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
