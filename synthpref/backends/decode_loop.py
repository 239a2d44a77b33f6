"""Continuous batching for the transformers backend: one running batch per model, which rows join
and leave between decode steps, fed by every call that generates on that model at once.

``model.generate`` keeps every row of a batch in every forward pass until the last one stops, so a
batch whose replies run 11 to 256 tokens spends most of its passes on rows that have already ended
(the quickstart's first shard: 39% of the row-steps computed were tokens anyone kept). Here a row
that ends leaves the batch at once, and rows waiting for a place are prefilled and join the running
batch.

**A row computes what it would compute alone, bit for bit** (on CPU), so a sample's text does not
depend on its neighbours, the batch size, or which requests a resumed run regenerates:

- prompts are prefilled together, end to end in one sequence (left-padded where the model's
  attention is not ``cpu_attention``'s), each attending to exactly its own tokens in the call it
  makes alone (``cpu_attention.py``); its ``n`` samples share its prefill row;
- the cache is stacked *left-aligned*: row ``r``'s keys fill columns ``0 .. length_r - 1`` of its
  cache row, each step writes a row's new key at that row's own length (:class:`RowLayer`), and the
  decode step attends each row to exactly its own columns through reductions the batch cannot
  reorder (``cpu_attention.decode_attention``; a left-padded batch summed over other rows' padding
  in another order);
- linear layers run a kernel that gives each row the bits it gets in any large call (oneDNN on
  weights packed at load, or BLAS with small calls padded; ``invariant_linear.py``);
- a sampled row draws from its own seeded stream (``row_sampling.draw_tokens``).

The batch is shared: a :class:`DecodeEngine` runs it in its own thread, and every ``generate`` call
on the model submits its requests there, whatever their sampling parameters (each row carries its
request's). A small call would otherwise run alone and decay to a batch of one as its rows end (the
quickstart generates 10 prompts per call, per model, while its judge asks about the previous shard);
merged, the candidates of both models and the judge's questions share each forward pass. The device
lock is taken per forward pass, so scoring calls run between steps.

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
from synthpref.backends.cpu_attention import KEY_ALIGN

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
        tokenizer: Any,
        after_prefill: Callable[[], None] | None = None,
        prefill_tokens: int = 2048,
    ) -> None:
        """``after_prefill`` runs after each join (the backend hands freed heap back to the OS
        there: a prefill frees the largest activations)."""
        from synthpref.backends.cpu_attention import NAME

        self.model = model
        self.after_prefill = after_prefill
        self.tok = tokenizer
        self.device = next(model.parameters()).device
        #: the model attends through ``cpu_attention``, which takes a ready 4-D mask and row lengths
        self.row_attention = getattr(model.config, "_attn_implementation", None) == NAME
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        #: most prompt tokens (padding included, where prompts are padded) in one prefill pass
        self.prefill_tokens = prefill_tokens
        #: prompts go end to end in a prefill, without padding (needs the row-wise attention)
        self.packed_prefill = self.row_attention
        self.rows: list[Row] = []
        self.cache: RowCache | None = None
        self._warned = False

    def join(self, jobs: list[Job]) -> None:
        """Prefill ``jobs``, draw their first tokens, stack their rows under the running rows.
        Jobs run in parts of at most ``prefill_tokens`` tokens (at least one job each); the
        running cache is restacked once per join, not once per part."""
        parts = [
            self._prefill(part) for part in _parts(jobs, self.prefill_tokens, self.packed_prefill)
        ]
        self._stack(parts)
        if self.after_prefill is not None:
            self.after_prefill()

    def _prefill(self, jobs: list[Job]) -> tuple[list[Row], list[list[tuple[torch.Tensor, int]]]]:
        """One prefill pass of ``jobs``' prompts, one row per prompt (its ``n`` samples share it):
        the new rows (first token drawn) and, per layer, each prompt's keys and values.

        With the row-wise attention the prompts go end to end in one sequence (each attends to
        its own tokens, at its own positions): no padding token is computed, where left-padding
        the prompts to the longest computed a quarter more tokens in the quickstart. Otherwise
        they are left-padded under a mask."""
        from synthpref.backends.cpu_attention import RowLengths

        lengths = RowLengths(len(job.prompt) for job in jobs)
        if self.packed_prefill:
            lengths.packed = True
            ends = torch.tensor(lengths).cumsum(0)
            out = self.model(
                input_ids=torch.tensor(
                    [[t for job in jobs for t in job.prompt]], device=self.device
                ),
                position_ids=torch.cat([torch.arange(n) for n in lengths])[None].to(self.device),
                use_cache=True,
                logits_to_keep=(ends - 1).to(self.device),
                row_lengths=lengths,
            )
            if not lengths.used:
                # the model does not hand row_lengths to its attention: masks from now on (this
                # is the first prefill, so there is no cache aligned for the row-wise attention)
                self._check_rows_attended(lengths)
                self.packed_prefill = self.row_attention = False
                return self._prefill(jobs)
            logits = out.logits[0]
            spans = [(0, int(end) - n, int(end)) for n, end in zip(lengths, ends, strict=True)]
        else:
            width = max(lengths)
            ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(jobs), width), dtype=torch.long)
            for b, job in enumerate(jobs):
                ids[b, width - len(job.prompt) :] = torch.tensor(job.prompt)
                mask[b, width - len(job.prompt) :] = 1
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
                use_cache=True,
                logits_to_keep=1,
                **({"row_lengths": lengths} if self.row_attention else {}),
            )
            self._check_rows_attended(lengths)
            logits = out.logits[:, -1, :]
            spans = [(b, width - n, width) for b, n in enumerate(lengths)]
        cache = out.past_key_values
        if not stackable(cache):
            raise NotStackable(type(cache).__name__)
        new = [Row(job, s, position=len(job.prompt)) for job in jobs for s in range(job.n)]
        samples = torch.tensor([job.n for job in jobs], device=self.device)
        _append(new, self._draw(logits.repeat_interleave(samples, dim=0), new))
        layers = [
            [
                (tensor[b : b + 1, :, start:end], job.n)
                for (b, start, end), job in zip(spans, jobs, strict=True)
                for tensor in (layer.keys, layer.values)
            ]
            for layer in cache.layers
        ]
        return new, layers

    def _check_rows_attended(self, lengths: Any) -> None:
        if self.row_attention and not lengths.used and not self._warned:
            self._warned = True
            log.warning(
                "%s does not pass its keyword arguments to its attention: its rows attend as one "
                "batch, and a sample's text can depend on its neighbours",
                type(self.model).__name__,
            )

    def step(self) -> None:
        """One decode step of every running row."""
        from synthpref.backends.cpu_attention import RowLengths

        assert self.cache is not None
        before = [r.position for r in self.rows]
        after = RowLengths(n + 1 for n in before)
        self.cache.at = at = torch.tensor(before, device=self.device)
        mask = torch.arange(max(after), device=self.device) <= at[:, None]
        kwargs: dict[str, Any] = {}
        if self.row_attention:
            kwargs["row_lengths"] = after
            mask = mask[:, None, None, :]  # ready: transformers builds no mask of its own
        out = self.model(
            input_ids=torch.tensor([[r.tokens[-1]] for r in self.rows], device=self.device),
            attention_mask=mask,
            position_ids=torch.tensor([[n] for n in before], device=self.device),
            past_key_values=self.cache,
            use_cache=True,
            **kwargs,
        )
        self._check_rows_attended(after)
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
        sampled: dict[tuple[float, float], list[int]] = {}
        for j, row in enumerate(rows):
            s = row.job.settings
            if s.temperature:
                sampled.setdefault((s.temperature, s.top_p), []).append(j)
        if len(sampled) == 1 and len(next(iter(sampled.values()))) == len(rows):
            # every row sampled alike (the common case): no argmax, no copy of the logits
            (temperature, top_p), _ = sampled.popitem()
            gens = [row.generator for row in rows]
            return draw_tokens(logits, gens, temperature, top_p)  # type: ignore[arg-type]
        tokens = logits.argmax(-1)
        for (temperature, top_p), which in sampled.items():
            gens = [rows[j].generator for j in which]
            at = torch.tensor(which, device=logits.device)
            tokens[at] = draw_tokens(logits[at], gens, temperature, top_p)  # type: ignore[arg-type]
        return tokens

    def _stack(self, parts: list[tuple[list[Row], list[list[tuple[torch.Tensor, int]]]]]) -> None:
        """Put the new rows' keys and values under the running rows', each row's from column 0,
        into layers with room to grow. Each old layer is dropped as its replacement is built, so
        the cache is never held twice."""
        rows = self.rows + [row for new, _ in parts for row in new]
        width = max(r.position for r in rows)
        if self.cache is None:
            self.cache = RowCache(align=KEY_ALIGN if self.row_attention else 1)
        for k in range(len(parts[0][1])):
            keys: list[tuple[torch.Tensor, int]] = []
            values: list[tuple[torch.Tensor, int]] = []
            if self.rows:
                old = self.cache.layers[k]
                keys.append((old.keys, 1))
                values.append((old.values, 1))
                self.cache.layers[k] = None
            for _, layers in parts:
                keys += layers[k][0::2]
                values += layers[k][1::2]
                layers[k] = []
            layer = RowLayer(
                self.cache, _fill(keys, len(rows), width), _fill(values, len(rows), width), width
            )
            del keys, values
            if k < len(self.cache.layers):
                self.cache.layers[k] = layer
            else:
                self.cache.layers.append(layer)
        self.rows = rows

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
        """Take the rows that ended out of the batch, cut the columns nobody attends to any more,
        and return the jobs whose every row has now ended (cancelled ones included)."""
        ended = {k for k, row in enumerate(self.rows) if self._ended(row)}
        if not ended:
            return []
        gone = [self.rows[k] for k in sorted(ended)]
        keep = [k for k in range(len(self.rows)) if k not in ended]
        self.rows = [self.rows[k] for k in keep]
        if not keep:
            self.reset()
        else:
            assert self.cache is not None
            first = min(ended)  # rows before it keep their place
            moved = torch.tensor(keep[first:], device=self.device)
            width = max(r.position for r in self.rows)
            for layer in self.cache.layers:
                layer.keep(first, moved, width)
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
        self.cache = None
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


def _parts(jobs: list[Job], budget: int, packed: bool = False) -> list[list[Job]]:
    """``jobs`` in order, cut into runs whose prompts stay within ``budget`` tokens, end to end
    (``packed``) or each padded to the run's longest (a job longer than that runs alone)."""
    parts: list[list[Job]] = [[]]
    total = longest = 0
    for job in jobs:
        n = len(job.prompt)
        tokens = total + n if packed else (len(parts[-1]) + 1) * max(longest, n)
        if parts[-1] and tokens > budget:
            parts.append([])
            total = longest = 0
        parts[-1].append(job)
        total, longest = total + n, max(longest, n)
    return parts


