"""Continuous batching for the transformers backend: one running batch per model, which rows join
and leave between decode steps, fed by every call that generates on that model at once.

``model.generate`` keeps every row of a batch in every forward pass until the last one stops, so a
batch whose replies run 11 to 256 tokens spends most of its passes on rows that have already ended
(the quickstart's first shard: 39% of the row-steps computed were tokens anyone kept). Here a row
that ends leaves the batch at once, and rows waiting for a place are prefilled and join the running
batch: the KV caches are left-padded to one length and stacked, and each row keeps its own
positions, so a row computes what it would compute alone. Columns that no remaining row attends to
(the padding of rows that left) are cut off the cache.

The batch is shared: a :class:`DecodeEngine` runs it in its own thread, and every ``generate`` call
on the model submits its requests there, whatever their sampling parameters (each row carries its
request's). A small call would otherwise run alone and decay to a batch of one as its rows end (the
quickstart generates 10 prompts per call, per model, while its judge asks about the previous shard);
merged, the candidates of both models and the judge's questions share each forward pass. The device
lock is taken per forward pass, so scoring calls run between steps.

Each step is one forward pass of the running rows on their last token, then one draw per row:
greedy, or from the row's own seeded stream (``row_sampling.draw_tokens``, the draw the
``generate`` path makes), so a row's text does not depend on which rows share its steps.

Only a model whose cache is a plain :class:`~transformers.DynamicCache` of full-attention layers can
be stacked this way; :func:`stackable` says whether a cache is one, and the backend falls back to
``model.generate`` for the others (sliding-window, hybrid or recurrent caches).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from synthpref.backends.base import CapabilityError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """How one request's rows are drawn and when they end."""

    max_tokens: int
    temperature: float
    top_p: float
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()
    #: top log-probabilities kept per generated token (0: none)
    top_k: int = 0


@dataclass(eq=False)
class Job:
    """One request: ``n`` rows from one prompt. ``on_done(rows)`` (rows in sample order) or
    ``on_error(exc)`` is called once, from the engine's thread."""

    prompt: list[int]
    n: int
    settings: Settings
    #: one per sample: its seeded stream, or None (greedy)
    generators: Sequence[torch.Generator | None]
    on_done: Callable[[list[Row]], None]
    on_error: Callable[[BaseException], None]
    cancelled: bool = False
    finished: list[Row] = field(default_factory=list)


@dataclass(eq=False)
class Row:
    """One sample of one request and what it made."""

    job: Job
    sample: int
    tokens: list[int] = field(default_factory=list)
    #: per generated token, (log-probabilities, token ids) of the ``top_k`` most likely
    top: list[tuple[list[float], list[int]]] = field(default_factory=list)
    position: int = 0

    @property
    def generator(self) -> torch.Generator | None:
        return self.job.generators[self.sample]


#: prefill ``(prompts, n) -> inputs``: ``input_ids`` [rows, width], ``attention_mask`` and, when the
#: prompts share a prefix that ran once, ``past_key_values`` holding it (the backend's layout)
Prefill = Callable[[list[list[int]], int], dict[str, Any]]


def stackable(cache: Any) -> bool:
    """Whether ``cache`` is a DynamicCache of full-attention layers, whose tensors can be padded,
    stacked and cut as this loop does."""
    return type(cache) is DynamicCache and all(type(x) is DynamicLayer for x in cache.layers)


class NotStackable(CapabilityError):
    """The model's cache is not one this loop can stack; the backend catches it and generates with
    ``model.generate`` instead, so it never reaches a caller."""


