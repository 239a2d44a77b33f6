"""The recipe: a YAML file that declares sources, models, stages and outputs.

Validation happens in two passes. The first checks the recipe's own shape (this module). The second
(``recipes.loader``) checks each model against its backend's spec and each stage against its parameter
model, since those are open sets that plugins extend. Both report the YAML path of every problem.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from synthpref.backends.specs import VOLATILE
from synthpref.recipes.numbers import RecipeNumbers

STAGE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class _Strict(RecipeNumbers):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    """Where prompts come from: a local file (JSONL, JSON, Parquet, CSV), a datasets dataset, or
    ``seeds``: empty records for a prompt-writing stage (Magpie, personas) to fill."""

    path: str | None = Field(None, description="a .jsonl/.json/.parquet/.csv file")
    dataset: str | None = Field(
        None, description="a Hugging Face dataset name or a local dataset directory"
    )
    split: str = "train"
    config: str | None = Field(None, description="dataset configuration name")
    prompt_field: str = Field("prompt", description="a string, or a list of chat messages")
    id_field: str | None = Field(
        None, description="column with stable ids; default: a hash of the prompt"
    )
    limit: int | None = Field(
        None, ge=1, description="use only the first N usable rows (reading stops there)"
    )
    seeds: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="no input: N empty records (ids seed-000000, ...) whose prompts the recipe's "
        "first stage writes (a prompt-writing stage such as magpie or persona_prompts)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> SourceSpec:
        given = [k for k in ("path", "dataset", "seeds") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'path', 'dataset' or 'seeds'"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class StageSpec(RecipeNumbers):
    """One stage: its ``type``, an optional unique ``name``, and the stage's own parameters.

    The name becomes part of checkpoint directories and candidate ids, hence a plain word: letters,
    digits, ``_``, ``-`` and ``.``, never a path separator or ``..``.
    """

    model_config = ConfigDict(extra="allow")

    type: str
    name: str | None = Field(None, description="letters, digits, '_', '-', '.'; default: the type")

    @field_validator("name")
    @classmethod
    def _plain_word(cls, name: str | None) -> str | None:
        if name is not None and (not STAGE_NAME.fullmatch(name) or ".." in name):
            raise ValueError(
                f"{name!r} is not a plain stage name: use letters, digits, '_', '-' and '.' "
                "(no path separator, no '..', no spaces); it names checkpoint folders"
            )
        return name

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OutputSpec(_Strict):
    dir: str = Field(description="run directory: checkpoints, cache, dataset and report")
    formats: list[str] = Field(default_factory=lambda: ["preference"])
    include_reasoning: bool = Field(
        False,
        description="export a reasoning model's reasoning before its answer, as "
        "'<think>{reasoning}</think>\\n{answer}'; default: the answer alone",
    )


class BatchSettings(_Strict):
    """How a run with ``mode: batch`` models waits for their provider batch jobs."""

    wait: bool = Field(
        True,
        description="wait (polling) until every batch job has ended; false: submit, stop (exit "
        "3), and let a later run collect",
    )
    poll_seconds: float = Field(
        30.0, gt=0, le=3600, description="seconds between two checks of the pending batch jobs"
    )


class Settings(_Strict):
    shard_size: int = Field(
        64,
        ge=1,
        le=1_000_000,
        description="records per shard (the unit of checkpointing); part of the fingerprint "
        "because local backends batch within a shard",
    )
    on_error: Literal["skip", "stop"] = Field(
        "skip", description="a malformed input row is skipped and logged, or stops the run"
    )
    max_concurrent_shards: int = Field(2, ge=1, le=1024, json_schema_extra=VOLATILE)
    max_cost_usd: float | None = Field(
        None,
        gt=0,
        description="stop cleanly before the run directory's model calls would cost more than "
        "this many US dollars (prices: each model spec's price, or the shipped table); a rerun "
        "with a higher cap resumes",
        json_schema_extra=VOLATILE,
    )
    batch: BatchSettings = Field(default_factory=BatchSettings, json_schema_extra=VOLATILE)


class Recipe(_Strict):
    name: str = "synthpref"
    description: str = ""
    source: SourceSpec
    models: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="model name -> spec ({backend: embedded|transformers|openai|vllm, ...})",
    )
    stages: list[StageSpec] = Field(min_length=1)
    output: OutputSpec
    settings: Settings = Settings()

    base_dir: Path = Field(Path("."), exclude=True, description="resolve relative paths from here")

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p
