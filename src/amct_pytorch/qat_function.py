"""The quantized linear as one autograd function.

Forward: ŷ = linear(fq_act(x), fq_weight(w), b). Training saves what nn.Linear saves (x)
plus the weight-sized ŵ; backward recomputes the cheap activation fake-quant from x.
Backward computes the weight gradient first (its x̂ temporary is freed before the input
gradient exists) and the ULQ gradients block by block in the input-gradient buffer, so
the step's extra peak memory is about one weight-sized tensor.
"""
from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .blockwise import (BlockActSpec, dequantize_weight_blocks, fake_quant_act_blocks, fake_quant_weight_learned,
                        learned_scale_grad, weight_codes_from_float)
from .functional import (WeightLayout, act_qparams, fake_quant_act, fake_quant_act_plain, fake_quant_weight,
                         fake_quant_weight_plain, int_range, lsq_scale_grad, lsq_step_grad, scale_view,
                         ulq_act_grads, ulq_act_grads_plain)
from .pair_grid import grid_grads, grid_weight
from .runtime import compiled_kernels_enabled, use_compiled_kernels  # noqa: F401 (their first home, kept)

@functools.cache
def _kernels():
    compile_ = functools.partial(torch.compile, dynamic=None, fullgraph=True)
    return compile_(fake_quant_act_plain), compile_(fake_quant_weight_plain), compile_(ulq_act_grads_plain)


def _fq_act(x, scale, offset, bits, compiled):
    if torch.compiler.is_compiling():  # inside a user's torch.compile: plain ops, traced and fused there
        qmin, qmax = int_range(bits)
        return fake_quant_act_plain(x, scale, offset, qmin, qmax)
    if compiled:
        qmin, qmax = int_range(bits)
        return _kernels()[0](x, scale, offset, qmin, qmax)
    return fake_quant_act(x, scale, offset, bits)


def block_weight_fake_quant(weight, scale, fmt: str, learnable: bool):
    """ŵ of a llama.cpp block-format weight (retrain_weight_config.gguf_type), no autograd history:
    llama-quantize's codes and d of the current weight (ARQ-like), or the codes of the learned scale
    `scale` (one per block of 32 along K, flat or (N, K/32)) with its fp16 value."""
    with torch.no_grad():
        w = weight.detach().reshape(weight.shape[0], -1)
        if learnable:
            wq = fake_quant_weight_learned(w, scale.detach().reshape(w.shape[0], -1), fmt)
        else:
            wq = dequantize_weight_blocks(*weight_codes_from_float(w, fmt))
        return wq.reshape(weight.shape).to(weight.dtype)


def weight_fake_quant(weight, scale, bits, layout=None, fmt=None, learnable=False):
    """ŵ of any weight grid: the INT grids (functional.fake_quant_weight) or a GGUF block format."""
    if fmt is not None:
        return block_weight_fake_quant(weight, scale, fmt, learnable)
    return fake_quant_weight(weight, scale, bits, layout)


def _fq_weight(weight, scale, bits, compiled, layout=None, fmt=None, learnable=False):
    if fmt is not None:
        return block_weight_fake_quant(weight, scale, fmt, learnable)
    if compiled and not torch.compiler.is_compiling():
        qmin, qmax = int_range(bits)
        if scale.numel() > 1:
            view = weight.detach().reshape(layout.view) if layout is not None else weight.detach()
            row = scale_view(scale, layout)
        else:
            view, row = weight.detach(), scale.reshape(())
        return _kernels()[1](view, row.detach(), qmin, qmax).reshape(weight.shape)
    return fake_quant_weight(weight, scale, bits, layout)


def _ulq(x2, grad_xq, a_scale, a_offset, clip_max, clip_min, bits, need_x, compiled):
    compiling = torch.compiler.is_compiling()
    if compiled or compiling:
        qmin, qmax = int_range(bits)
        kernel = ulq_act_grads_plain if compiling else _kernels()[2]
        grad_max, grad_min = kernel(x2, grad_xq, a_scale, a_offset, clip_max, clip_min, qmin, qmax)
        return (grad_xq if need_x else None), grad_max, grad_min
    return ulq_act_grads(x2, grad_xq, a_scale, a_offset, clip_max, clip_min, bits, need_x, inplace=True)


class QuantSpec(NamedTuple):
    act_bits: int | None  # None: activations pass through (calibration calls)
    weight_bits: int
    learnable_weight_scale: bool
    compiled: bool = False  # use the torch.compile kernels (set by qat_apply at call time)
    weight_format: str | None = None  # "q8_0" / "q4_0": llama.cpp's block formats (retrain_weight_config.gguf_type)
    act_blocks: BlockActSpec | None = None  # dynamic per-block activation (retrain_data_config.dynamic_act)
    # the pair-capped INT8 weight grid (kernel_grid="pair_cap"): (order, groups, weight_grad) for
    # pair_grid.grid_weight / grid_grads; None: the plain grid of weight_bits
    pair_grid: tuple | None = None


