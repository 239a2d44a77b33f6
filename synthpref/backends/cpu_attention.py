"""The attention function models on CPU run: transformers' SDPA attention, minus a KV-cache copy,
plus prefill and decode paths whose result for a row does not depend on the rest of the batch.

**Masked grouped-query attention without the copy.** transformers' SDPA attention repeats each
key/value head for every query head of its group (``repeat_kv``) whenever an attention mask is passed,
because on CUDA a masked grouped call would fall back to the slow math kernel. A padded batch always
passes a mask, so on CPU every layer of every decode step copied the whole cache three times over
(SmolLM2: 9 query heads, 3 KV heads): at 32 rows of 500 tokens that copy was 70% of a step (~1.2 s).
torch's CPU kernels take the mask with ``enable_gqa=True`` and give bit-identical outputs (checked in
``tests/backends/test_cpu_attention.py``).

**Each row as if alone.** The continuous-batching loop (``decode_loop.py``) passes ``row_lengths``.
Attending the whole batch at once, a row's sums run over other rows' columns, and torch's CPU
kernel splits and orders its reductions by the batch's shapes and threads, so a row's output moved
in its last bits with its neighbours. In a prefill (as many keys as queries), the prompts are
either end to end in one row (``row_lengths.packed``: prompt ``r`` is the next ``row_lengths[r]``
columns) or left-padded (row ``r``'s prompt is its last ``row_lengths[r]`` columns; padding
positions get zeros), and each prompt is one causal SDPA call on exactly its own tokens: the call
transformers makes for an unpadded prompt alone. In a decode step (one query per row), row ``r``
has ``row_lengths[r]`` keys at the start of its cache row, and :func:`decode_attention` attends
all rows at once through reductions whose order the batch cannot change; an unpadded decode call
without ``row_lengths`` (a row alone) runs the same function, so the two agree bit for bit.

Everything else (no mask, CUDA, position biases) goes to transformers' own function unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: the name this attention is registered under (transformers' ``AttentionInterface``)
NAME = "synthpref_sdpa"


def cpu_sdpa(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    special = (
        query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
        or kwargs.get("output_attentions", False)
    )
    grouped = key.shape[1] != query.shape[1]  # fewer KV heads than query heads
    lengths = kwargs.pop("row_lengths", None)
    q_length = query.shape[2]
    if not special and q_length == 1 and (lengths is not None or attention_mask is None):
        # a decode step of the running batch, or rows alone (unpadded): the same computation
        if lengths is None:
            lengths = [key.shape[2]] * query.shape[0]
        else:
            lengths.used += 1
        return decode_attention(query, key, value, lengths, scaling), None
    if lengths is not None and not special and getattr(lengths, "packed", False):
        # prompts end to end in one row: each attends causally to its own span
        if query.shape[0] != 1 or key.shape[2] != q_length or sum(lengths) != q_length:
            raise ValueError(f"packed prompts of {sum(lengths)} tokens, query {query.shape}")
        lengths.used += 1
        out = query.new_empty(query.shape)
        s = 0
        for n in lengths:
            out[:, :, s : s + n] = F.scaled_dot_product_attention(
                query[:, :, s : s + n],
                key[:, :, s : s + n],
                value[:, :, s : s + n],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=grouped,
            )
            s += n
        return out.transpose(1, 2).contiguous(), None
    if lengths is not None and not special and key.shape[2] == q_length:
        # a left-padded prefill: row r's prompt is its last lengths[r] columns
        lengths.used += 1
        out = query.new_zeros(query.shape)
        for r, n in enumerate(lengths):
            s = q_length - n
            out[r : r + 1, :, s:] = F.scaled_dot_product_attention(
                query[r : r + 1, :, s:],
                key[r : r + 1, :, s:],
                value[r : r + 1, :, s:],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=grouped,
            )
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is not None and grouped and not special:
        # what sdpa_attention_forward computes for a mask (is_causal False), minus repeat_kv
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=True,
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


#: the key axis is padded to a multiple of this, so a row's sums always run over whole vectors
KEY_ALIGN = 64


def decode_attention(query: Any, key: Any, value: Any, lengths: Any, scaling: float | None) -> Any:
    """One query per row against the row's first ``lengths[r]`` keys, for all rows at once, with
    each row's result independent of the other rows and of the key columns after its own.

    torch's SDPA kernel orders a row's reductions by the call's shapes and thread split, so a
    batched call gives a row other bits than the row's call alone, and one call per row cost ~6x
    a batched call. Here every reduction a row makes has an order the batch cannot change: the
    scores and the weighted values are batched matrix products (one matrix per row and KV head;
    over the key axis, the columns after a row's own add exact zeros), and the softmax runs over
    a key axis padded to a multiple of :data:`KEY_ALIGN`, so it sees the same whole vectors.

    A decode step reads every row's keys and values from memory, which is what it spends its
    time on; a single product over the longest row's width read the shorter rows' unused columns
    too (a quarter of the columns read in the quickstart's generation). So the rows go in
    contiguous spans, each read to its own longest row's width (:func:`spans`): a row's result
    is the same in any span, as it is alone.
    Agrees with SDPA to ~5e-7. Returns ``[rows, 1, heads, dim]``, as transformers' attention
    functions do."""
    import torch
    import torch.nn.functional as F

    rows, heads, _, dim = query.shape
    kv = key.shape[1]
    group = heads // kv
    if not isinstance(lengths, RowLengths):  # a row alone, or a caller's plain list
        lengths = RowLengths(lengths)
    parts = lengths.spans()
    width = max(w for _, _, w in parts)
    if key.shape[2] < width:
        pad = (0, 0, 0, width - key.shape[2])
        key, value = F.pad(key, pad), F.pad(value, pad)
    scale = dim**-0.5 if scaling is None else scaling
    q = (query.reshape(rows * kv, group, dim) * scale).contiguous()
    mask = lengths.mask(width, q)
    out = q.new_empty((rows * kv, group, dim))
    for a, b, w in parts:
        n = b - a
        scores = torch.bmm(
            q[a * kv : b * kv], key[a:b, :, :w].reshape(n * kv, w, dim).transpose(1, 2)
        )
        weights = torch.softmax(scores.view(n, heads, w) + mask[a:b, :, :w], dim=-1)
        torch.bmm(
            weights.view(n * kv, group, w),
            value[a:b, :, :w].reshape(n * kv, w, dim),
            out=out[a * kv : b * kv],
        )
    return out.view(rows, 1, heads, dim)


#: what one more span costs a decode step, in row-columns read (a span's few calls take about as
#: long as reading 3-4 rows of 64 columns, measured on 2 CPU cores)
SPAN_COST = 256


def spans(lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """Rows ``a .. b - 1`` as contiguous spans ``(a, b, width)``, each ``width`` its longest row's
    length rounded up to :data:`KEY_ALIGN`, cut where reading fewer columns saves more than
    :data:`SPAN_COST` (the least columns plus span costs over all cuttings at runs of rows of
    equal width; rows joined together are neighbours of similar lengths, so the runs are few)."""
    runs: list[tuple[int, int]] = []  # (first row, width) of each run of equal widths
    for r, n in enumerate(lengths):
        w = max(-(-n // KEY_ALIGN), 1) * KEY_ALIGN
        if not runs or runs[-1][1] != w:
            runs.append((r, w))
    starts = [r for r, _ in runs] + [len(lengths)]
    best = [0.0] + [float("inf")] * len(runs)
    cut = [0] * (len(runs) + 1)
    for j in range(1, len(runs) + 1):
        widest = 0
        for i in range(j - 1, -1, -1):
            widest = max(widest, runs[i][1])
            cost = best[i] + (starts[j] - starts[i]) * widest + SPAN_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], len(runs)
    while j:
        i = cut[j]
        out.append((starts[i], starts[j], max(w for _, w in runs[i:j])))
        j = i
    return out[::-1]


def _mask(lengths: Sequence[int], width: int, like: Any) -> Any:
    """``[rows, 1, width]``: 0 where a row has a key, -inf after."""
    import torch

    at = torch.tensor(lengths, device=like.device)
    outside = torch.arange(width, device=like.device)[None, None, :] >= at[:, None, None]
    return torch.zeros(outside.shape, dtype=like.dtype, device=like.device).masked_fill_(
        outside, float("-inf")
    )


class RowLengths(list):
    """How many keys each row of a pass attends to, passed to the model as ``row_lengths``; ``used``
    counts the layers that attended row by row, so the caller can tell a model that does not hand
    its keyword arguments to the attention function. The decode mask and spans are built once per
    pass, not once per layer."""

    used = 0
    #: the rows' prompts are end to end in one sequence (a prefill without padding)
    packed = False
    _masks: dict | None = None
    _spans: list[tuple[int, int, int]] | None = None

    def spans(self) -> list[tuple[int, int, int]]:
        if self._spans is None:
            self._spans = spans(self)
        return self._spans

    def mask(self, width: int, like: Any) -> Any:
        if self._masks is None:
            self._masks = {}
        if width not in self._masks:
            self._masks[width] = _mask(self, width, like)
        return self._masks[width]


def use_cpu_attention(model: Any) -> bool:
    """Switch ``model`` (on CPU, running transformers' ``sdpa`` attention) to :func:`cpu_sdpa`;
    returns whether it was switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if next(model.parameters()).device.type != "cpu":
        return False
    AttentionInterface.register(NAME, cpu_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
