"""The quantized linear as one autograd function.

Forward: ŷ = linear(fq_act(x), fq_weight(w), b). Training saves what nn.Linear saves (x)
plus the weight-sized ŵ; backward recomputes the cheap activation fake-quant from x.
Backward computes the weight gradient first (its x̂ temporary is freed before the input
gradient exists) and the ULQ gradients block by block in the input-gradient buffer, so
the step's extra peak memory is about one weight-sized tensor.
"""
from __future__ import annotations

import functools
import os
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .functional import (WeightLayout, act_qparams, fake_quant_act, fake_quant_act_plain, fake_quant_weight,
                         fake_quant_weight_plain, int_range, lsq_scale_grad, scale_view, ulq_act_grads, ulq_act_grads_plain)

# Opt-in fused kernels: torch.compile (inductor) of the elementwise math, compiled lazily on
# first use (~10-30 s per shape family). Same formulas, so the fake-quantized tensors are
# bit-identical; only the order of the ULQ sums differs (float rounding of the gradients).
_COMPILED = os.environ.get("AMCT_PYTORCH_COMPILE", "0") == "1"


def use_compiled_kernels(enabled: bool = True) -> None:
    """Turn the torch.compile kernels on or off for every LinearQAT (env: AMCT_PYTORCH_COMPILE=1)."""
    global _COMPILED
    if not isinstance(enabled, bool):
        raise TypeError(f"use_compiled_kernels: enabled must be a bool, got {enabled!r}")
    _COMPILED = enabled


def compiled_kernels_enabled() -> bool:
    return _COMPILED


@functools.cache
def _kernels():
    compile_ = functools.partial(torch.compile, dynamic=None, fullgraph=True)
    return compile_(fake_quant_act_plain), compile_(fake_quant_weight_plain), compile_(ulq_act_grads_plain)


def _fq_act(x, scale, offset, bits, compiled):
    if compiled:
        qmin, qmax = int_range(bits)
        return _kernels()[0](x, scale, offset, qmin, qmax)
    return fake_quant_act(x, scale, offset, bits)


def _fq_weight(weight, scale, bits, compiled, layout=None):
    if compiled:
        qmin, qmax = int_range(bits)
        if scale.numel() > 1:
            view = weight.detach().reshape(layout.view) if layout is not None else weight.detach()
            row = scale_view(scale, layout)
        else:
            view, row = weight.detach(), scale.reshape(())
        return _kernels()[1](view, row.detach(), qmin, qmax).reshape(weight.shape)
    return fake_quant_weight(weight, scale, bits, layout)


def _ulq(x2, grad_xq, a_scale, a_offset, clip_max, clip_min, bits, need_x, compiled):
    if compiled:
        qmin, qmax = int_range(bits)
        grad_max, grad_min = _kernels()[2](x2, grad_xq, a_scale, a_offset, clip_max, clip_min, qmin, qmax)
        return (grad_xq if need_x else None), grad_max, grad_min
    return ulq_act_grads(x2, grad_xq, a_scale, a_offset, clip_max, clip_min, bits, need_x, inplace=True)


class QuantSpec(NamedTuple):
    act_bits: int | None  # None: activations pass through (calibration calls)
    weight_bits: int
    learnable_weight_scale: bool
    compiled: bool = False  # use the torch.compile kernels (set by qat_apply at call time)


# ---- the float op of each module type: forward and the two halves of its backward -----
class LinearOp:
    """y = x @ wᵀ + b over the last dim (nn.Linear)."""

    layout = None  # weight rows are the output channels

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
            wq = _fq_weight(weight, w_scale, spec.weight_bits, spec.compiled, op.layout)
        if spec.act_bits is None:
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
        x, weight, wq, w_scale, clip_max, clip_min, a_scale, a_offset = ctx.saved_tensors
        spec, op = ctx.spec, ctx.op
        need_x, need_w, need_b, need_max, need_min, need_s = ctx.needs_input_grad[:6]
        quant_act = spec.act_bits is not None

        grad_x = grad_w = grad_b = grad_max = grad_min = grad_s = None
        if need_w or need_s:
            xq = _fq_act(x, a_scale, a_offset, spec.act_bits, spec.compiled) if quant_act else x
            grad_w, grad_b = op.grad_weight_bias(grad_y, xq, weight, True, need_b)
            del xq
            if spec.learnable_weight_scale and need_s:
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
    if spec.compiled != _COMPILED:
        spec = spec._replace(compiled=_COMPILED)
    return QATFunction.apply(x, weight, bias, clip_max, clip_min, w_scale, spec, op, wq, act_grid)


def qat_linear(x, weight, bias, clip_max, clip_min, w_scale, spec: QuantSpec, wq=None, act_grid=None):
    """ŷ = linear(x̂, ŵ, b) (see qat_apply)."""
    return qat_apply(x, weight, bias, clip_max, clip_min, w_scale, spec, LINEAR, wq, act_grid)


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
        if self._key != tuple((t.data_ptr(), t._version) for t in sources):
            return None
        if not all(ref() is t for ref, t in zip(self._refs, sources)):
            return None
        return self.scale, self.wq

    def store(self, sources, scale, wq):
        self._key = tuple((t.data_ptr(), t._version) for t in sources)
        self._refs = tuple(weakref.ref(t) for t in sources)
        self.scale, self.wq = scale, wq

    def __reduce__(self):
        return (WeightCache, ())
