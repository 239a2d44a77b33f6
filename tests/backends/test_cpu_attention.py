"""The CPU attention the transformers backend switches models to (``cpu_attention.py``) computes
exactly what transformers' own SDPA attention computes. Its row-by-row path is checked where it is
used: ``test_decode_loop.py`` compares every row's logits with its prompt run alone."""

from __future__ import annotations

import copy

import pytest
import torch

from synthpref.backends import cpu_attention
from synthpref.backends.transformers_backend import load_model

#: a row's bits are checked at the thread count a user's run has (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("all_cores")


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


@pytest.mark.parametrize("length", [1, 13, 64, 65, 300])
def test_a_decode_rows_attention_ignores_its_neighbours_and_the_columns_after_its_keys(length):
    """Row 1's output, bit for bit, is the same alone and among rows of other lengths in a wider
    cache; and it is what SDPA computes (independent computation: torch's kernel, to 1e-6)."""
    torch.manual_seed(length)
    heads, kv, dim = 9, 3, 64
    q, k, v = (
        torch.randn(1, heads, 1, dim),
        torch.randn(1, kv, length, dim),
        torch.randn(1, kv, length, dim),
    )
    alone = cpu_attention.decode_attention(q, k, v, [length], 0.125)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True)
    assert torch.allclose(alone, sdpa.transpose(1, 2), atol=1e-6)
    for rows, width in [(2, length), (5, length + 7), (9, 2 * length + 100)]:
        qs, ks, vs = (
            torch.randn(rows, heads, 1, dim),
            torch.randn(rows, kv, width + 64, dim),
            torch.randn(rows, kv, width + 64, dim),
        )
        qs[1], ks[1, :, :length], vs[1, :, :length] = q[0], k[0], v[0]
        lengths = cpu_attention.RowLengths([width] * rows)
        lengths[1] = length
        out = cpu_attention.decode_attention(qs, ks, vs, lengths, 0.125)
        assert torch.equal(out[1:2], alone), (rows, width)


def test_rows_of_many_lengths_each_read_as_if_alone():
    """Forty rows whose lengths fall in several spans (neighbours alike, as rows joined together
    are, then a shuffled tail): every row's output equals the row's call alone, bit for bit."""
    torch.manual_seed(1)
    heads, kv, dim = 9, 3, 64
    lengths = [30 + 3 * r for r in range(24)] + [int(x) for x in torch.randint(1, 400, (16,))]
    rows, width = len(lengths), max(lengths) + 70
    qs = torch.randn(rows, heads, 1, dim)
    ks, vs = torch.randn(rows, kv, width, dim), torch.randn(rows, kv, width, dim)
    batched = cpu_attention.decode_attention(qs, ks, vs, cpu_attention.RowLengths(lengths), 0.125)
    assert len(cpu_attention.RowLengths(lengths).spans()) > 2  # the spans are exercised
    for r, n in enumerate(lengths):
        alone = cpu_attention.decode_attention(
            qs[r : r + 1], ks[r : r + 1, :, :n], vs[r : r + 1, :, :n], [n], 0.125
        )
        assert torch.equal(batched[r : r + 1], alone), (r, n)


def test_spans_cover_the_rows_and_read_no_fewer_columns_than_each_row_needs():
    lengths = [5, 60, 64, 65, 130, 129, 700, 3, 3, 3, 3, 3, 3, 3, 3]
    parts = cpu_attention.spans(lengths)
    assert [a for a, _, _ in parts] == [0] + [b for _, b, _ in parts[:-1]]
    assert parts[-1][1] == len(lengths)
    for a, b, w in parts:
        assert w % cpu_attention.KEY_ALIGN == 0
        assert w == max(-(-n // 64) * 64 for n in lengths[a:b])
    # the 700-token row is read apart: the short rows after it are not read to 704 columns
    assert any(a == 6 and b == 7 for a, b, _ in parts)
    # one span when cutting saves less than a span costs
    assert cpu_attention.spans([10, 70]) == [(0, 2, 128)]
    assert cpu_attention.spans([64] * 5) == [(0, 5, 64)]
