"""Per-row random streams for batched sampling with ``model.generate``.

``generate`` samples every row of a batch from one global random stream, so a row's draws depend on
how many rows precede it and on how long they keep running: the same request would read different
text at another ``batch_size``, with other neighbours, or among a resumed run's cache misses. Here each
row (one sample of one request) owns a ``torch.Generator`` seeded from that request alone, and a final
logits processor draws the row's token from it and leaves every other token at -inf; ``generate`` then
runs greedily and can only pick that token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from synthpref.backends.types import GenerationRequest


def row_seed(request: GenerationRequest, identity: str, sample: int) -> int:
    """Seed of sample ``sample`` of ``request``: its cache key already holds ``params.seed``."""
    src = f"{request.cache_key(identity)}|sample={sample}"
    return int(hashlib.sha256(src.encode()).hexdigest()[:15], 16)


class RowSampler(LogitsProcessor):
    """Temperature and top-p as ``generate`` applies them, then one draw per row from its own stream.

    It must run last and with ``do_sample=False``: ``generate`` puts user processors *before* its own
    temperature/top-p warpers, so those warpers are applied here instead, and the greedy pick that
    follows selects the drawn token. ``output_logits`` is taken before any processor, so top
    log-probabilities still report the model's own distribution.
    """

    def __init__(self, generators: Sequence[torch.Generator], temperature: float, top_p: float):
        self.generators = list(generators)
        self.warpers = LogitsProcessorList()
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(self.generators) != scores.shape[0]:
            raise ValueError(
                f"RowSampler has {len(self.generators)} generators for {scores.shape[0]} rows"
            )
        tokens = _inverse_cdf(self.warpers(input_ids, scores), self.generators)
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(scores.shape[0], device=scores.device), tokens] = 0.0
        return forced


def draw_tokens(
    logits: torch.Tensor, generators: Sequence[torch.Generator], temperature: float, top_p: float
) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab], drawn exactly as :class:`RowSampler` draws
    it inside ``generate`` (the continuous-batching loop samples through this)."""
    return _inverse_cdf(
        RowSampler(generators, temperature, top_p).warpers(None, logits), generators
    )


def _inverse_cdf(scores: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    probs = scores.float().softmax(-1)
    cdf = probs.cumsum(-1)
    # one uniform in (0, 1] per row: inverse-CDF sampling never lands on a zero-probability token
    u = torch.stack([1 - torch.rand((), generator=g, device=g.device) for g in generators])
    # the first token whose cumulative probability reaches u (of the total): the count of tokens
    # below it, as the cdf never decreases (a running sum of non-negative terms)
    at = torch.searchsorted(cdf, u.to(cdf.device)[:, None] * cdf[:, -1:]).squeeze(-1)
    return at.clamp(max=scores.shape[1] - 1)


def row_generators(
    requests: Sequence[GenerationRequest], identity: str, n: int, device: str
) -> list[torch.Generator]:
    """One generator per row ``b * n + s``; an unseeded request (``seed: None``) draws fresh entropy."""
    gens = []
    for req in requests:
        for s in range(n):
            g = torch.Generator(device=device)
            if req.params.seed is None:
                g.seed()
            else:
                g.manual_seed(row_seed(req, identity, s))
            gens.append(g)
    return gens
