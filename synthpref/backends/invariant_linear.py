"""Linear layers whose output for a row does not depend on how many rows share the call, on CPU.

CPU BLAS libraries pick a matrix kernel by the number of rows: with MKL on an AVX2 CPU, a row's output
from ``F.linear`` differs in its last float32 bits at 1-3, 5-7 and 9-11 rows from what it is at 4, 8
or 12 and more. A decode step runs one row per sample, so a sample's logits moved with the size of its
batch, and at temperature 1 a draw near a boundary of the sampling distribution then picked another
token: a resumed run (other neighbours) could write another text than the run it resumes.

At load, :func:`make_row_invariant` measures, for each linear shape of the model, which row counts give
the rows the same bits as a large call does, and wraps every linear layer so a call with fewer rows is
padded with zero rows up to the nearest such count. The measurement runs on the machine that runs the
model, so a CPU with other kernels gets its own table; where no small count matches (a library whose
kernels also vary above :data:`PROBE_ROWS` rows), the model is left as it is and
:func:`make_row_invariant` says so.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

#: the row count whose bits every padded call must reproduce; counts below it are probed
PROBE_ROWS = 64
#: larger counts checked against :data:`PROBE_ROWS` before any padding is trusted
LARGE_ROWS = (65, 127, 300, 1000)
#: most output features a probe computes
PROBE_OUTPUTS = 2048


#: tables already measured in this process, by (weight shape, dtype, has bias): the kernel a call
#: gets depends on shapes, not values
_TABLES: dict[tuple, list[int] | None] = {}


def padding_table(weight: Any, bias: Any = None) -> list[int] | None:
    """For row counts ``m`` below :data:`PROBE_ROWS`, the row count to pad a call of ``m`` rows to
    (``table[m]``), so each row's output equals its output in any call of :data:`PROBE_ROWS` or
    more rows; None when calls of more rows disagree among themselves (no padding can help).

    The kernel is chosen by the row count, so the counts are probed on at most
    :data:`PROBE_OUTPUTS` of the layer's outputs (an output head has 50k-250k), then the counts the
    table pads to (and one it keeps) are checked on the whole layer."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(max(LARGE_ROWS), weight.shape[1], generator=g).to(weight)
    part = weight[:PROBE_OUTPUTS].contiguous()
    bias_part = None if bias is None else bias[:PROBE_OUTPUTS].contiguous()
    reference = F.linear(x, part, bias_part)
    for m in LARGE_ROWS:
        if not torch.equal(F.linear(x[:m], part, bias_part), reference[:m]):
            return None
    good = [
        m == PROBE_ROWS or torch.equal(F.linear(x[:m], part, bias_part), reference[:m])
        for m in range(PROBE_ROWS + 1)
    ]
    table, nearest = [0] * PROBE_ROWS, PROBE_ROWS
    for m in range(PROBE_ROWS - 1, 0, -1):
        if good[m]:
            nearest = m
        table[m] = nearest
    if weight.shape[0] > PROBE_OUTPUTS:
        whole = F.linear(x[:PROBE_ROWS], weight, bias)
        padded_to = {table[m] for m in range(1, PROBE_ROWS) if table[m] != m}
        for m in sorted(padded_to | {PROBE_ROWS // 4 + 1}):
            if not torch.equal(F.linear(x[:m], weight, bias), whole[:m]):
                return None
    return table


def make_row_invariant(model: Any) -> bool:
    """Wrap ``model``'s linear layers (on CPU) so each row's output is independent of the call's row
    count; returns whether every linear layer could be made so."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears or linears[0].weight.device.type != "cpu":
        return False
    tables = []
    for layer in linears:
        w, b = layer.weight, layer.bias
        shape = (tuple(w.shape), w.dtype, b is not None)
        if shape not in _TABLES:
            with torch.inference_mode():
                _TABLES[shape] = padding_table(w, b)
        tables.append(_TABLES[shape])
    if any(t is None for t in tables):
        log.warning(
            "this CPU's matrix kernels give a row other bits in calls of different sizes; "
            "a sample's text may depend on its batch"
        )
        return False
    for layer, table in zip(linears, tables, strict=True):
        if any(table[m] != m for m in range(1, PROBE_ROWS)):
            _pad_rows(layer, table)
    return True


def _pad_rows(layer: Any, table: list[int]) -> None:
    """Replace ``layer.forward`` by one that pads a call of ``m`` rows to ``table[m]`` rows."""
    import torch

    forward = layer.forward

    def padded(x: Any) -> Any:
        features = x.shape[-1]
        rows = x.numel() // features if features else 0
        if not 0 < rows < len(table) or table[rows] == rows:
            return forward(x)
        flat = x.reshape(rows, features)
        flat = torch.cat([flat, flat.new_zeros((table[rows] - rows, features))])
        return forward(flat)[:rows].reshape(*x.shape[:-1], -1)

    layer.forward = padded
