"""Linear layers on CPU that are fast at a decode step's few rows and give a row the same output
whatever the number of rows that share the call.

Speed: MKL's ``sgemm`` (what ``F.linear`` calls) copies and packs the weight matrix on every call. A
decode step of the 135M embedded model multiplies 40 rows by 211 weight matrices, each fetched from
memory, so the packing is a large part of the step (on 2 AVX2 cores, 40 rows: 113 ms for the layers'
matrices and 38 ms for the output head, against 75 and 18 ms with weights packed once). When the
weights are float32 and torch has oneDNN, each layer's weight is packed once at load
(``torch.ops.mkldnn._reorder_linear_weight``, the packing torch's own compiler uses for frozen CPU
graphs) and every call runs oneDNN's matrix product on it (``_linear_pointwise``). The packed copy
is held beside the layer's weight, which the model's other code still reads: with oneDNN's
buffers, a loaded model takes ~2x its linear weights' bytes more (+1.2 GB for the embedded model in
float32), so models whose copies would pass :data:`PACKED_SHARE` of the machine's memory keep BLAS.

Invariance: a BLAS library may pick its kernel by the number of rows: with MKL on an AVX2 CPU, a
row's output from ``F.linear`` differs in its last float32 bits at 1-3, 5-7 and 9-11 rows from what
it is at 4, 8 or 12 and more. A decode step runs one row per sample, so a sample's logits moved with
the size of its batch, and at temperature 1 a draw near a boundary of the sampling distribution then
picked another token: a resumed run (other neighbours) could write another text than the run it
resumes. At load, :func:`make_row_invariant` measures, for each linear shape and kernel, which row
counts give the rows the same bits as a large call does, and a call with fewer rows is padded with
zero rows up to the nearest such count (oneDNN's packed kernel needs no padding on the CPUs we
know; MKL's does). The measurement runs on the machine that runs the model, so a CPU with other
kernels gets its own table; where no small count matches (kernels that also vary above
:data:`PROBE_ROWS` rows) the next kernel is tried; a layer no kernel makes invariant is left as it
is, and :func:`make_row_invariant` says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: the row count whose bits every padded call must reproduce; counts below it are probed
PROBE_ROWS = 64
#: larger counts checked against :data:`PROBE_ROWS` before any padding is trusted
LARGE_ROWS = (65, 127, 300, 1000)
#: most output features a probe computes
PROBE_OUTPUTS = 2048

#: ``kernel(weight, bias)`` -> a function of 2-D inputs computing ``F.linear(x, weight, bias)``
Kernel = Callable[[Any, Any], Callable[[Any], Any]]


def blas(weight: Any, bias: Any) -> Callable[[Any], Any]:
    """``F.linear``: the BLAS library's matrix product, packing the weight on each call."""
    import torch.nn.functional as F

    return lambda x: F.linear(x, weight, bias)


def onednn(weight: Any, bias: Any) -> Callable[[Any], Any]:
    """oneDNN's matrix product on a weight packed once, here; raises ``RuntimeError`` where torch
    has no oneDNN or oneDNN takes no such weight."""
    import torch

    if weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        raise RuntimeError(f"no packed oneDNN kernel for {weight.dtype} weights here")
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PROBE_ROWS)
    bias = None if bias is None else bias.detach()
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


#: most of the machine's memory the packed copies of a model's weights may take
PACKED_SHARE = 0.25

#: kernels in the order they are tried
KERNELS: tuple[Kernel, ...] = (onednn, blas)

#: tables already measured in this process, by (kernel, weight shape, dtype, has bias): the kernel a
#: call gets depends on shapes, not values
_TABLES: dict[tuple, list[int] | None] = {}


