"""Files that are either wholly the new version or wholly the old one, even across a power cut.

Everything a run keeps (checkpoints, ``run.json``, ``summary.json``, ``errors.jsonl``) is written to a
temporary file next to its final name, flushed to the disk, renamed over the final name, and then the
directory itself is flushed so the rename survives. Without the two ``fsync`` calls a crash can leave
a renamed file whose blocks never reached the disk: a zero-length or truncated checkpoint that every
later resume would trip over.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], *, suffix: str = "") -> None:
    """Call ``write`` on a temporary file next to ``path``, then move it into place durably.

    If ``write`` raises, the temporary file is removed and ``path`` is left exactly as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json(path: Path, obj: Any, **dumps: Any) -> None:
    """``obj`` as JSON (indented unless told otherwise); serialised in full before anything is
    written, so an object that fails to serialise leaves the old file untouched."""
    dumps.setdefault("indent", 2)
    write_text(path, json.dumps(obj, **dumps))


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """One JSON value per line, streamed into the temporary file."""

    def write(fh: IO[bytes]) -> None:
        for row in rows:
            fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))

    write_atomic(path, write)
