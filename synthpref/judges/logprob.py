"""Helpers the teacher-forced (log-prob) judges share: failure isolation, failed judgments, the
judged conversation, YAML data files a recipe names, and content hashes of judge configuration.

Used by ``density_ratio.py`` (CDR) and ``followup.py`` (FLR); see docs/judges-logprob.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

from synthpref.backends.base import RequestError
from synthpref.backends.client import ModelClient
from synthpref.backends.types import ScoreRequest, ScoreResult
from synthpref.records import Judgment, Message, Record
from synthpref.stages.base import Stage
from synthpref.templates import find_recipe_file

R = TypeVar("R")
T = TypeVar("T")


def content_hash(obj: Any) -> str:
    """16 hex digits identifying a piece of judge configuration (as template hashes do)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_yaml_file(path: str, base_dir: str | Path | None = None) -> Any:
    """A YAML data file a recipe names, found by the recipe path rule (beside it, then shipped)."""
    return _read_yaml(find_recipe_file(path, base_dir))


@lru_cache(maxsize=64)
def _read_yaml(found: Path) -> Any:
    try:
        return yaml.safe_load(found.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{found} is not valid YAML: {exc}") from exc


async def isolated(
    call: Callable[[list[R]], Awaitable[Sequence[T]]], requests: list[R]
) -> list[T | str]:
    """Answer every request in one ``call``; when the call fails because of some of them, split it
    in halves until the failing requests are alone, and return their error text in their place.

    Only a :class:`RequestError` (the request's own content: over the context window, no token to
    score, input the server rejects) is isolated this way. Anything else (a rate limit, a server
    down, a misconfigured backend, a bug) propagates and stops the shard: recorded as failed
    judgments it would be checkpointed and never retried. Work finished before a failure is in the
    request cache, so the retries recompute nothing.
    """
    if not requests:
        return []
    try:
        return list(await call(requests))
    except RequestError as exc:
        if len(requests) == 1:
            return [f"{type(exc).__name__}: {exc}"]
    half = len(requests) // 2
    first = await isolated(call, requests[:half])
    return first + await isolated(call, requests[half:])


async def score_isolated(
    client: ModelClient, requests: list[ScoreRequest]
) -> list[ScoreResult | str]:
    """:func:`isolated` over the client's teacher-forced ``score``."""
    return await isolated(client.score, requests)


def failed_judgment(judge: str, record: Record, cand_id: str, why: str, **fields: Any) -> Judgment:
    return Judgment(
        judge=judge,
        candidate_ids=[cand_id],
        status="failed",
        error=f"record {record.id!r} candidate {cand_id!r}: {why}",
        **fields,
    )


def record_failed(
    stage: Stage, record: Record, cand_id: str, why: str, counter: str | None = None, **fields: Any
) -> None:
    """Append ``stage``'s failed judgment of one candidate and count it under ``failed`` (and
    ``counter``, e.g. ``empty_response``, when given)."""
    stage.counters["failed"] += 1
    if counter:
        stage.counters[counter] += 1
    record.judgments.append(failed_judgment(stage.name, record, cand_id, why, **fields))


def judged_response(record: Record, text: str) -> list[Message]:
    """The record's conversation with the candidate as the assistant's reply."""
    return [*record.prompt, Message(role="assistant", content=text)]
