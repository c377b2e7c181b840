"""The quantize-dequantize custom ops that the export-time forward emits, and their ONNX
translations (onnxscript, imported only when a translation runs).

`quant_dequant`: ONNX QuantizeLinear then DequantizeLinear, per tensor or per axis, INT8 or
INT4 (opset 21). `quant_dequant_blocked`: the opset-21 blocked form (one scale per row and block
of columns), for group-wise weights. `onnx_translations()` is the custom translation table
`torch.onnx.export(dynamo=True)` gets.
"""
from __future__ import annotations

import numpy as np
import torch

from .functional import int_range

INT4_OPSET = 21  # first ONNX opset with INT4 QuantizeLinear/DequantizeLinear


@torch.library.custom_op("amct_pytorch::quant_dequant", mutates_args=())
def quant_dequant(x: torch.Tensor, scale: torch.Tensor, zero_point: list[int], axis: int,
                  num_bits: int) -> torch.Tensor:
    """ONNX QuantizeLinear then DequantizeLinear: (clamp(round(x/s) + z) - z) * s; axis -1 = per tensor."""
    qmin, qmax = int_range(num_bits)
    zp = torch.tensor(zero_point, dtype=x.dtype, device=x.device)
    s = scale
    if axis >= 0:
        shape = [1] * x.dim()
        shape[axis] = -1
        s, zp = s.reshape(shape), zp.reshape(shape)
    return ((torch.round(x / s) + zp).clamp(qmin, qmax) - zp) * s


@quant_dequant.register_fake
def _(x, scale, zero_point, axis, num_bits):
    return torch.empty_like(x)


def _quant_dequant_onnx(x, scale, zero_point: list[int], axis: int, num_bits: int):
    from onnxscript import ir, opset18, opset21  # optional dependency: only when exporting

    op = opset21 if num_bits == 4 else opset18  # INT8 Q/DQ (per axis too) exists since opset 13
    zp = np.array(zero_point, dtype=np.int8)
    kwargs = {"axis": axis} if axis >= 0 else {}
    if axis < 0:
        zp = zp.reshape(())
    zp = op.Constant(value=ir.tensor(zp, dtype={4: ir.DataType.INT4, 8: ir.DataType.INT8}[num_bits]))
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp, **kwargs), scale, zp, **kwargs)


@torch.library.custom_op("amct_pytorch::quant_dequant_blocked", mutates_args=())
def quant_dequant_blocked(w: torch.Tensor, scale: torch.Tensor, block_size: int, num_bits: int) -> torch.Tensor:
    """Blocked (opset 21) symmetric Q/DQ of a 2-d weight: scale (rows, cols / block_size), one per
    row and block of `block_size` consecutive columns."""
    qmin, qmax = int_range(num_bits)
    s = scale.repeat_interleave(block_size, dim=1)
    return torch.round(w / s).clamp(qmin, qmax) * s


@quant_dequant_blocked.register_fake
def _(w, scale, block_size, num_bits):
    return torch.empty_like(w)


def _quant_dequant_blocked_onnx(w, scale, block_size: int, num_bits: int):
    from onnxscript import ir, opset21  # optional dependency: only when exporting

    zp = opset21.Constant(value=ir.tensor(np.zeros(tuple(scale.shape), dtype=np.int8),
                                          dtype={4: ir.DataType.INT4, 8: ir.DataType.INT8}[num_bits]))
    kwargs = {"axis": 1, "block_size": block_size}
    return opset21.DequantizeLinear(opset21.QuantizeLinear(w, scale, zp, **kwargs), scale, zp, **kwargs)


def onnx_translations() -> dict:
    """The custom_translation_table export_onnx passes to torch.onnx.export(dynamo=True)."""
    return {torch.ops.amct_pytorch.quant_dequant.default: _quant_dequant_onnx,
            torch.ops.amct_pytorch.quant_dequant_blocked.default: _quant_dequant_blocked_onnx}
