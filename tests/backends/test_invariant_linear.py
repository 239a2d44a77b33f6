"""Linear layers made row-count invariant (``invariant_linear.py``): a row's output is the same
in a call of any size, equal to what the unwrapped layer gives it in a large call."""

from __future__ import annotations

import torch

from synthpref.backends.invariant_linear import PROBE_ROWS, make_row_invariant, padding_table


def _model(*shapes: tuple[int, int]) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *(torch.nn.Linear(i, o, bias=b % 2 == 0) for b, (i, o) in enumerate(shapes))
    )


def test_every_row_count_gives_each_row_its_large_call_bits():
    """Independent computation: each unwrapped layer on 200 rows at once (a large call, whose
    kernel every count of 12 or more rows shares on the CPUs we know)."""
    model = _model((576, 1536), (1536, 576), (576, 192), (576, 4096))
    layers = list(model)
    x = {layer.in_features: torch.randn(200, layer.in_features) for layer in layers}
    with torch.inference_mode():
        large = [layer(x[layer.in_features]) for layer in layers]
        assert make_row_invariant(model)
        for layer, ref in zip(layers, large, strict=True):
            for rows in range(1, 40):
                out = layer(x[layer.in_features][:rows])
                assert torch.equal(out, ref[:rows]), (layer, rows)
            three_d = layer(x[layer.in_features][:6].view(3, 2, -1))  # rows of a [batch, seq] input
            assert torch.equal(three_d.reshape(6, -1), ref[:6])


def test_the_table_pads_only_to_counts_that_match():
    weight = torch.randn(1536, 576)
    table = padding_table(weight)
    assert table is not None and len(table) == PROBE_ROWS
    x = torch.randn(PROBE_ROWS, 576)
    ref = torch.nn.functional.linear(x, weight)
    for rows in range(1, PROBE_ROWS):
        to = table[rows]
        assert rows <= to <= PROBE_ROWS
        assert torch.equal(torch.nn.functional.linear(x[:to], weight), ref[:to])