# ---- the float op of each module type: forward and the two halves of its backward -----
class LinearOp(NamedTuple):
    """y = x @ wᵀ + b over the last dim (nn.Linear)."""

    layout: WeightLayout | None = None  # None: weight rows are the output channels

    def forward(self, xq, wq, bias):
        return F.linear(xq, wq, bias)

    def grad_weight_bias(self, g, xq, weight, need_w, need_b):
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = g2.t().mm(xq.reshape(-1, xq.shape[-1])) if need_w else None
        return grad_w, (g2.sum(0) if need_b else None)

    def grad_input(self, g, x, wq):
        return g.reshape(-1, g.shape[-1]).mm(wq).reshape(x.shape)


LINEAR = LinearOp()


class ConvOp(NamedTuple):
    """torch.convolution with explicit integer padding (nn.ConvNd / nn.ConvTransposeNd)."""

    stride: tuple
    padding: tuple
    dilation: tuple
    transposed: bool
    output_padding: tuple
    groups: int
    layout: WeightLayout | None

    def forward(self, xq, wq, bias):
        return torch.convolution(xq, wq, bias, self.stride, self.padding, self.dilation, self.transposed,
                                 self.output_padding, self.groups)

    def _backward(self, g, x, w, mask, bias_sizes=None):
        return torch.ops.aten.convolution_backward(g, x, w, bias_sizes, self.stride, self.padding, self.dilation,
                                                   self.transposed, self.output_padding, self.groups, mask)

    def grad_weight_bias(self, g, xq, weight, need_w, need_b):
        if not need_w:
            return None, (g.sum(dim=[d for d in range(g.dim()) if d != 1]) if need_b else None)
        _, grad_w, grad_b = self._backward(g, xq, weight, [False, True, need_b], [g.shape[1]] if need_b else None)
        return grad_w, grad_b

    def grad_input(self, g, x, wq):
        # the input's values do not enter its own gradient, only its shape: pass x, not x̂
        return self._backward(g, x, wq, [True, False, False])[0]


class QATFunction(torch.autograd.Function):
    """ŷ = op(fq_act(x), fq_weight(w), b) with the spec's gradients for x, w, b, both clip bounds
    and a learnable weight scale; `op` is the module's float op (LinearOp or ConvOp)."""

    @staticmethod
    def forward(ctx, x, weight, bias, clip_max, clip_min, w_scale, spec: QuantSpec, op, wq=None, act_grid=None):
        if wq is None:
            if spec.pair_grid is not None:
                wq = grid_weight(weight, w_scale, *spec.pair_grid[:2])
            else:
                wq = _fq_weight(weight, w_scale, spec.weight_bits, spec.compiled, op.layout, spec.weight_format,
                                spec.learnable_weight_scale)
        if spec.act_blocks is not None:  # dynamic: its scale comes from x itself, straight-through gradient
            a_scale = a_offset = None
            xq = fake_quant_act_blocks(x, spec.act_blocks)
        elif spec.act_bits is None:
            a_scale = a_offset = None
            xq = x
        else:
            a_scale, a_offset = act_grid if act_grid is not None else act_qparams(clip_max, clip_min, spec.act_bits)
            xq = _fq_act(x, a_scale, a_offset, spec.act_bits, spec.compiled)
        ctx.spec, ctx.op = spec, op
        ctx.save_for_backward(x, weight, wq, w_scale, clip_max, clip_min, a_scale, a_offset)
        return op.forward(xq, wq, bias)

    @staticmethod
    def backward(ctx, grad_y):
        # a backward run inside torch.autocast must not recast the float32 math (the forward ran outside it)
        device_type = grad_y.device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return QATFunction._backward(ctx, grad_y.float())
        return QATFunction._backward(ctx, grad_y if grad_y.dtype == torch.float32 else grad_y.float())

    @staticmethod
    def _backward(ctx, grad_y):
        x, weight, wq, w_scale, clip_max, clip_min, a_scale, a_offset = ctx.saved_tensors
        spec, op = ctx.spec, ctx.op
        need_x, need_w, need_b, need_max, need_min, need_s = ctx.needs_input_grad[:6]
        quant_act = spec.act_bits is not None

        grad_x = grad_w = grad_b = grad_max = grad_min = grad_s = None
        if need_w or need_s:
            if quant_act:
                xq = _fq_act(x, a_scale, a_offset, spec.act_bits, spec.compiled)
            else:
                xq = x if spec.act_blocks is None else fake_quant_act_blocks(x, spec.act_blocks)
            grad_w, grad_b = op.grad_weight_bias(grad_y, xq, weight, True, need_b)
            del xq
            if spec.pair_grid is not None:
                order, groups, weight_grad = spec.pair_grid
                grad_w, grad_s = grid_grads(weight, w_scale, grad_w, order, groups, weight_grad,
                                            spec.learnable_weight_scale and need_s)
            elif spec.learnable_weight_scale and need_s and spec.weight_format is not None:
                w2 = weight.reshape(weight.shape[0], -1)
                grad_s = learned_scale_grad(w2, grad_w.reshape(w2.shape), w_scale.reshape(w2.shape[0], -1),
                                            spec.weight_format).reshape(w_scale.shape)
            elif spec.learnable_weight_scale and need_s:
                grad_s = lsq_scale_grad(weight, grad_w, w_scale, spec.weight_bits, op.layout)
        elif need_b:
            _, grad_b = op.grad_weight_bias(grad_y, x, weight, False, True)
        if need_x or (quant_act and (need_max or need_min)):
            grad_xq = op.grad_input(grad_y, x, wq)
            if quant_act:
                grad_x, grad_max, grad_min = _ulq(x, grad_xq, a_scale, a_offset, clip_max, clip_min,
                                                  spec.act_bits, need_x, spec.compiled)
            else:
                grad_x = grad_xq
            if grad_x is not None:
                grad_x = grad_x.reshape(x.shape)
        return grad_x, grad_w, grad_b, grad_max, grad_min, grad_s, None, None, None, None


