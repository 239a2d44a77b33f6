"""Continuous batching for the transformers backend: rows join and leave a running batch between
decode steps, instead of a batch running until its longest row ends.

``model.generate`` keeps every row of a batch in every forward pass until the last one stops, so a
batch whose replies run 11 to 256 tokens spends most of its passes on rows that have already ended
(the quickstart's first shard: 39% of the row-steps computed were tokens anyone kept). Here a row
that ends leaves the batch at once, and rows waiting for a place are prefilled and join the running
batch: the KV caches are left-padded to one length and stacked, and each row keeps its own
positions, so a row computes what it would compute alone. Columns that no remaining row attends to
(the padding of rows that left) are cut off the cache.

Each step is one forward pass of the running rows on their last token, then one draw per row:
greedy, or from the row's own seeded stream (``row_sampling.draw_tokens``, the draw the
``generate`` path makes), so a row's text does not depend on which rows share its steps.

Only a model whose cache is a plain :class:`~transformers.DynamicCache` of full-attention layers can
be stacked this way; :func:`stackable` says whether a cache is one, and the backend falls back to
``model.generate`` for the others (sliding-window, hybrid or recurrent caches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from synthpref.backends.base import CapabilityError


@dataclass
class Row:
    """One sample of one request: its random stream (None: greedy) and what it made."""

    request: int
    sample: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    #: per generated token, (log-probabilities, token ids) of the ``top_k`` most likely
    top: list[tuple[list[float], list[int]]] = field(default_factory=list)
    position: int = 0


@dataclass
class Settings:
    """What every row of one loop shares (the backend groups requests by sampling parameters)."""

    max_tokens: int
    temperature: float
    top_p: float
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()
    top_k: int = 0
    #: most rows in one forward pass
    max_rows: int = 32
    #: rows wait until at least this many places are free (each join costs a prefill pass)
    refill_at: int = 1


#: prefill ``(prompts, n) -> inputs``: ``input_ids`` [rows, width], ``attention_mask`` and, when the
#: prompts share a prefix that ran once, ``past_key_values`` holding it (the backend's layout)
Prefill = Callable[[list[list[int]], int], dict[str, Any]]


def stackable(cache: Any) -> bool:
    """Whether ``cache`` is a DynamicCache of full-attention layers, whose tensors can be padded,
    stacked and cut as this loop does."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(x) is DynamicLayer for x in cache.layers)


class NotStackable(CapabilityError):
    """The model's cache is not one this loop can stack; the backend catches it and generates with
    ``model.generate`` instead, so it never reaches a caller."""


