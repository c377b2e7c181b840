"""A kernel-aware INT8 weight grid: codes that ONNX Runtime's u8s8 kernel sums exactly on every CPU
(issue 19).

On x86 CPUs without VNNI, ORT adds the products of ADJACENT PAIRS of weight codes along the
reduction dimension in saturating int16 (see amct_pytorch.saturation). A pair (q_a, q_b) can
saturate iff the two codes share a sign and |q_a| + |q_b| > 128. This module quantizes a float
weight onto the grid of codes that satisfy that rule in the order the fused kernel reduces:

  order="linear": torch Linear weight (out, in): pairs (2j, 2j+1) along `in`
                  (the exported MatMul weight is its transpose, (in, out): pairs of rows);
  order="conv":   torch ConvNd weight (out, in/groups, *kernel): pairs along the flattened
                  (*kernel, in/groups) axis, input channel fastest (QLinearConv's order);
                  a 1x1 conv therefore gets exactly the Linear grid of weight[:, :, 0, 0].
                  A depthwise conv (in/groups == 1 and out == groups) runs on ORT's exact
                  depthwise kernel and is left unconstrained.

Which partner gives way. For a violating pair the grid takes the integer point nearest to
(v_a, v_b) = (w_a, w_b) / s among the codes that satisfy the rule. With A = |v_a|, B = |v_b| the
unconstrained nearest codes have |q_a| + |q_b| >= 129, so the nearest feasible point lies on
|q_a| + |q_b| = 128 (a separable convex cost: were the sum smaller, moving one code back towards
its own v would be cheaper and still feasible), and along that line the cost
(x - A)^2 + (128 - x - B)^2 is a parabola in x = |q_a| with vertex (A - B + 128) / 2; the best
integer x is that vertex rounded and clamped to the codes' limits ([128 - lim_b, lim_a], lim = 127
for positive, 128 for negative codes). So the reduction of 128's excess is SHARED by the two
partners according to their rounding residuals, not put on one of them: (127, 127) from
v = (127.2, 126.9) becomes (64, 64), squared error 2 * 63^2 = 7938, where "the smaller partner
gives way" would give (127, 1), 126^2 = 15876. For a layer's output on inputs with uncorrelated
components of equal variance the output error is proportional to the summed squared weight
error, which this choice minimises pair by pair (it is the exact projection onto the grid).

Gradients (the same piecewise derivative for both, with round() straight-through):
  inside a capped pair, while the vertex is inside its limits,
      q_a = sign * (A - B + 128) / 2 (rounded), q_b = sign * 128 - q_a
  so dq_a/dv_a = dq_b/dv_b = 1/2 and dq_a/dv_b = dq_b/dv_a = -1/2 (the Jacobian J of the
  Euclidean projection onto the line); where the vertex is clamped both codes are constant
  (J = 0); elsewhere J is 1 inside [qmin, qmax] and 0 where the code is clipped.
  * weight: weight_grad="projected" (this function's default; the QAT layers default to
    "identity", retrain_weight_config.kernel_grid_grad) passes J^T g (the pair's common mode gets no
    gradient while the cap binds; the difference does); weight_grad="identity" passes g unchanged,
    the plain straight-through rule the library's other weight quantizers use.
  * learnable (LSQ/ULQ) scale: d(s * q(w / s))/ds = q - J v, summed per scale and multiplied by
    LSQ's 1 / sqrt(numel_per_scale * qmax), as `functional.lsq_scale_grad` does for the plain grid
    (for unconstrained codes q - J v is round(v) - v inside and qmin/qmax outside, i.e. the same).

The 7-bit alternative is the plain symmetric grid with codes in [-64, 63] (`fake_quant_int7`):
no pair can then exceed 128, so it needs no pair logic, at half the resolution.
"""
from __future__ import annotations

import torch

from .functional import arq_scale

from .functional import int_range

ORDERS = ("linear", "conv")
WEIGHT_GRADS = ("projected", "identity")
PAIR_LIMIT = 128


