"""Linear layers made fast and row-count invariant (``invariant_linear.py``): a row's output is the
same in a call of any size, equal to what the layer's kernel gives it in a large call, and equal to
``F.linear`` up to float32 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from synthpref.backends import invariant_linear
from synthpref.backends.invariant_linear import (
    PROBE_ROWS,
    blas,
    make_row_invariant,
    onednn,
    padding_table,
)

#: a row's bits are checked at the thread count a user's run has (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("all_cores")


def _model(*shapes: tuple[int, int]) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *(torch.nn.Linear(i, o, bias=b % 2 == 0) for b, (i, o) in enumerate(shapes))
    )


SHAPES = ((576, 1536), (1536, 576), (576, 192), (576, 4096))


@pytest.mark.parametrize(
    "kernel", [onednn, blas], ids=lambda k: k.__name__ if callable(k) else str(k)
)
def test_every_row_count_gives_each_row_its_large_call_bits(kernel):
    """Independent computation: each layer's kernel called directly on 200 rows at once (a large
    call, whose kernel every count of 12 or more rows shares on the CPUs we know), no wrapper."""
    if kernel is onednn and not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    model = _model(*SHAPES)
    layers = list(model)
    x = {layer.in_features: torch.randn(200, layer.in_features) for layer in layers}
    with torch.inference_mode():
        large = [kernel(layer.weight, layer.bias)(x[layer.in_features]) for layer in layers]
        exact = [F.linear(x[layer.in_features], layer.weight, layer.bias) for layer in layers]
        assert make_row_invariant(model, kernels=(kernel,))
        for layer, ref, want in zip(layers, large, exact, strict=True):
            torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-4)
            for rows in range(1, 40):
                out = layer(x[layer.in_features][:rows])
                assert torch.equal(out, ref[:rows]), (layer, rows)
            three_d = layer(x[layer.in_features][:6].view(3, 2, -1))  # rows of a [batch, seq] input
            assert torch.equal(three_d.reshape(6, -1), ref[:6])
            assert layer(x[layer.in_features][:0]).shape == (0, layer.out_features)


def test_the_table_pads_only_to_counts_that_match():
    weight = torch.randn(1536, 576)
    table = padding_table(weight)
    assert table is not None and len(table) == PROBE_ROWS
    x = torch.randn(PROBE_ROWS, 576)
    ref = F.linear(x, weight)
    for rows in range(1, PROBE_ROWS):
        to = table[rows]
        assert rows <= to <= PROBE_ROWS
        assert torch.equal(F.linear(x[:to], weight), ref[:to])


def test_a_kernel_that_cannot_run_here_falls_back_to_the_next(monkeypatch):
    def unavailable(weight, bias):
        raise RuntimeError("no such kernel on this machine")

    monkeypatch.setattr(invariant_linear, "_TABLES", {})
    model = _model((64, 32))
    x = torch.randn(5, 64)
    with torch.inference_mode():
        want = F.linear(x, model[0].weight, model[0].bias)
        assert make_row_invariant(model, kernels=(unavailable, blas))
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)


def test_no_invariant_kernel_leaves_the_layers_as_they_are_and_says_so(monkeypatch, caplog):
    """A kernel whose rows change above PROBE_ROWS rows (no padding can help)."""

    def varies(weight, bias):
        return lambda x: F.linear(x, weight, bias) + (x.shape[0] % 7) * 1e-3

    monkeypatch.setattr(invariant_linear, "_TABLES", {})
    model = _model((16, 8))
    forward = model[0].forward
    with torch.inference_mode():
        assert not make_row_invariant(model, kernels=(varies,))
    assert model[0].forward == forward
    assert "other bits" in caplog.text


def test_weights_too_large_for_a_packed_copy_keep_blas(monkeypatch):
    monkeypatch.setattr(invariant_linear, "PACKED_SHARE", 0.0)
    chosen = []
    real = invariant_linear._replace_forward
    monkeypatch.setattr(
        invariant_linear,
        "_replace_forward",
        lambda layer, f, t: chosen.append(f) or real(layer, f, t),
    )
    model = _model((576, 1536))
    x = torch.randn(3, 576)
    with torch.inference_mode():
        want = F.linear(x, model[0].weight, model[0].bias)
        make_row_invariant(model)
        got = model(x)
    assert all(f.__qualname__.startswith("blas") for f in chosen)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
