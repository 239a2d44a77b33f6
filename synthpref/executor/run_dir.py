"""Which directory a run may write into, and what ``--fresh`` may delete there.

``output.dir`` is a path typed by a person, and a run deletes and rewrites files in it. So before
anything is created or removed: the directory must not be the filesystem root, the home directory,
the recipe's own directory or a directory that holds the recipe or the prompt source, and it must be
new, empty, or a synthpref run (its ``run.json`` says so, see ``run_meta``). ``--fresh`` then removes
only the files a run writes (checkpoints, caches, the summary and the exported dataset) and refuses,
deleting nothing, when ``data/`` or ``checkpoints/`` holds anything else.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from synthpref.errors import DataError
from synthpref.executor.run_meta import RunInfo, RunMetaError, load
from synthpref.executor.worker_cache import WORKER_CACHE_DIR

#: files in the run dir's top level that belong to the run and go with --fresh
FRESH_FILES = ("cache.sqlite", "cache.sqlite-wal", "cache.sqlite-shm", "summary.json")
#: directories wholly written by the run
FRESH_DIRS = ("checkpoints", WORKER_CACHE_DIR)
DATA_DIR = "data"

_STAGE_DIR = re.compile(r"\d{2}-.+-[0-9a-f]{12}")
_CHECKPOINT_FILE = re.compile(r"(shard-\d{5}\.parquet(\.corrupt)?|\.tmp-.*)")


class RunDirError(DataError, ValueError):
    """A folder that may not be used as a run directory, or cleared by ``--fresh``."""


def is_run_dir(folder: Path) -> bool:
    try:
        return load(folder / "run.json", RunInfo).written_by_synthpref()
    except RunMetaError:
        return False


def check_output_dir(
    run_dir: Path, *, recipe_dir: Path, recipe_file: Path | None, sources: list[Path]
) -> None:
    """Refuse a run dir a run must not write into; creates and changes nothing."""
    target = Path(run_dir).expanduser().resolve()

    def refuse(why: str) -> RunDirError:
        return RunDirError(
            f"refusing to use {run_dir} as the run directory (output.dir or --output): {why}"
        )

    if target == Path(target.anchor):
        raise refuse("it is the filesystem root")
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no HOME and no passwd entry: there is no home directory to protect
        home = None
    if target == home:
        raise refuse("it is the home directory")
    if target == recipe_dir.expanduser().resolve():
        raise refuse("it is the recipe's own directory; name a subdirectory such as runs/NAME")
    for label, path in [("recipe", recipe_file), *(("source", s) for s in sources)]:
        if path is not None and Path(path).expanduser().resolve().is_relative_to(target):
            raise refuse(f"it holds the {label} file {path}; name a directory of its own")
    if target.exists() and not target.is_dir():
        raise refuse("it is not a directory")
    if target.is_dir() and any(target.iterdir()) and not is_run_dir(target):
        raise refuse(
            "it is not empty and is not a synthpref run directory (it has no run.json written "
            "by synthpref); choose a new or empty directory"
        )


def exported_names() -> set[str]:
    """Every file name the export step writes into ``data/`` (finished or temporary)."""
    from synthpref.export import formats

    names = {"records.parquet", "records.parquet.tmp"}
    for fmt in formats():
        names |= {f"{fmt}.parquet", f"{fmt}.jsonl", f"{fmt}.parquet.tmp", f".{fmt}.jsonl.tmp"}
    return names


def _foreign(run_dir: Path) -> list[str]:
    """Entries under ``data/`` and ``checkpoints/`` that no run writes, relative to ``run_dir``."""
    out = []
    data = run_dir / DATA_DIR
    if data.is_dir() and not data.is_symlink():
        known = exported_names()
        out += [p for p in data.iterdir() if p.name not in known or not p.is_file()]
    elif data.exists():
        out.append(data)
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        for stage in checkpoints.iterdir():
            if not (stage.is_dir() and not stage.is_symlink() and _STAGE_DIR.fullmatch(stage.name)):
                out.append(stage)
                continue
            out += [p for p in stage.iterdir() if not _CHECKPOINT_FILE.fullmatch(p.name)]
    elif checkpoints.exists():
        out.append(checkpoints)
    return sorted(p.relative_to(run_dir).as_posix() for p in out)


def clear_for_fresh(run_dir: Path) -> None:
    """Delete what an earlier run wrote, or nothing at all when anything else is in the way."""
    if not run_dir.is_dir():
        return
    foreign = _foreign(run_dir)
    if foreign:
        shown = ", ".join(foreign[:10]) + (
            f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        )
        raise RunDirError(
            f"--fresh: {run_dir} holds files synthpref did not write: {shown}; move them out of "
            "the run directory (nothing was deleted)"
        )
    for name in FRESH_DIRS:
        _remove(run_dir / name)
    for name in FRESH_FILES:
        (run_dir / name).unlink(missing_ok=True)
    data = run_dir / DATA_DIR
    if data.is_dir():
        for path in data.iterdir():
            path.unlink()
        data.rmdir()


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def contained(path: Path, folder: Path) -> Path:
    """``path``, after making sure it resolves to a direct child of ``folder``."""
    if path.resolve().parent != folder.resolve():
        raise RunDirError(f"{path} resolves outside {folder}; refusing to write there")
    return path