def _check(weight: torch.Tensor, scale: torch.Tensor, order: str, groups: int, num_bits: int = 8):
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if order == "linear" and weight.dim() != 2:
        raise ValueError(f"order='linear' needs a 2-d (out, in) weight, got shape {tuple(weight.shape)}")
    if order == "conv" and weight.dim() < 3:
        raise ValueError(f"order='conv' needs an (out, in/groups, *kernel) weight, got shape {tuple(weight.shape)}")
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups must be a positive int dividing out channels ({weight.shape[0]}), got {groups!r}")
    if scale.numel() not in (1, weight.shape[0]):
        raise ValueError(f"scale must hold 1 or {weight.shape[0]} (one per output channel) values, "
                         f"got {scale.numel()}")
    if num_bits != 8:
        raise ValueError(f"the pair grid is an INT8 grid, got num_bits={num_bits} (use fake_quant_int7 for 7 bits)")


def to_reduction_rows(weight: torch.Tensor, order: str) -> torch.Tensor:
    """(out, R): each row an output channel's weights in the kernel's reduction order."""
    if order == "linear":
        return weight
    return weight.movedim(1, -1).reshape(weight.shape[0], -1)


def from_reduction_rows(rows: torch.Tensor, weight_shape, order: str) -> torch.Tensor:
    if order == "linear":
        return rows
    out, cg, *kernel = weight_shape
    return rows.reshape(out, *kernel, cg).movedim(-1, 1)


def is_depthwise(weight_shape, groups: int) -> bool:
    return len(weight_shape) >= 3 and weight_shape[1] == 1 and weight_shape[0] == groups


def _pair_solve(v: torch.Tensor):
    """v: (out, R) real codes w / s. Returns (q, J_self, J_partner) with q the pair-capped codes
    (float tensor of integers) and the Jacobian entries dq_i/dv_i, dq_i/dv_partner(i)."""
    qmin, qmax = int_range(8)
    out, r = v.shape
    if r % 2:
        v = torch.cat([v, v.new_zeros(out, 1)], dim=1)
    va, vb = v[:, 0::2], v[:, 1::2]
    qa, qb = torch.round(va).clamp(qmin, qmax), torch.round(vb).clamp(qmin, qmax)
    ja = ((va >= qmin) & (va <= qmax)).to(v.dtype)
    jb = ((vb >= qmin) & (vb <= qmax)).to(v.dtype)
    capped = (qa * qb > 0) & (qa.abs() + qb.abs() > PAIR_LIMIT)
    sign = torch.sign(qa)
    lim_a = torch.where(sign > 0, float(qmax), float(-qmin))
    lim_b = lim_a  # same sign inside a capped pair
    big_a, big_b = va.abs(), vb.abs()
    vertex = (big_a - big_b + PAIR_LIMIT) / 2
    lo, hi = PAIR_LIMIT - lim_b, lim_a
    x = torch.round(vertex).clamp(lo, hi)
    inner = ((vertex > lo) & (vertex < hi)).to(v.dtype)
    qa_c, qb_c = sign * x, sign * (PAIR_LIMIT - x)
    half = 0.5 * inner
    q_a = torch.where(capped, qa_c, qa)
    q_b = torch.where(capped, qb_c, qb)
    js_a = torch.where(capped, half, ja)
    js_b = torch.where(capped, half, jb)
    jp_a = torch.where(capped, -half, torch.zeros_like(half))
    jp_b = jp_a
    q = torch.stack([q_a, q_b], dim=2).reshape(out, -1)[:, :r]
    j_self = torch.stack([js_a, js_b], dim=2).reshape(out, -1)[:, :r]
    j_part = torch.stack([jp_a, jp_b], dim=2).reshape(out, -1)[:, :r]
    return q, j_self, j_part


def _partner(t: torch.Tensor) -> torch.Tensor:
    """t with each element replaced by its pair partner's (the last, unpaired one by 0)."""
    out, r = t.shape
    if r % 2:
        t = torch.cat([t, t.new_zeros(out, 1)], dim=1)
    swapped = torch.stack([t[:, 1::2], t[:, 0::2]], dim=2).reshape(out, -1)
    return swapped[:, :r]


def _scale_rows(scale: torch.Tensor, out: int) -> torch.Tensor:
    return scale.reshape(1, 1) if scale.numel() == 1 else scale.reshape(out, 1)


