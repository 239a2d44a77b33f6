"""Run and stage fingerprints: what identifies work that can be reused.

The chain is input -> stage 1 -> stage 2 ...: each stage's fingerprint hashes the previous one with the
stage's result-affecting parameters, the result-affecting fields and weights identity of the models it
calls (``ModelSpec.fingerprint``), and anything else it declares (template hashes). Changing a late
stage therefore reuses every earlier checkpoint, and settings marked volatile (concurrency, batch
sizes) never invalidate anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from synthpref.backends.specs import ModelSpec, fingerprint_fields
from synthpref.records import Record
from synthpref.stages.base import Stage


def digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def record_blob(record: Record) -> bytes:
    """What of a record the input fingerprint covers: its id, prompt and metadata, and its
    pre-filled candidates (eval-judges), which are input too; records without any hash as before."""
    fields = {"id", "prompt", "metadata"} | ({"candidates"} if record.candidates else set())
    return record.model_dump_json(include=fields).encode()


class InputHasher:
    """The input fingerprint computed as records stream past, one at a time, so the input never
    needs to be in memory at once; equal to :func:`input_fingerprint` of the same records."""

    def __init__(self, shard_size: int) -> None:
        self._h = hashlib.sha256(str(shard_size).encode())

    def add(self, blob: bytes) -> None:
        """One record's :func:`record_blob`, in input order."""
        self._h.update(blob)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def input_fingerprint(records: Iterable[Record], shard_size: int) -> str:
    h = InputHasher(shard_size)
    for r in records:
        h.add(record_blob(r))
    return h.hexdigest()


def stage_fingerprints(
    input_fp: str, stages: list[Stage], models: dict[str, ModelSpec]
) -> list[str]:
    out, prev = [], input_fp
    for stage in stages:
        prev = digest(
            {
                "prev": prev,
                "type": stage.type_name,
                "name": stage.name,
                "params": fingerprint_fields(stage.params),
                "models": {m: models[m].fingerprint() for m in stage.models_used()},
                "extra": stage.fingerprint(),
            }
        )
        out.append(prev)
    return out
