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

from .functional import (act_qparams, fake_quant_act, fake_quant_act_plain, fake_quant_weight,
                         fake_quant_weight_plain, int_range, lsq_scale_grad, ulq_act_grads, ulq_act_grads_plain)

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


def _fq_weight(weight, scale, bits, compiled):
    if compiled:
        qmin, qmax = int_range(bits)
        row = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())
        return _kernels()[1](weight.detach(), row.detach(), qmin, qmax)
    return fake_quant_weight(weight, scale, bits)


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
    compiled: bool = False  # use the torch.compile kernels (set by qat_linear at call time)


class QATLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, clip_max, clip_min, w_scale, spec: QuantSpec, wq=None, act_grid=None):
        if wq is None:
            wq = _fq_weight(weight, w_scale, spec.weight_bits, spec.compiled)
        if spec.act_bits is None:
            a_scale = a_offset = None
            xq = x
        else:
            a_scale, a_offset = act_grid if act_grid is not None else act_qparams(clip_max, clip_min, spec.act_bits)
            xq = _fq_act(x, a_scale, a_offset, spec.act_bits, spec.compiled)
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
            xq2 = _fq_act(x2, a_scale, a_offset, spec.act_bits, spec.compiled) if quant_act else x2
            grad_w = g2.t().mm(xq2)
            del xq2
            if spec.learnable_weight_scale and need_s:
                grad_s = lsq_scale_grad(weight, grad_w, w_scale, spec.weight_bits)
        if need_b:
            grad_b = g2.sum(0)
        if need_x or (quant_act and (need_max or need_min)):
            grad_xq = g2.mm(wq)
            if quant_act:
                grad_x, grad_max, grad_min = _ulq(x2, grad_xq, a_scale, a_offset, clip_max, clip_min,
                                                  spec.act_bits, need_x, spec.compiled)
            else:
                grad_x = grad_xq
            if grad_x is not None:
                grad_x = grad_x.reshape(x.shape)
        return grad_x, grad_w, grad_b, grad_max, grad_min, grad_s, None, None, None


def qat_linear(x, weight, bias, clip_max, clip_min, w_scale, spec: QuantSpec, wq=None, act_grid=None):
    """ŷ = linear(x̂, ŵ, b). Optional ready-made operands: `wq` = fq_weight(weight, w_scale) and
    `act_grid` = act_qparams(clip_max, clip_min, spec.act_bits), both without autograd history."""
    if spec.compiled != _COMPILED:
        spec = spec._replace(compiled=_COMPILED)
    return QATLinearFunction.apply(x, weight, bias, clip_max, clip_min, w_scale, spec, wq, act_grid)


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