def _append(rows: list[Row], tokens: torch.Tensor) -> None:
    for row, t in zip(rows, tokens.tolist(), strict=True):
        row.tokens.append(t)


#: free cache columns a layer keeps after its longest row; a step writes its column there, and a
#: full layer is copied into a buffer this much longer (one copy per ROOM steps, not one per step)
ROOM = KEY_ALIGN


class RowCache(DynamicCache):
    """The running batch's cache: :class:`RowLayer` layers, and ``at``, the column each row's next
    key goes to (its length), which :meth:`DecodeLoop.step` sets before each forward pass.
    ``align``: the attention reads the keys to a multiple of this many columns (the row-wise
    attention pads its key axis to whole vectors; columns past a row's length are ignored)."""

    def __init__(self, align: int = 1) -> None:
        super().__init__()
        self._at: torch.Tensor | None = None
        self._index: dict[tuple, torch.Tensor] = {}
        #: a forward pass sees each layer's keys to a multiple of this many columns
        self.align = align

    @property
    def at(self) -> torch.Tensor | None:
        return self._at

    @at.setter
    def at(self, value: torch.Tensor | None) -> None:
        self._at, self._index = value, {}

    def flat_index(self, buffer: torch.Tensor) -> torch.Tensor:
        """Where each row's and head's new column goes in ``buffer`` viewed as ``[-1, dim]``
        (computed once per step for all layers of one shape)."""
        assert self._at is not None
        rows, heads, capacity, _ = buffer.shape
        key = (rows, heads, capacity)
        if key not in self._index:
            first = torch.arange(rows * heads, device=buffer.device).view(rows, heads) * capacity
            self._index[key] = (first + self._at[:, None]).view(-1)
        return self._index[key]


