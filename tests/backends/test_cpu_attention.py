"""The CPU attention the transformers backend switches models to (``cpu_attention.py``) computes
exactly what transformers' own SDPA attention computes. Its row-by-row path is checked where it is
used: ``test_decode_loop.py`` compares every row's logits with its prompt run alone."""

from __future__ import annotations

import copy

import pytest
import torch

from synthpref.backends import cpu_attention
from synthpref.backends.transformers_backend import load_model


@pytest.fixture(scope="module")
def model(embedded_dir):
    return load_model(str(embedded_dir), "cpu", "float32")[0]


def _logits(model, implementation: str, **inputs) -> torch.Tensor:
    before = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        with torch.inference_mode():
            return model(**inputs).logits
    finally:
        model.set_attn_implementation(before)


def test_the_embedded_model_runs_it(model):
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped
    assert model.config._attn_implementation == cpu_attention.NAME


def test_a_padded_batch_and_a_padded_decode_step_equal_transformers_sdpa_bit_for_bit(model):
    """Independent computation: transformers' ``sdpa`` attention, which repeats the KV heads."""
    torch.manual_seed(0)
    ids = torch.randint(100, 5000, (4, 40))
    mask = torch.ones_like(ids)
    mask[::2, :13] = 0  # left padding: a mask reaches the attention
    ours = _logits(model, cpu_attention.NAME, input_ids=ids, attention_mask=mask)
    theirs = _logits(model, "sdpa", input_ids=ids, attention_mask=mask)
    assert torch.equal(ours, theirs)
    # one decode step on a padded cache (a query of one token against 40 cached columns)
    with torch.inference_mode():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    step = {
        "input_ids": ids[:, -1:],
        "attention_mask": torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], dim=1),
        "position_ids": (mask.sum(-1, keepdim=True)),
    }
    ours = _logits(model, cpu_attention.NAME, past_key_values=copy.deepcopy(cache), **step)
    theirs = _logits(model, "sdpa", past_key_values=copy.deepcopy(cache), **step)
    assert torch.equal(ours, theirs)


def test_an_unpadded_batch_goes_to_transformers_own_function(model, monkeypatch):
    from transformers.integrations import sdpa_attention

    delegated = []
    real = sdpa_attention.sdpa_attention_forward

    def spy(*args, **kwargs):
        delegated.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    ids = torch.randint(100, 5000, (2, 12))
    with torch.inference_mode():
        model(input_ids=ids)  # no padding: transformers drops the mask and handles it itself
    assert len(delegated) == model.config.num_hidden_layers
    delegated.clear()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
    assert delegated == []  # masked: ours, with enable_gqa instead of repeated heads


def test_models_not_on_transformers_sdpa_are_left_alone():
    class Config:
        _attn_implementation = "eager"
        num_attention_heads = 8
        num_key_value_heads = 2

    class Model(torch.nn.Module):
        config = Config()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    assert cpu_attention.use_cpu_attention(Model()) is False
