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
from typing import Any

from synthpref.backends.specs import ModelSpec, fingerprint_fields
from synthpref.records import Record
from synthpref.stages.base import Stage


def digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def input_fingerprint(records: list[Record], shard_size: int) -> str:
    h = hashlib.sha256(str(shard_size).encode())
    for r in records:
        # pre-filled candidates (eval-judges) are input too; records without any hash as before
        fields = {"id", "prompt", "metadata"} | ({"candidates"} if r.candidates else set())
        h.update(r.model_dump_json(include=fields).encode())
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
