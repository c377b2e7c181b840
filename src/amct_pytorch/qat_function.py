"""The quantized linear as one autograd function.

Forward: ŷ = linear(fq_act(x), fq_weight(w), b). Training saves what nn.Linear saves (x)
plus the weight-sized ŵ; backward recomputes the cheap activation fake-quant from x.
Backward computes the weight gradient first (its x̂ temporary is freed before the input
gradient exists) and the ULQ gradients block by block in the input-gradient buffer, so
the step's extra peak memory is about one weight-sized tensor.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .functional import act_qparams, fake_quant_act, fake_quant_weight, lsq_scale_grad, ulq_act_grads


class QuantSpec(NamedTuple):
    act_bits: int | None  # None: activations pass through (calibration calls)
    weight_bits: int
    learnable_weight_scale: bool


class QATLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, clip_max, clip_min, w_scale, spec: QuantSpec, wq=None):
        if wq is None:
            wq = fake_quant_weight(weight, w_scale, spec.weight_bits)
        if spec.act_bits is None:
            a_scale = a_offset = None
            xq = x
        else:
            a_scale, a_offset = act_qparams(clip_max, clip_min, spec.act_bits)
            xq = fake_quant_act(x, a_scale, a_offset, spec.act_bits)
        ctx.spec = spec
        ctx.save_for_backward(x, weight, wq, w_scale, clip_max, clip_min, a_scale, a_offset)
        return F.linear(xq, wq, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, wq, w_scale, clip_max, clip_min, a_scale, a_offset = ctx.saved_tensors
        spec = ctx.spec
        need_x, need_w, need_b, need_max, need_min, need_s = ctx.needs_input_grad[:6]
        quant_act = spec.act_bits is not None
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])

        grad_x = grad_w = grad_b = grad_max = grad_min = grad_s = None
        if need_w or need_s:
            xq2 = fake_quant_act(x2, a_scale, a_offset, spec.act_bits) if quant_act else x2
            grad_w = g2.t().mm(xq2)
            del xq2
            if spec.learnable_weight_scale and need_s:
                grad_s = lsq_scale_grad(weight, grad_w, w_scale, spec.weight_bits)
        if need_b:
            grad_b = g2.sum(0)
        if need_x or (quant_act and (need_max or need_min)):
            grad_xq = g2.mm(wq)
            if quant_act:
                grad_x, grad_max, grad_min = ulq_act_grads(
                    x2, grad_xq, a_scale, a_offset, clip_max, clip_min, spec.act_bits, need_x, inplace=True
                )
            else:
                grad_x = grad_xq
            if grad_x is not None:
                grad_x = grad_x.reshape(x.shape)
        return grad_x, grad_w, grad_b, grad_max, grad_min, grad_s, None, None


def qat_linear(x, weight, bias, clip_max, clip_min, w_scale, spec: QuantSpec, wq=None):
    """ŷ = linear(x̂, ŵ, b); `wq` may pass a ready ŵ (it must equal fq_weight(weight, w_scale))."""
    return QATLinearFunction.apply(x, weight, bias, clip_max, clip_min, w_scale, spec, wq)


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