class RowLayer(DynamicLayer):
    """A cache layer whose rows hold their keys from column 0, in buffers with room to grow.
    ``keys``/``values`` are views of the first ``width`` columns (the longest row's keys); a decode
    step writes each row's new column at that row's own length, in place, where ``DynamicLayer``
    concatenates, copying the whole cache of every layer at every step (38% of a step's time at 32
    rows of 200 tokens on 2 CPU cores). The columns after a row's length are zeros or the keys of
    rows that left or moved up (finite values): the attention gives them zero weight."""

    def __init__(self, cache: RowCache, keys: torch.Tensor, values: torch.Tensor, width: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._cache, self._k, self._v = cache, keys, values
        self._view(width)

    def _view(self, width: int) -> None:
        self._width = width
        self.keys, self.values = self._k[:, :, :width], self._v[:, :, :width]

    def keep(self, first: int, moved: torch.Tensor, width: int) -> None:
        """Keep rows ``0 .. first - 1`` and then rows ``moved`` (in order), in place: only the rows
        after the first that left are copied, and only their written columns (a new buffer per
        layer copied the whole cache twice whenever any row ended). The buffer's rows past the
        kept ones are dropped from its view; their memory is freed when a join restacks the
        cache or the batch empties (a batch's memory peaks while it is full, before rows leave)."""
        end = first + len(moved)
        if len(moved):
            for buffer in (self._k, self._v):
                buffer[first:end, :, : self._width] = buffer[moved, :, : self._width]
        self._k, self._v = self._k[:end], self._v[:end]
        self._view(width)

    def update(self, key_states, value_states, *args, **kwargs):
        at = self._cache.at
        if key_states.shape[2] != 1 or at is None or len(at) != key_states.shape[0]:
            raise NotStackable("a running batch's cache takes one new column per row and step")
        width = self._width + 1
        if width > self._k.shape[2]:
            self._k = _fill([(self.keys, 1)], len(at), self._width)
            self._v = _fill([(self.values, 1)], len(at), self._width)
        index = self._cache.flat_index(self._k)
        dim = self._k.shape[3]
        self._k.view(-1, dim).index_copy_(0, index, key_states.reshape(-1, dim))
        self._v.view(-1, dim).index_copy_(0, index, value_states.reshape(-1, dim))
        self._view(width)
        seen = -(-width // self._cache.align) * self._cache.align  # <= capacity: both aligned
        return self._k[:, :, :seen], self._v[:, :, :seen]


def _fill(parts: list[tuple[torch.Tensor, int]], rows: int, width: int) -> torch.Tensor:
    """A buffer ``[rows, heads, capacity, dim]`` holding ``parts`` stacked by row from column 0:
    each ``(tensor, repeat)`` fills ``tensor.shape[0] * repeat`` rows (a prompt's cache, once per
    sample). Columns no part fills are zero. The capacity, at least ``ROOM`` columns past
    ``width``, is a multiple of :data:`ROOM`, so any aligned view of the keys fits in it."""
    first = parts[0][0]
    capacity = (width // ROOM + 2) * ROOM
    out = first.new_zeros((rows, first.shape[1], capacity, first.shape[3]))
    r = 0
    for tensor, repeat in parts:
        n = tensor.shape[0] * repeat
        source = tensor if repeat == 1 else tensor.repeat_interleave(repeat, dim=0)
        out[r : r + n, :, : min(width, tensor.shape[2])] = source[:, :, :width]
        r += n
    return out