def pair_codes(weight: torch.Tensor, scale: torch.Tensor, order: str = "linear", groups: int = 1) -> torch.Tensor:
    """int8 codes of `weight` on the pair-capped grid (shaped like `weight`): the nearest codes to
    weight / scale whose same-sign adjacent pairs (in the kernel's reduction order) have
    |q_a| + |q_b| <= 128."""
    _check(weight, scale, order, groups)
    rows = to_reduction_rows(weight.detach(), order)
    v = rows / _scale_rows(scale.detach(), rows.shape[0])
    if order == "conv" and is_depthwise(weight.shape, groups):
        qmin, qmax = int_range(8)
        q = torch.round(v).clamp(qmin, qmax)
    else:
        q = _pair_solve(v)[0]
    return from_reduction_rows(q, weight.shape, order).to(torch.int8)


GRIDS = ("pair", "int7")


def _solve(v: torch.Tensor, grid: str, unconstrained: bool):
    """Codes and Jacobian entries for the rows v = w / s of one weight."""
    if grid == "int7" or unconstrained:
        qmin, qmax = int_range(7 if grid == "int7" else 8)
        q = torch.round(v).clamp(qmin, qmax)
        return q, ((v >= qmin) & (v <= qmax)).to(v.dtype), torch.zeros_like(v), qmax
    return (*_pair_solve(v), int_range(8)[1])


def _grid_state(weight, scale, order, groups, grid):
    rows = to_reduction_rows(weight, order)
    s = _scale_rows(scale, rows.shape[0])
    v = rows / s
    q, j_self, j_part, qmax = _solve(v, grid, order == "conv" and is_depthwise(weight.shape, groups))
    return s, v, q, j_self, j_part, qmax


def grid_weight(weight: torch.Tensor, scale: torch.Tensor, order: str = "linear", groups: int = 1) -> torch.Tensor:
    """ŵ on the pair-capped grid, without autograd history (the forward of `grid_grads`)."""
    with torch.no_grad():
        s, _, q, _, _, _ = _grid_state(weight.detach(), scale.detach(), order, groups, "pair")
        return from_reduction_rows(q * s, weight.shape, order)


def grid_grads(weight: torch.Tensor, scale: torch.Tensor, grad_wq: torch.Tensor, order: str = "linear",
               groups: int = 1, weight_grad: str = "identity", need_scale: bool = True):
    """(dL/dw, dL/ds) of ŵ = `grid_weight(weight, scale)` given dL/dŵ = `grad_wq` (the module docstring's
    rules; recomputed from weight and scale, so a training forward keeps nothing extra). dL/ds is
    None unless `need_scale`; it has `scale`'s shape."""
    with torch.no_grad():
        _, v, q, j_self, j_part, qmax = _grid_state(weight.detach(), scale.detach(), order, groups, "pair")
        g = to_reduction_rows(grad_wq, order)
        if weight_grad == "identity":
            grad_w = grad_wq
        elif weight_grad == "projected":  # J^T g: J is symmetric within a pair
            grad_w = from_reduction_rows(j_self * g + _partner(j_part * g), weight.shape, order)
        else:
            raise ValueError(f"weight_grad must be one of {WEIGHT_GRADS}, got {weight_grad!r}")
        grad_s = None
        if need_scale:
            grad_s = _scale_grad(g, q, v, j_self, j_part, scale, qmax)
    return grad_w, grad_s


def _scale_grad(g, q, v, j_self, j_part, scale, qmax):
    """LSQ's scale gradient through the projection: sum g·(q - J·v), times 1/sqrt(values per scale · qmax)."""
    dq_ds = q - (j_self * v + j_part * _partner(v))
    factor = 1.0 / (g.numel() // scale.numel() * qmax) ** 0.5
    if scale.numel() == 1:
        return (g * dq_ds).sum().reshape(scale.shape) * factor
    return (g * dq_ds).sum(dim=1).reshape(scale.shape) * factor


class _GridFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scale, order, groups, weight_grad, grid):
        rows = to_reduction_rows(weight, order)
        s = _scale_rows(scale, rows.shape[0])
        v = rows / s
        q, j_self, j_part, qmax = _solve(v, grid, order == "conv" and is_depthwise(weight.shape, groups))
        ctx.save_for_backward(v, q, j_self, j_part, scale)
        ctx.meta = (order, tuple(weight.shape), weight_grad, qmax)
        return from_reduction_rows(q * s, weight.shape, order)

    @staticmethod
    def backward(ctx, grad_out):
        v, q, j_self, j_part, scale = ctx.saved_tensors
        order, shape, weight_grad, qmax = ctx.meta
        g = to_reduction_rows(grad_out, order)
        grad_w = grad_s = None
        if ctx.needs_input_grad[0]:
            if weight_grad == "identity":
                grad_w = grad_out
            else:  # J^T g: J is symmetric within a pair
                grad_w = from_reduction_rows(j_self * g + _partner(j_part * g), shape, order)
        if ctx.needs_input_grad[1]:
            grad_s = _scale_grad(g, q, v, j_self, j_part, scale, qmax)
        return grad_w, grad_s, None, None, None, None