def padding_table(
    weight: Any, bias: Any = None, kernel: Kernel = blas, whole: Callable[[Any], Any] | None = None
) -> list[int] | None:
    """For row counts ``m`` below :data:`PROBE_ROWS`, the row count to pad a call of ``m`` rows to
    (``table[m]``), so each row's output from ``kernel`` equals its output in any call of
    :data:`PROBE_ROWS` or more rows; None when calls of more rows disagree among themselves (no
    padding can help).

    The kernel is chosen by the row count, so the counts are probed on at most
    :data:`PROBE_OUTPUTS` of the layer's outputs (an output head has 50k-250k), then the counts the
    table pads to, and 1 and 17 rows as padded, are checked on the whole layer (``whole``: the
    layer's ``kernel(weight, bias)`` where the caller has built it already)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(max(LARGE_ROWS), weight.shape[1], generator=g).to(weight)
    part = kernel(
        weight[:PROBE_OUTPUTS].contiguous(),
        None if bias is None else bias[:PROBE_OUTPUTS].contiguous(),
    )
    reference = part(x)
    for m in LARGE_ROWS:
        if not torch.equal(part(x[:m]), reference[:m]):
            return None
    good = [
        m == PROBE_ROWS or torch.equal(part(x[:m]), reference[:m]) for m in range(PROBE_ROWS + 1)
    ]
    table, nearest = [0] * PROBE_ROWS, PROBE_ROWS
    for m in range(PROBE_ROWS - 1, 0, -1):
        if good[m]:
            nearest = m
        table[m] = nearest
    if weight.shape[0] > PROBE_OUTPUTS:
        full = whole or kernel(weight, bias)
        large = full(x[:PROBE_ROWS])
        padded_to = {table[m] for m in range(1, PROBE_ROWS) if table[m] != m}
        for m in sorted(padded_to | {1, PROBE_ROWS // 4 + 1}):
            if not torch.equal(full(x[: table[m]])[:m], large[:m]):
                return None
    return table


def make_row_invariant(model: Any, kernels: tuple[Kernel, ...] = KERNELS) -> bool:
    """Give ``model``'s linear layers (on CPU) the first of ``kernels`` whose output for a row is
    independent of the call's row count (padding calls of few rows where the table says so);
    returns whether every linear layer could be made so. Layers no kernel makes invariant keep
    ``F.linear``."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears or linears[0].weight.device.type != "cpu":
        return False
    if onednn in kernels and not _packing_fits(linears):
        log.info("linear weights too large to hold a packed copy: using BLAS")
        kernels = tuple(k for k in kernels if k is not onednn)
    invariant = True
    with torch.inference_mode():
        for layer in linears:
            chosen = _choose(layer.weight, layer.bias, kernels)
            if chosen is None:
                invariant = False
                continue
            kernel, linear, table = chosen
            if kernel is not blas or any(table[m] != m for m in range(1, PROBE_ROWS)):
                _replace_forward(layer, linear, table)
    if not invariant:
        log.warning(
            "this CPU's matrix kernels give a row other bits in calls of different sizes; "
            "a sample's text may depend on its batch"
        )
    return invariant


def _packing_fits(linears: list) -> bool:
    """Whether packed copies of these layers' weights fit in :data:`PACKED_SHARE` of the machine's
    memory; the packed copies and oneDNN's buffers measured ~2x the weights' bytes (SmolLM2-135M:
    +1.2 GB), so a model of several billion parameters on CPU keeps BLAS."""
    import os

    need = 2 * sum(m.weight.numel() * m.weight.element_size() for m in linears)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on Linux: no cap known
        return True
    return need <= total * PACKED_SHARE


def _choose(
    weight: Any, bias: Any, kernels: tuple[Kernel, ...]
) -> tuple[Kernel, Callable[[Any], Any], list[int]] | None:
    """The first kernel with a padding table for this layer's shape, the layer's function on it
    (built once: packing an output head's weight takes ~0.1 GB and a moment), and the table."""
    for kernel in kernels:
        shape = (kernel.__name__, tuple(weight.shape), weight.dtype, bias is not None)
        if shape in _TABLES and _TABLES[shape] is None:
            continue
        try:
            linear = kernel(weight, bias)
            if shape not in _TABLES:
                _TABLES[shape] = padding_table(weight, bias, kernel, whole=linear)
        except RuntimeError as exc:
            log.debug("linear kernel %s unavailable: %s", kernel.__name__, exc)
            _TABLES[shape] = None
        if _TABLES[shape] is not None:
            return kernel, linear, _TABLES[shape]
    return None


def _replace_forward(layer: Any, linear: Callable[[Any], Any], table: list[int]) -> None:
    """Replace ``layer.forward`` by ``linear`` on the rows flattened to 2-D, a call of ``m`` rows
    padded to ``table[m]`` rows."""
    import torch

    out_features = layer.out_features

    def forward(x: Any) -> Any:
        features = x.shape[-1]
        rows = x.numel() // features if features else 0
        if rows == 0:
            return x.new_zeros((*x.shape[:-1], out_features))
        flat = x.reshape(rows, features)
        if rows < len(table) and table[rows] != rows:
            flat = torch.cat([flat, flat.new_zeros((table[rows] - rows, features))])
        return linear(flat)[:rows].reshape(*x.shape[:-1], -1)

    layer.forward = forward
