"""What a model *is*, cheaply: the identity that keys the request cache and enters run fingerprints.

A path or hub id names a model but does not pin it: a checkpoint retrained in place keeps its path,
and results cached under the path would then be served for weights that never produced them. The
identity computed here covers everything in a model directory that changes outputs, without reading
gigabytes or loading a single tensor:

- weight files (``*.safetensors``, ``*.bin``, ``*.gguf``...) and any other file above
  ``SMALL_FILE_LIMIT``: name, size and ``mtime_ns``; a rewrite in place changes the mtime;
- every other file (``config.json``, ``generation_config.json``, tokenizer files, chat templates,
  remote code): a SHA-256 of its content, since an edit may keep size and mtime resolution coarse;
- in a Hugging Face hub snapshot, files are links to blobs named by their content hash, so the blob
  name is used instead: an exact content identity for free.

A hub id that is not a local directory is resolved through the local hub cache (``refs/<revision>``
names the snapshot a load would use); when nothing is cached, the identity is the id alone and says
so, since the weights are only known once downloaded.

Results are memoised per (path, every file's size, mtime, ctime and inode), so the small files are
only re-read when something in the directory changed, and an identity is never stale in a process.
What the identity itself holds stays portable: a copy of the directory that keeps mtimes (``cp -p``,
``rsync -a``, a hub download) has the same identity, so its cached results are reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

#: files identified by size and mtime rather than content: reading them would take seconds to minutes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
SMALL_FILE_LIMIT = 64 << 20


def model_identity(ref: str, revision: str = "main") -> str:
    """The identity of a model directory, or of a hub id through the local hub cache."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return f"dir:{directory_identity(path)}"
    snapshot = _hub_snapshot(ref, revision)
    if snapshot is not None:
        return f"hub:{ref}@{snapshot.name}:{directory_identity(snapshot)}"
    return f"unresolved:{ref}"


def directory_identity(path: Path) -> str:
    """A hash over every non-hidden file under ``path`` (see the module docstring for what of each)."""
    root = path.resolve()
    listing = tuple(_listing(root))
    return _digest(str(root), listing)


def _listing(root: Path):
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = Path(dirpath) / name
            try:
                st = full.stat()
            except OSError:  # a dangling link (an interrupted hub download): no content to name
                continue
            rel = str(full.relative_to(root))
            # ctime and inode only key the memo: no write, utime or replacement keeps both
            yield rel, str(full.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


@lru_cache(maxsize=64)
def _digest(root: str, listing: tuple[tuple[str, str, int, int, int, int], ...]) -> str:
    entries = []
    for rel, target, size, mtime_ns, _ctime_ns, _ino in listing:
        blob = _hub_blob_name(target)
        if blob is not None:
            entries.append([rel, "blob", blob])
        elif rel.endswith(WEIGHT_SUFFIXES) or size > SMALL_FILE_LIMIT:
            entries.append([rel, "stat", size, mtime_ns])
        else:
            entries.append([rel, "sha256", file_sha256(target)])
    blob = json.dumps(entries, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hub_blob_name(target: str) -> str | None:
    """The content hash a hub cache names a file's blob by, when ``target`` is such a blob."""
    parent = Path(target).parent
    if parent.name == "blobs" and parent.parent.name.startswith(("models--", "datasets--")):
        return Path(target).name
    return None


def _hub_snapshot(repo_id: str, revision: str) -> Path | None:
    """The snapshot directory a load of ``repo_id`` at ``revision`` would use, from the hub cache."""
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return None
    repo = Path(HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None
