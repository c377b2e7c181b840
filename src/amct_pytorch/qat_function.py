"""The quantized linear as one autograd function.

Forward: ŷ = linear(fq_act(x), fq_weight(w), b). Backward recomputes the cheap activation
fake-quant from the saved input instead of keeping an activation-sized x̂, so training
saves exactly what nn.Linear saves (x) plus the weight-sized ŵ.
"""
from __future__ import annotations

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
    def forward(ctx, x, weight, bias, clip_max, clip_min, w_scale, spec: QuantSpec):
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
        need_x, need_w, need_b, need_max, need_min, need_s, _ = ctx.needs_input_grad
        quant_act = spec.act_bits is not None
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])

        grad_x = grad_w = grad_b = grad_max = grad_min = grad_s = None
        if need_w or need_s:
            xq2 = fake_quant_act(x2, a_scale, a_offset, spec.act_bits) if quant_act else x2
            grad_w = g2.t().mm(xq2)
            if spec.learnable_weight_scale:
                grad_s = lsq_scale_grad(weight, grad_w, w_scale, spec.weight_bits)
        if need_b:
            grad_b = g2.sum(0)
        if need_x or (quant_act and (need_max or need_min)):
            grad_xq = g2.mm(wq)
            if quant_act:
                grad_x, grad_max, grad_min = ulq_act_grads(
                    x2, grad_xq, a_scale, a_offset, clip_max, clip_min, spec.act_bits, need_x
                )
            else:
                grad_x = grad_xq
            if grad_x is not None:
                grad_x = grad_x.reshape(x.shape)
        return grad_x, grad_w, grad_b, grad_max, grad_min, grad_s, None


def qat_linear(x, weight, bias, clip_max, clip_min, w_scale, spec: QuantSpec):
    return QATLinearFunction.apply(x, weight, bias, clip_max, clip_min, w_scale, spec)