class DecodeLoop:
    """One model's running batch: :meth:`run` takes requests (each ``n`` rows) and calls
    ``on_done(request, rows)`` as soon as all rows of a request have ended."""

    def __init__(
        self,
        model: Any,
        settings: Settings,
        prefill: Prefill,
        tokenizer: Any,
        after_prefill: Callable[[], None] | None = None,
    ) -> None:
        """``after_prefill`` runs after each join (the backend hands freed heap back to the OS
        there: a prefill frees the largest activations)."""
        self.model = model
        self.after_prefill = after_prefill
        self.s = settings
        self.prefill_inputs = prefill
        self.tok = tokenizer
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self._tail = max((len(s) for s in settings.stop_strings), default=0)

    def run(
        self,
        prompts: Sequence[list[int]],
        n: int,
        generators: Sequence[torch.Generator | None],
        on_done: Callable[[int, list[Row]], None],
    ) -> None:
        """Generate ``n`` rows for each prompt, in the order given (the caller sorts by length so
        rows that join together pad little); ``generators[b * n + s]`` draws for sample ``s`` of
        prompt ``b``."""
        pending = list(range(len(prompts)))[::-1]
        left = {b: n for b in range(len(prompts))}
        finished: dict[int, list[Row]] = {}
        while pending or self.rows:
            free = self.s.max_rows - len(self.rows)
            want = min(self.s.refill_at, len(pending) * n)
            if pending and (free >= max(n, want) or not self.rows):
                take = []
                while pending and (len(take) + 1) * n <= max(free, n):
                    take.append(pending.pop())
                new = [Row(b, s, generators[b * n + s]) for b in take for s in range(n)]
                self._join(new, [prompts[b] for b in take], n)
            else:
                self._step()
            for row in self._leave():
                finished.setdefault(row.request, []).append(row)
                left[row.request] -= 1
                if not left[row.request]:
                    on_done(row.request, finished.pop(row.request))

    # one forward pass ------------------------------------------------------------------------

    def _join(self, new: list[Row], prompts: list[list[int]], n: int) -> None:
        """Prefill ``new`` rows, draw their first tokens, stack them under the running rows."""
        inputs = self.prefill_inputs(prompts, n)
        mask = inputs["attention_mask"]
        ids = inputs["input_ids"]
        cache = inputs.get("past_key_values")
        done = cache.get_seq_length() if cache is not None else 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids[:, done:],
            attention_mask=mask,
            position_ids=positions[:, done:],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if not stackable(out.past_key_values):
            raise NotStackable(type(out.past_key_values).__name__)
        for row, p in zip(new, positions[:, -1].tolist(), strict=True):
            row.position = p + 1
        tokens = self._draw(out.logits[:, -1, :], new)
        _append(new, tokens)
        last = self.last
        self._stack(new, out.past_key_values, mask)
        self.last = tokens if last is None else torch.cat([last, tokens])
        del out, inputs
        if self.after_prefill is not None:
            self.after_prefill()

    def _step(self) -> None:
        """One decode step of every running row."""
        assert self.mask is not None and self.last is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        positions = torch.tensor([[r.position] for r in self.rows], device=self.device)
        out = self.model(
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        for row in self.rows:
            row.position += 1
        self.last = self._draw(out.logits[:, -1, :], self.rows)
        _append(self.rows, self.last)

    def _draw(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        from synthpref.backends.row_sampling import draw_tokens

        logits = logits.float()
        if self.s.top_k:
            vals, idx = logits.log_softmax(-1).topk(self.s.top_k, dim=-1)
            for row, v, i in zip(rows, vals.tolist(), idx.tolist(), strict=True):
                row.top.append((v, i))
        if self.s.temperature == 0:
            return logits.argmax(-1)
        gens = [r.generator for r in rows]
        return draw_tokens(logits, gens, self.s.temperature, self.s.top_p)  # type: ignore[arg-type]

    # rows joining and leaving ------------------------------------------------------------------

    def _stack(self, new: list[Row], cache: Any, mask: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask = list(new), cache, mask
            return
        width = max(mask.shape[1], self.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat(
                [_pad_left(mine.values, width), _pad_left(theirs.values, width)]
            )
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self.rows += new

    def _ended(self, row: Row) -> bool:
        if row.tokens[-1] in self.s.stop_ids or len(row.tokens) >= self.s.max_tokens:
            return True
        if not self._tail:
            return False
        # the stop string can span at most its length in tokens, plus one partly before it
        text = self.tok.decode(row.tokens[-(self._tail + 1) :], skip_special_tokens=True)
        return any(s in text for s in self.s.stop_strings)

    def _leave(self) -> list[Row]:
        """Take the rows that ended out of the batch, and cut the columns nobody attends to."""
        ended = [k for k, row in enumerate(self.rows) if self._ended(row)]
        if not ended:
            return []
        gone = [self.rows[k] for k in ended]
        keep = [k for k in range(len(self.rows)) if k not in set(ended)]
        self.rows = [self.rows[k] for k in keep]
        if not keep:
            self.cache = self.mask = self.last = None
            return gone
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        assert self.mask is not None and self.last is not None
        self.mask, self.last = self.mask[index], self.last[index]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, start:].contiguous()
                layer.values = layer.values[:, :, start:].contiguous()
            self.mask = self.mask[:, start:]
        return gone


def _append(rows: list[Row], tokens: torch.Tensor) -> None:
    for row, t in zip(rows, tokens.tolist(), strict=True):
        row.tokens.append(t)


def _pad_left(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``t`` with zeros prepended along ``dim`` up to ``width`` (masked-out cache columns)."""
    short = width - t.shape[dim]
    if short <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)