class DecodeLoop:
    """One model's running batch, driven by :class:`DecodeEngine`: :meth:`join` prefills jobs into
    it, :meth:`step` decodes one token for every row, :meth:`leave` takes out the rows that ended."""

    def __init__(
        self,
        model: Any,
        prefill: Prefill,
        tokenizer: Any,
        after_prefill: Callable[[], None] | None = None,
        prefill_tokens: int = 2048,
    ) -> None:
        """``after_prefill`` runs after each join (the backend hands freed heap back to the OS
        there: a prefill frees the largest activations)."""
        self.model = model
        self.after_prefill = after_prefill
        self.prefill_inputs = prefill
        self.tok = tokenizer
        self.device = next(model.parameters()).device
        #: most padded prompt tokens in one prefill pass
        self.prefill_tokens = prefill_tokens
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None

    def join(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` (all with the same ``n``), draw their first tokens, stack their rows
        under the running rows. Jobs run in parts of at most ``prefill_tokens`` padded tokens
        (at least one job each), each part padded only to its own longest prompt: callers sort
        jobs by length, so a join of prompts from 300 to 600 tokens does not pad all to 600. The
        running cache is restacked once per join, not once per part."""
        parts = [self._prefill(part) for part in _parts(jobs, self.prefill_tokens)]
        self._stack(parts)
        if self.after_prefill is not None:
            self.after_prefill()

    def _prefill(self, jobs: list[Job]) -> tuple[list[Row], Any, torch.Tensor]:
        """One prefill pass: the new rows (first token drawn), their cache and attention mask."""
        n = jobs[0].n
        new = [Row(job, s) for job in jobs for s in range(n)]
        inputs = self.prefill_inputs([job.prompt for job in jobs], n)
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
        _append(new, self._draw(out.logits[:, -1, :], new))
        return new, out.past_key_values, mask

    def step(self) -> None:
        """One decode step of every running row."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        positions = torch.tensor([[r.position] for r in self.rows], device=self.device)
        last = torch.tensor([[r.tokens[-1]] for r in self.rows], device=self.device)
        out = self.model(
            input_ids=last,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        for row in self.rows:
            row.position += 1
        _append(self.rows, self._draw(out.logits[:, -1, :], self.rows))

    def _draw(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """One token per row: greedy rows the argmax, sampled rows from their own streams (rows
        that share temperature and top-p drawn together; a row's draw reads only its own row)."""
        from synthpref.backends.row_sampling import draw_tokens

        logits = logits.float()
        k = max(r.job.settings.top_k for r in rows)
        if k:
            vals, idx = logits.log_softmax(-1).topk(k, dim=-1)
            for row, v, i in zip(rows, vals.tolist(), idx.tolist(), strict=True):
                if row.job.settings.top_k:
                    row.top.append((v[: row.job.settings.top_k], i[: row.job.settings.top_k]))
        tokens = logits.argmax(-1)
        sampled: dict[tuple[float, float], list[int]] = {}
        for j, row in enumerate(rows):
            s = row.job.settings
            if s.temperature:
                sampled.setdefault((s.temperature, s.top_p), []).append(j)
        for (temperature, top_p), which in sampled.items():
            gens = [rows[j].generator for j in which]
            at = torch.tensor(which, device=logits.device)
            tokens[at] = draw_tokens(logits[at], gens, temperature, top_p)  # type: ignore[arg-type]
        return tokens

    def _stack(self, parts: list[tuple[list[Row], Any, torch.Tensor]]) -> None:
        """Put the new parts' rows and caches under the running rows', all right-aligned
        (left-padded with masked zero columns) to the widest, into layers with room to grow. Each
        old layer is dropped as its replacement is built, so the cache is never held twice."""
        masks = ([self.mask] if self.rows else []) + [mask for _, _, mask in parts]
        width = max(m.shape[1] for m in masks)
        self.mask = torch.cat([_pad_left(m, width) for m in masks])
        layers = [cache.layers for _, cache, _ in parts]
        if self.rows:
            layers.insert(0, self.cache.layers)
        for k in range(len(layers[0])):
            keys = [group[k].keys for group in layers]
            values = [group[k].values for group in layers]
            for group in layers:
                group[k] = None
            layers[0][k] = RoomyLayer(_buffer(keys, width), _buffer(values, width), width)
            del keys, values
        if not self.rows:
            self.cache = parts[0][1]
        for new, _, _ in parts:
            self.rows += new

    def _ended(self, row: Row) -> bool:
        s = row.job.settings
        if row.job.cancelled:
            return True
        if row.tokens[-1] in s.stop_ids or len(row.tokens) >= s.max_tokens:
            return True
        if not s.stop_strings:
            return False
        # the stop string can span at most its length in tokens, plus one partly before it
        tail = max(len(x) for x in s.stop_strings)
        text = self.tok.decode(row.tokens[-(tail + 1) :], skip_special_tokens=True)
        return any(x in text for x in s.stop_strings)

    def leave(self) -> list[Job]:
        """Take the rows that ended out of the batch, cut the columns nobody attends to, and
        return the jobs whose every row has now ended (cancelled ones included)."""
        ended = {k for k, row in enumerate(self.rows) if self._ended(row)}
        if not ended:
            return []
        gone = [self.rows[k] for k in sorted(ended)]
        keep = [k for k in range(len(self.rows)) if k not in ended]
        self.rows = [self.rows[k] for k in keep]
        if not keep:
            self.reset()
        else:
            index = torch.tensor(keep, device=self.device)
            assert self.mask is not None
            self.mask = self.mask[index]
            used = self.mask.any(dim=0).nonzero()
            start = int(used[0]) if len(used) else 0
            self.mask = self.mask[:, start:]
            width = self.mask.shape[1]
            for k, layer in enumerate(self.cache.layers):
                keys = _buffer([layer.keys[index, :, start:]], width)
                values = _buffer([layer.values[index, :, start:]], width)
                self.cache.layers[k] = RoomyLayer(keys, values, width)
        complete = []
        for row in gone:
            row.job.finished.append(row)
            if len(row.job.finished) == row.job.n:
                row.job.finished.sort(key=lambda r: r.sample)
                complete.append(row.job)
        return complete

    def reset(self) -> list[Job]:
        """Empty the batch; returns the jobs that had rows in it."""
        jobs = list({id(r.job): r.job for r in self.rows}.values())
        self.rows = []
        self.cache = self.mask = None
        return jobs


class DecodeEngine:
    """A model's shared running batch, stepped by a thread of its own while any job is running or
    waiting (started by :meth:`submit`, ended when both are empty).

    Jobs wait in the order submitted (callers sort theirs by prompt length, so rows that join
    together pad little). Waiting rows join when at least ``refill_at`` places are free (or the
    batch is empty): each join costs a prefill pass, so rows do not join one by one. An error in a
    forward pass fails every job running or waiting (``on_error``) and empties the batch.
    """

    def __init__(
        self,
        loop: DecodeLoop,
        lock: threading.Lock,
        max_rows: int,
        refill_at: int = 1,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.loop = loop
        self.lock = lock
        self.max_rows = max_rows
        self.refill_at = refill_at
        self.on_idle = on_idle
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, jobs: Sequence[Job]) -> None:
        with self._cv:
            self._waiting.extend(jobs)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="synthpref-decode", daemon=True
                )
                self._thread.start()

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Stop ``jobs``: waiting ones never start, running rows leave at the next step; their
        callbacks are not called."""
        with self._cv:
            for job in jobs:
                job.cancelled = True

    def _next_joins(self) -> list[Job]:
        """Jobs to prefill now (all with the head's ``n``), or [] to step the running rows."""
        while self._waiting and self._waiting[0].cancelled:
            self._waiting.popleft()
        if not self._waiting:
            return []
        running = len(self.loop.rows)
        free = self.max_rows - running
        n = self._waiting[0].n
        waiting = sum(job.n for job in self._waiting if not job.cancelled)
        if running and free < max(n, min(self.refill_at, waiting)):
            return []
        take: list[Job] = []
        while self._waiting and self._waiting[0].n == n and (len(take) + 1) * n <= max(free, n):
            job = self._waiting.popleft()
            if not job.cancelled:
                take.append(job)
        return take

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    take = self._next_joins()
                    if not take and not self.loop.rows:
                        self._thread = None
                        break
                try:
                    with self.lock:
                        if take:
                            self.loop.join(take)
                        else:
                            self.loop.step()
                    complete = self.loop.leave()
                except Exception as exc:
                    self._fail(take, exc)
                    continue
                for job in complete:
                    if not job.cancelled:
                        _call(job.on_done, job.finished)
        if self.on_idle is not None:
            self.on_idle()

    def _fail(self, joining: list[Job], exc: Exception) -> None:
        with self._cv:
            jobs = joining + self.loop.reset() + list(self._waiting)
            self._waiting.clear()
        for job in {id(j): j for j in jobs}.values():
            if not job.cancelled:
                _call(job.on_error, exc)


def _call(callback: Callable[[Any], None], arg: Any) -> None:
    """A job's callback, whose failure (its event loop closed meanwhile) must not stop the thread
    that steps everyone else's rows."""
    try:
        callback(arg)
    except Exception:
        log.exception("a decode job's callback failed")


def _parts(jobs: list[Job], budget: int) -> list[list[Job]]:
    """``jobs`` in order, cut into runs whose rows padded to their longest prompt stay within
    ``budget`` tokens (a job longer than that runs alone)."""
    parts: list[list[Job]] = [[]]
    longest = 0
    for job in jobs:
        wider = max(longest, len(job.prompt))
        part = parts[-1]
        if part and (len(part) + 1) * job.n * wider > budget:
            parts.append([])
            part, wider = parts[-1], len(job.prompt)
        part.append(job)
        longest = wider
    return parts


def _append(rows: list[Row], tokens: torch.Tensor) -> None:
    for row, t in zip(rows, tokens.tolist(), strict=True):
        row.tokens.append(t)


#: free cache columns a layer keeps after its last; a step writes its column there, and a full
#: layer is copied into a buffer this much longer (one copy per ROOM steps, not one per step)
ROOM = 64


class RoomyLayer(DynamicLayer):
    """A cache layer whose ``keys``/``values`` are views of the first ``n`` columns of longer
    buffers: a decode step writes its column in place, where ``DynamicLayer`` concatenates,
    copying the whole cache of every layer at every step (38% of a step's time at 32 rows of 200
    tokens on 2 CPU cores)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, n: int) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._k, self._v, self._n = keys, values, n
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[2]
        if self._n + new > self._k.shape[2]:
            self._k = _buffer([self.keys], self._n, room=max(ROOM, new))
            self._v = _buffer([self.values], self._n, room=max(ROOM, new))
        self._k[:, :, self._n : self._n + new] = key_states
        self._v[:, :, self._n : self._n + new] = value_states
        self._n += new
        self._views()
        return self.keys, self.values


def _buffer(parts: list[torch.Tensor], width: int, room: int = ROOM) -> torch.Tensor:
    """``parts`` ([rows, heads, length, dim] each) stacked by row, each right-aligned at column
    ``width`` (the columns before it zero, masked out), in a buffer ``room`` columns longer."""
    first = parts[0]
    rows = sum(p.shape[0] for p in parts)
    out = first.new_zeros((rows, first.shape[1], width + room, first.shape[3]))
    r = 0
    for p in parts:
        out[r : r + p.shape[0], :, width - p.shape[2] : width] = p
        r += p.shape[0]
    return out


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    """An attention mask [rows, columns] with masked-out (zero) columns prepended up to ``width``;
    the cache's own padding is written by :func:`_buffer`."""
    short = width - mask.shape[1]
    if short <= 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], short)), mask], dim=1)