def fake_quant_pair(weight: torch.Tensor, scale: torch.Tensor, order: str = "linear", groups: int = 1,
                    weight_grad: str = "projected", num_bits: int = 8) -> torch.Tensor:
    """ŵ = scale * pair_codes(weight, scale): the INT8 fake-quantized weight on the pair-capped
    grid, differentiable in `weight` and `scale` as the module docstring derives. `scale`: one
    value, or one per output channel (dim 0 of a Linear / ConvNd weight), positive."""
    _check(weight, scale, order, groups, num_bits)
    if weight_grad not in WEIGHT_GRADS:
        raise ValueError(f"weight_grad must be one of {WEIGHT_GRADS}, got {weight_grad!r}")
    return _GridFakeQuant.apply(weight, scale, order, groups, weight_grad, "pair")


def fake_quant_int7(weight: torch.Tensor, scale: torch.Tensor, weight_grad: str = "identity") -> torch.Tensor:
    """The 7-bit alternative: clamp(round(w / s), -64, 63) * s, per tensor or per output channel
    (dim 0). Scale gradient: LSQ's (round(v) - v inside, the clipped bound outside, times
    1/sqrt(numel_per_scale * 63)); weight gradient: plain straight-through ("identity", as the
    library's weight quantizers) or masked outside the range ("projected")."""
    order = "linear" if weight.dim() == 2 else "conv"
    _check(weight, scale, order, 1)
    if weight_grad not in WEIGHT_GRADS:
        raise ValueError(f"weight_grad must be one of {WEIGHT_GRADS}, got {weight_grad!r}")
    return _GridFakeQuant.apply(weight, scale, order, 1, weight_grad, "int7")


def arq_scale_int7(weight: torch.Tensor, channel_wise: bool = True) -> torch.Tensor:
    """ARQ's max-abs step for the 7-bit grid: max|w| / 63, or / 64 where the negative side wins."""
    return arq_scale(weight, 7, channel_wise)


# candidate steps for pair_mse_scale, as multiples of the max-abs step: 1.0 first (ties keep it),
# then larger steps (fewer codes above 64, so fewer pairs to cap; at 2.0 the codes fit 7 bits)
# and smaller ones (clipping the largest weights, as functional.mse_scale)
PAIR_MSE_RATIOS = (1.0,) + tuple(round(1.0 + 0.02 * k, 2) for k in range(1, 51)) + \
    tuple(round(1.0 - 0.02 * k, 2) for k in range(1, 26))


def pair_mse_scale(weight: torch.Tensor, base_scale: torch.Tensor, order: str = "linear", groups: int = 1,
                   ratios=PAIR_MSE_RATIOS) -> torch.Tensor:
    """The step r * base_scale (r in `ratios`, the first kept on ties) that minimises the
    pair-capped grid's squared weight error, per scale. With ARQ's max-abs step every channel holds
    a +-127 code whose same-sign partners must give way; a larger step shrinks all codes so that
    fewer pairs reach the cap, at the price of a coarser grid."""
    _check(weight, base_scale, order, groups)
    w = weight.detach()
    out = w.shape[0]
    per_channel = base_scale.numel() > 1
    best, best_err = base_scale.detach().clone(), None
    for r in ratios:
        s = base_scale.detach() * r
        codes = pair_codes(w, s, order, groups).to(w.dtype)
        scale_rows = s.reshape((-1,) + (1,) * (w.dim() - 1)) if per_channel else s.reshape(())
        wq = codes * scale_rows
        diff = (wq - w).reshape(out, -1).square()
        err = diff.sum(dim=1) if per_channel else diff.sum().reshape(1)
        if best_err is None:
            best_err, best = err, s.clone()
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better.reshape(best.shape), s, best)
    return best
