"""Grouped-query attention with a padding mask, without copying the KV cache, on CPU.

transformers' SDPA attention repeats each key/value head for every query head of its group
(``repeat_kv``) whenever an attention mask is passed, because on CUDA a masked grouped call would
fall back to the slow math kernel. A left-padded batch always passes a mask, so on CPU every layer
of every decode step copied the whole cache three times over (SmolLM2: 9 query heads, 3 KV heads):
at 32 rows of 500 tokens that copy was 70% of a step (~1.2 s). torch's CPU kernels take the mask
with ``enable_gqa=True`` and give bit-identical outputs (checked in
``tests/backends/test_gqa_attention.py``), so models on CPU run this attention function: the same
SDPA call, without the copy; everything else (no mask, CUDA, position biases) goes to transformers'
own function unchanged.
"""

from __future__ import annotations

from typing import Any

#: the name this attention is registered under (transformers' ``AttentionInterface``)
NAME = "synthpref_sdpa"


def masked_gqa_sdpa(
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

    if (
        attention_mask is not None
        and query.device.type == "cpu"
        and getattr(module, "num_key_value_groups", 1) > 1
        and kwargs.get("position_bias") is None
        and kwargs.get("cache") is None
        and not kwargs.get("output_attentions", False)
    ):
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


def use_masked_gqa(model: Any) -> bool:
    """Switch ``model`` (on CPU, running transformers' ``sdpa`` attention) to
    :func:`masked_gqa_sdpa`; returns whether it was switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if next(model.parameters()).device.type != "cpu":
        return False
    heads = getattr(config, "num_attention_heads", None)
    if not heads or getattr(config, "num_key_value_heads", heads) == heads:
        return False  # not grouped: transformers never repeats
    AttentionInterface.register(NAME, masked_gqa_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
