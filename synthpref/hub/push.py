"""Upload a finished run as a Hub dataset: Parquet per format, a dataset card, the recipe, the report.

Everything is checked and the upload folder is assembled before the first request: an incomplete or
damaged run directory, data that does not belong to the run that ``run.json`` names (a rerun of an
edited recipe that did not finish) or that changed after it was exported, a malformed repository id,
an unknown format, a format that needs scores (or pairs, or rankings) the run did not produce, or a
missing token stop the push with a clear error and nothing is sent. The full records and the source's
columns are uploaded only when asked (``select.py``); the card lists every uploaded file and column.
The upload goes through ``huggingface_hub`` itself (``create_repo`` then ``upload_folder``);
``HF_ENDPOINT`` selects another Hub. ``dry_run`` writes the folder that would be uploaded and stops.

The token comes from ``HF_TOKEN`` or the saved ``hf auth login``; it is handed to ``huggingface_hub``
only, never written to a file, and the assembled folder is scanned for it before uploading.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from synthpref.hub.errors import PushError
from synthpref.hub.select import UploadedFile, UploadSelection, check_columns, write_table
from synthpref.report import CheckedRun, ReportError, build_report, check_run_dir

DEFAULT_FOLDER = "hub-upload"


@dataclass
class PushResult:
    repo_id: str
    folder: Path | None
    files: list[str]
    formats: dict[str, int]
    url: str | None = None
    commit: str | None = None
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"malformed repository id {repo_id!r}: {exc}") from None


def _checked(run_dir: Path) -> CheckedRun:
    """The run, verified (fingerprints agree, data unchanged since export) before anything is
    written or uploaded."""
    try:
        return check_run_dir(run_dir, require_digests=True)
    except ReportError as exc:
        raise PushError(str(exc)) from None


def _run_formats(summary) -> list[str]:
    return [n for n in summary.outputs if n != "records"]


def stage_folder(
    run_dir: Path,
    repo_id: str,
    folder: Path,
    formats: list[str] | None = None,
    license: str = "other",
    choice: UploadSelection | None = None,
    checked: CheckedRun | None = None,
) -> PushResult:
    """Assemble exactly what would be uploaded into ``folder`` (which must be empty or absent);
    ``checked``: the run as ``check_run_dir`` already verified it (else it is checked here)."""
    import pyarrow.parquet as pq

    from synthpref.export import formats as registered
    from synthpref.export.needs import missing_data
    from synthpref.hub.card import build_card
    from synthpref.report.collect import iter_records

    check_repo_id(repo_id)
    choice = choice or UploadSelection()
    run_dir = Path(run_dir)
    run, summary = checked or _checked(run_dir)
    wanted = list(dict.fromkeys(formats)) if formats else _run_formats(summary)
    known = registered()
    unknown = [f for f in wanted if f not in known]
    if unknown:
        raise PushError(
            f"unknown format(s) {', '.join(map(repr, unknown))}; available: {', '.join(sorted(known))}"
        )
    if not wanted:
        raise PushError(f"{run_dir} wrote no dataset format; name one with --format")
    records_path = run_dir / "data" / "records.parquet"
    try:
        missing = missing_data(wanted, iter_records(records_path))
    except (OSError, ValueError) as exc:
        raise PushError(f"{records_path}: cannot read its records: {exc}") from None
    if missing:
        raise PushError("; ".join(missing.values()))
    schemas = {
        name: pq.read_schema(run_dir / "data" / f"{name}.parquet")
        if (run_dir / "data" / f"{name}.parquet").is_file()
        else known[name][1]
        for name in wanted
    }
    if choice.records:
        schemas["records"] = pq.read_schema(records_path)
    check_columns(choice, schemas)

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    data.mkdir()
    uploaded: list[UploadedFile] = []
    for name in wanted:
        source = run_dir / "data" / f"{name}.parquet"
        if not source.is_file():  # a format the run did not write: built from the records
            source = folder / f".build-{name}.parquet"
            _build_format(name, known[name], records_path, source)
        target = data / f"{name}.parquet"
        uploaded.append(write_table(source, target, f"data/{name}.parquet", name, choice))
        if source.parent == folder:
            source.unlink()
    if choice.records:
        uploaded.append(
            write_table(records_path, data / "records.parquet", "data/records.parquet", "records",
                        choice, records=True)
        )  # fmt: skip

    recipe = run.recipe
    (folder / "recipe.yaml").write_text(
        yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
    try:
        report = build_report(run_dir, out_dir=folder / "report", checked=CheckedRun(run, summary))
    except ReportError as exc:
        raise PushError(str(exc)) from None
    card = build_card(
        repo_id,
        uploaded,
        recipe,
        report.card_markdown(image_prefix="report/", heading=2),
        license=license,
        fingerprint=run.fingerprint or "",
    )
    (folder / "README.md").write_text(card, encoding="utf-8")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    rows = {f.config: f.rows for f in uploaded}
    return PushResult(repo_id, folder, files, rows)


def _build_format(name: str, entry, records_path: Path, target: Path) -> None:
    """Write a format the run did not write, from the run's records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synthpref.report.collect import iter_records

    builder, schema = entry
    with pq.ParquetWriter(target, schema) as writer:
        batch: list[dict] = []
        for record in iter_records(records_path):
            batch.extend(builder(record))
            if len(batch) >= 1024:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


def _scan_for_secret(folder: Path, secret: str) -> None:
    needle = secret.encode()
    for path in folder.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            raise PushError(
                f"refusing to upload: {path.relative_to(folder)} contains the Hugging Face token"
            )


def push(
    run_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    folder: Path | None = None,
    formats: list[str] | None = None,
    license: str = "other",
    token: str | None = None,
    endpoint: str | None = None,
    records: bool = False,
    keep_metadata: bool = False,
    drop_columns: list[str] | None = None,
) -> PushResult:
    """Check the run, assemble the upload and send it (or only write it: ``dry_run``). ``records``,
    ``keep_metadata`` and ``drop_columns`` choose what leaves the machine (see ``select.py``)."""
    from synthpref.hub.select import selection

    run_dir = Path(run_dir)
    check_repo_id(repo_id)
    choice = selection(
        records=records, keep_metadata=keep_metadata, drop_columns=drop_columns or []
    )
    checked = _checked(run_dir)
    if dry_run:
        target = Path(folder) if folder else run_dir / DEFAULT_FOLDER
        if target.exists():
            if folder is not None and any(target.iterdir()):
                raise PushError(
                    f"{target} exists and is not empty; remove it or choose another folder"
                )
            shutil.rmtree(target)
        try:
            result = stage_folder(run_dir, repo_id, target, formats, license, choice, checked)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        result.dry_run = True
        return result

    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run to only "
            "write the folder)"
        )
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    with tempfile.TemporaryDirectory(prefix="synthpref-push-") as tmp:
        staged = Path(tmp) / "upload"
        result = stage_folder(run_dir, repo_id, staged, formats, license, choice, checked)
        _scan_for_secret(staged, token)
        result.url, result.commit = _upload(staged, repo_id, private, token, endpoint, result)
        result.folder = None
    return result


def _upload(folder: Path, repo_id: str, private: bool, token: str, endpoint: str | None, result):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        formats = ", ".join(f for f in result.formats if f != "records")
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=folder,
            commit_message=f"Upload synthpref dataset ({formats})",
        )
    except Exception as exc:  # hub HTTP errors, connection errors: all stop the push
        message = str(exc).replace(token, "***")
        raise PushError(
            f"upload to {api.endpoint} failed: {type(exc).__name__}: {message}"
        ) from None
    return str(repo_url), getattr(commit, "oid", None)