def qat_apply(x, weight, bias, clip_max, clip_min, w_scale, spec: QuantSpec, op=LINEAR, wq=None, act_grid=None):
    """ŷ = op(x̂, ŵ, b). Optional ready-made operands: `wq` = fq_weight(weight, w_scale) and
    `act_grid` = act_qparams(clip_max, clip_min, spec.act_bits), both without autograd history."""
    compiled = compiled_kernels_enabled()
    if spec.compiled != compiled:
        spec = spec._replace(compiled=compiled)
    return QATFunction.apply(x, weight, bias, clip_max, clip_min, w_scale, spec, op, wq, act_grid)


class FakeQuantRows(torch.autograd.Function):
    """ŵ = fq(rows, s) for rows looked up in a weight table, each with its own (gathered) scale:
    the straight-through gradient for the rows, LSQ's for s (`lsq_scale_grad`'s formula, with the
    factor of the whole table: `values_per_scale` values share one stored scale)."""

    @staticmethod
    def forward(ctx, rows, scale, bits, learnable, values_per_scale):
        qmin, qmax = int_range(bits)
        v = rows / scale
        wq = torch.round(v).clamp(qmin, qmax) * scale
        if learnable:
            ctx.save_for_backward(v, scale)
        ctx.bits, ctx.learnable, ctx.values_per_scale = bits, learnable, values_per_scale
        return wq

    @staticmethod
    def backward(ctx, g):
        grad_s = None
        if ctx.learnable and ctx.needs_input_grad[1]:
            v, scale = ctx.saved_tensors
            # divided by sqrt(values per scale · qmax) (= times lsq_factor, rounded as EmbeddingQAT always did)
            qmax = int_range(ctx.bits)[1]
            grad_s = (g * lsq_step_grad(v, ctx.bits)).sum_to_size(scale.shape) / (ctx.values_per_scale * qmax) ** 0.5
        return g, grad_s, None, None, None


class WeightCache:
    """ŵ for forwards that do not update state, valid while its source tensors are unchanged.

    Keyed on each source tensor's identity (weak reference), storage and version counter,
    so in-place updates, replaced Parameters and device moves all invalidate it. An in-place
    edit through `.data` bypasses the version counter: call `clear()` after one. Copies and
    pickles of the cache come back empty, so it never travels with a saved module.
    """

    __slots__ = ("_key", "_refs", "scale", "wq")

    def __init__(self):
        self.clear()

    def clear(self):
        self._key = self._refs = self.scale = self.wq = None

    def lookup(self, sources):
        """(scale, ŵ) if cached for exactly these tensors in their current state, else None."""
        if torch.compiler.is_compiling():  # data_ptr/_version cannot be traced: compute ŵ in the graph
            return None
        if self._key != tuple((t.data_ptr(), t._version) for t in sources):
            return None
        if not all(ref() is t for ref, t in zip(self._refs, sources)):
            return None
        return self.scale, self.wq

    def store(self, sources, scale, wq):
        if torch.compiler.is_compiling():
            return
        self._key = tuple((t.data_ptr(), t._version) for t in sources)
        self._refs = tuple(weakref.ref(t) for t in sources)
        self.scale, self.wq = scale, wq

    def __reduce__(self):
        return (WeightCache, ())
