"""What a model's tokens cost: a price per spec, from the spec's ``price:`` or the shipped table.

The table (``prices.yaml`` beside this module) carries the date its prices were read; a spec's
``price:`` overrides it, and a self-hosted server (``base_url`` set) or a local model costs nothing
unless its spec names a price. Dollars are computed from a result's :class:`Usage` (what the
provider billed: uncached, cache-read and cache-written prompt tokens, output tokens, batch or not),
never from estimates, except where a cap must be checked before a request is sent
(:mod:`synthpref.backends.cost`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from synthpref.backends.types import Usage

TABLE = Path(__file__).with_name("prices.yaml")


class Price(BaseModel):
    """US dollars per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0, description="uncached prompt tokens, $ per million")
    output: float = Field(ge=0, description="generated tokens (reasoning included), $ per million")
    cached_input: float | None = Field(
        None, ge=0, description="prompt tokens read from the provider's cache; unset: input"
    )
    cache_write: float | None = Field(
        None, ge=0, description="prompt tokens written to the provider's cache; unset: input"
    )
    batch_discount: float = Field(
        0.5, gt=0, le=1, description="multiplier on every rate for batch-API requests"
    )

    def cost(self, usage: Usage) -> float:
        """Dollars for one request's ``usage``."""
        cached = self.input if self.cached_input is None else self.cached_input
        write = self.input if self.cache_write is None else self.cache_write
        dollars = (
            usage.input_tokens * self.input
            + usage.cached_input_tokens * cached
            + usage.cache_write_tokens * write
            + usage.output_tokens * self.output
        ) / 1e6
        return dollars * (self.batch_discount if usage.batch else 1.0)

    def ceiling(self, prompt_tokens: int, output_tokens: int, batch: bool = False) -> float:
        """The most a request may cost before it is sent: every prompt token at the highest prompt
        rate, every allowed output token at the output rate."""
        top = max(self.input, self.cached_input or 0.0, self.cache_write or 0.0)
        dollars = (prompt_tokens * top + output_tokens * self.output) / 1e6
        return dollars * (self.batch_discount if batch else 1.0)


@lru_cache(maxsize=1)
def shipped_table() -> dict:
    return yaml.safe_load(TABLE.read_text())


def table_date() -> str:
    return str(shipped_table()["as_of"])


def shipped_price(provider: str, model: str) -> Price | None:
    """The table's price of ``model`` at ``provider`` (``openai``, ``anthropic``): the longest
    listed name that ``model`` equals or starts with followed by ``-`` (a dated snapshot), else
    None."""
    rows = shipped_table().get(provider) or {}
    best = None
    for name in rows:
        if (model == name or model.startswith(name + "-")) and (
            best is None or len(name) > len(best)
        ):
            best = name
    return None if best is None else Price(**rows[best])
