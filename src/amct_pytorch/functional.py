"""Pure quantization math: grids, fake-quant and its gradients (docs/numerics.md, "The forward").

Everything here is a plain function of tensors: no module state, no Python-side work per
element, no host synchronisation, so the same code runs on CPU and CUDA.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .config import GRID_EPS as EPS  # a grid step below this is degenerate


def int_range(num_bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a signed num_bits integer."""
    return -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1


def act_qparams(clip_max: torch.Tensor, clip_min: torch.Tensor, num_bits: int):
    """Asymmetric activation grid from the clip bounds: (scale, offset), float tensors.

    scale = (hi - lo) / L, offset = round(qmin - lo / scale); a degenerate range
    (scale < eps) falls back to scale 1, offset qmin.
    """
    qmin, qmax = int_range(num_bits)
    lo = clip_min.clamp(max=0.0)
    hi = clip_max.clamp(min=0.0)
    scale = (hi - lo) / float(2**num_bits - 1)
    degenerate = scale < EPS
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    offset = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    offset = torch.where(degenerate, torch.full_like(offset, qmin), offset)
    return scale, offset


# Eager elementwise work runs over blocks of this many elements on CPU: each block's
# temporaries stay cache-resident and nothing activation-sized is allocated beyond the
# result (large fresh allocations page-fault on every call).
# At most CPU_MAX_BLOCKS blocks per call: every block is a handful of parallel ops, and when
# another process holds a core each op can stall for a scheduler slice.
CPU_BLOCK = 1 << 17
CPU_MAX_BLOCKS = 8
GPU_TEMP_BLOCK = 1 << 20  # on GPUs, blocks only bound the ULQ temporaries (2 x 4 MB)


def _blocks(numel: int, device: torch.device, gpu_block: int | None = None):
    if device.type == "cpu":
        step = max(CPU_BLOCK, -(-numel // CPU_MAX_BLOCKS))
    else:
        step = gpu_block or numel
    return [(start, min(start + step, numel)) for start in range(0, numel, max(step, 1))]


def fake_quant_act_plain(x, scale, offset, qmin: int, qmax: int):
    """fake_quant_act as plain out-of-place ops (autograd callers and torch.compile)."""
    return (torch.round(x / scale + offset).clamp(qmin, qmax) - offset) * scale


# x/scale of a clipped value can overflow to inf (x near 3e38), and round(inf) - inf is NaN even
# where the gradient is 0. Clamping v to +-2^24 keeps it finite (an integer: e = 0 there) and is
# the identity inside the grid (|v| <= 2^n). A scalar clamp: tensor bounds are ~10x slower on CPU.
_V_LIMIT = float(2**24)


def ulq_act_grads_plain(x, g, scale, offset, clip_max, clip_min, qmin: int, qmax: int):
    """ulq_act_grads as plain ops for torch.compile, which fuses them into one pass.

    Writes the x gradient into `g` (the matmul's fresh output) and returns the two bound
    gradients, so no activation-sized tensor is allocated.
    """
    levels = float(qmax - qmin)
    up = x > scale * (qmax - offset)
    dn = x < scale * (qmin - offset)
    grad_x = torch.where(up | dn, 0.0, g)
    v = (x / scale).clamp(-_V_LIMIT, _V_LIMIT)  # see ulq_act_grads
    sum_e = (grad_x * (torch.round(v) - v)).sum() / levels
    g_up = torch.where(up, g, 0.0).sum()
    g_dn = torch.where(dn, g, 0.0).sum()
    v_hi = clip_max / scale
    v_lo = clip_min / scale
    sum_e = sum_e + (torch.round(v_hi) - v_hi) / levels * g_up + (torch.round(v_lo) - v_lo) / levels * g_dn
    g.copy_(grad_x)
    return (sum_e + g_up).reshape(clip_max.shape), (g_dn - sum_e).reshape(clip_min.shape)


def _fake_quant_act_into(out, x, scale, offset, qmin, qmax):
    torch.div(x, scale, out=out)
    return out.add_(offset).round_().clamp_(qmin, qmax).sub_(offset).mul_(scale)


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, num_bits: int) -> torch.Tensor:
    """x̂ = (clamp(round(x/scale + offset), qmin, qmax) - offset) * scale."""
    qmin, qmax = int_range(num_bits)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):  # autograd callers: plain ops
        return fake_quant_act_plain(x, scale, offset, qmin, qmax)
    x = x.contiguous()
    out = torch.empty_like(x)
    flat_x, flat_out = x.view(-1), out.view(-1)
    for start, stop in _blocks(x.numel(), x.device):
        _fake_quant_act_into(flat_out[start:stop], flat_x[start:stop], scale, offset, qmin, qmax)
    return out


def quantize_act(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Integer activation codes (as float): clamp(round(x/scale + offset), qmin, qmax)."""
    qmin, qmax = int_range(num_bits)
    return torch.round(x / scale + offset).clamp_(qmin, qmax)


def ulq_act_grads(x, grad_out, scale, offset, clip_max, clip_min, num_bits, need_x=True, inplace=False):
    """ULQ backward (docs/numerics.md, "ULQ gradients"): gradients for x, clip_max and clip_min.

    up/dn mark values clipped above/below; e is the rounding error of x/scale (of the
    clip value itself where clipped), normalised by L = 2^n - 1. The clipped elements
    share one e per side, so the sums split into a masked sum plus two scalars.
    With inplace=True the x gradient is written into grad_out (which is returned).
    One pass per block: nothing activation-sized is allocated.
    """
    qmin, qmax = int_range(num_bits)
    levels = float(2**num_bits - 1)
    hi_t = scale * (qmax - offset)
    lo_t = scale * (qmin - offset)
    x = x.contiguous()
    g = grad_out.contiguous()
    if not inplace or g.data_ptr() != grad_out.data_ptr():
        g = g.clone()
    flat_x, flat_g = x.view(-1), g.view(-1)
    blocks = _blocks(x.numel(), x.device, GPU_TEMP_BLOCK)
    width = blocks[0][1] - blocks[0][0]
    up_buf, dn_buf = flat_g.new_empty(width), flat_g.new_empty(width)  # reused by every block
    parts_e, parts_up, parts_dn = [], [], []
    for start, stop in blocks:
        xb, gb = flat_x[start:stop], flat_g[start:stop]
        up, dn = up_buf[: stop - start], dn_buf[: stop - start]
        torch.gt(xb, hi_t, out=up)  # 1.0 where clipped above
        torch.lt(xb, lo_t, out=dn)
        parts_up.append(torch.dot(gb, up))
        parts_dn.append(torch.dot(gb, dn))
        gb.addcmul_(gb, up.add_(dn), value=-1.0)  # g - g * 1 = 0 exactly: gb is now the x gradient
        v = torch.div(xb, scale, out=dn).clamp_(-_V_LIMIT, _V_LIMIT)
        e = torch.round(v, out=up).sub_(v)
        parts_e.append(torch.dot(gb, e))
    g_up = torch.stack(parts_up).sum()
    g_dn = torch.stack(parts_dn).sum()
    sum_e = torch.stack(parts_e).sum() / levels
    v_hi = clip_max / scale
    v_lo = clip_min / scale
    e_hi = (torch.round(v_hi) - v_hi) / levels
    e_lo = (torch.round(v_lo) - v_lo) / levels
    sum_e = sum_e + e_hi * g_up + e_lo * g_dn
    grad_max = sum_e + g_up
    grad_min = g_dn - sum_e
    grad_x = g.view(grad_out.shape) if need_x else None
    return grad_x, grad_max.reshape(clip_max.shape), grad_min.reshape(clip_min.shape)


class WeightLayout(NamedTuple):
    """How a module's weight maps onto its output channels (one scale per channel).

    `view`: the shape the weight is reshaped to (always a view, never a copy) so that a
    per-channel scale reshaped to `scale` broadcasts against it; `reduce`: the dims of `view`
    that one channel's scale spans. Linear (out, in) and conv (out, in/g, *k) weights have
    their channels on dim 0; a transposed conv's weight is (in, out/g, *k), its channels are
    (group, dim 1), so its view is (g, in/g, out/g, prod(k)).
    """

    view: tuple[int, ...]
    scale: tuple[int, ...]
    reduce: tuple[int, ...]


def rows_layout(weight_shape) -> WeightLayout:
    """Channels on dim 0 (Linear, ConvNd): the weight as (out, everything else)."""
    out = weight_shape[0]
    return WeightLayout((out, -1), (out, 1), (1,))


def _channel_view(weight: torch.Tensor, layout: WeightLayout | None) -> torch.Tensor:
    return weight if layout is None else weight.reshape(layout.view)


def arq_scale(weight: torch.Tensor, num_bits: int, channel_wise: bool, layout: WeightLayout | None = None) -> torch.Tensor:
    """ARQ symmetric weight scale: max|w| / qmax, or / 2^(n-1) when |min w| > |max w|.

    Shape (1,) per tensor, (channels,) per output channel (rows of a 2-d weight unless
    `layout` says otherwise). An all-zero tensor/channel gets scale 1.
    """
    _, qmax = int_range(num_bits)
    if channel_wise:  # two reductions: several times faster than aminmax(dim=...) on CPU
        wv = _channel_view(weight.detach(), layout)
        dims = layout.reduce if layout is not None else 1
        w_min, w_max = wv.amin(dim=dims).reshape(-1), wv.amax(dim=dims).reshape(-1)
    else:
        w_min, w_max = torch.aminmax(weight.detach())
        w_min, w_max = w_min.reshape(1), w_max.reshape(1)
    neg_wins = w_min.abs() > w_max.abs()
    amax = torch.where(neg_wins, w_min.abs(), w_max.abs())
    scale = amax / torch.where(neg_wins, float(qmax + 1), float(qmax))
    return torch.where(scale == 0, torch.ones_like(scale), scale)


# scale_init="mse": the candidate steps, as fractions of ARQ's max-abs step (1.0 first, so a
# tie keeps ARQ's step and the result's error never exceeds ARQ's)
MSE_RATIOS = tuple(round(1.0 - 0.01 * k, 2) for k in range(51))  # 1.00, 0.99, ..., 0.50


def mse_scale(weight: torch.Tensor, num_bits: int, channel_wise: bool, layout: WeightLayout | None = None,
              ratios=MSE_RATIOS) -> torch.Tensor:
    """The weight step that minimises ||w - Q(w)||^2 over r * arq_scale for r in `ratios`, chosen per
    scale (per tensor, channel or group); same shape as arq_scale. Clipping the few largest weights
    of a group buys a finer step for all the others: for INT4 the error is typically 20-30 % lower
    than with the max-abs step. Never worse than ARQ when `ratios` holds 1.0 (ties keep the larger
    step). One vectorised pass per candidate; no host synchronisation."""
    qmin, qmax = int_range(num_bits)
    base = arq_scale(weight, num_bits, channel_wise, layout)
    w = weight.detach()
    if channel_wise:
        wv = _channel_view(w, layout)
        dims = layout.reduce if layout is not None else 1
        shape = layout.scale if layout is not None else (-1, 1)
    else:
        wv, dims, shape = w.reshape(1, -1), 1, (1, 1)
    best, best_err = base, None
    for r in ratios:
        s = base * r
        err = (torch.div(wv, s.reshape(shape)).round_().clamp_(qmin, qmax).mul_(s.reshape(shape)).sub_(wv)
               .square_().sum(dim=dims).reshape(-1))
        if best_err is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return best


def initial_weight_scale(weight: torch.Tensor, num_bits: int, channel_wise: bool, layout: WeightLayout | None = None,
                         method: str = "arq") -> torch.Tensor:
    """A learnable (ULQ) weight scale's first value: ARQ's max-abs step, or with method="mse" the
    clipped step of `mse_scale` (retrain_weight_config.scale_init)."""
    if method == "mse":
        return mse_scale(weight, num_bits, channel_wise, layout)
    return arq_scale(weight, num_bits, channel_wise, layout)


def ulq_weight_scale(scale: torch.Tensor) -> torch.Tensor:
    """The step of the ULQ weight grid: |s|, at least EPS, since a large optimiser step can push
    the learnable s through 0. Its gradient is sign(s) (+1 at 0), also below EPS, so that a
    scale pushed to ~0 can grow back; a positive s >= EPS passes through unchanged."""
    magnitude = torch.where(scale < 0, -scale, scale)
    return magnitude + (magnitude.clamp(min=EPS) - magnitude).detach()


def scale_view(scale: torch.Tensor, layout: WeightLayout | None = None) -> torch.Tensor:
    """The weight scale shaped to broadcast against the channel view of the weight."""
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(layout.scale) if layout is not None else scale.reshape(-1, 1)


def fake_quant_weight(weight: torch.Tensor, scale: torch.Tensor, num_bits: int,
                      layout: WeightLayout | None = None) -> torch.Tensor:
    """ŵ = clamp(round(w/scale), qmin, qmax) * scale (symmetric, per tensor or per channel)."""
    qmin, qmax = int_range(num_bits)
    s = scale_view(scale, layout)
    wv = _channel_view(weight, layout) if scale.numel() > 1 else weight
    if torch.is_grad_enabled() and (weight.requires_grad or scale.requires_grad):
        out = fake_quant_weight_plain(wv, s, qmin, qmax)
    else:
        out = torch.div(wv, s).round_().clamp_(qmin, qmax).mul_(s)
    return out.reshape(weight.shape)


def fake_quant_weight_plain(weight, row_scale, qmin: int, qmax: int):
    """fake_quant_weight as plain ops, with the scale already shaped for the weight (view)."""
    return torch.round(weight / row_scale).clamp(qmin, qmax) * row_scale


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, num_bits: int,
                    layout: WeightLayout | None = None) -> torch.Tensor:
    """Integer weight codes as int8 (INT4 codes live in an int8 container), shaped like `weight`."""
    qmin, qmax = int_range(num_bits)
    wv = _channel_view(weight, layout) if scale.numel() > 1 else weight
    codes = torch.round(wv / scale_view(scale, layout)).clamp_(qmin, qmax).to(torch.int8)
    return codes.reshape(weight.shape)


def lsq_scale_grad(weight, grad_wq, scale, num_bits, layout: WeightLayout | None = None):
    """LSQ-style gradient of ŵ w.r.t. the learnable weight scale.

    d ŵ/ds = round(v) - v inside the range, qmin/qmax outside; scaled by
    1/sqrt(numel_per_scale * qmax) as in LSQ so the scale learns at a sane pace.
    The weight itself keeps the plain straight-through gradient (as ARQ and the
    reference do): ARQ's own initial scale already clips the largest positive weight
    when the negative side dominates, and masking it would stall those weights.
    """
    qmin, qmax = int_range(num_bits)
    per_channel = scale.numel() > 1
    wv = _channel_view(weight, layout) if per_channel else weight
    gv = _channel_view(grad_wq, layout) if per_channel else grad_wq
    dv = lsq_step_grad(wv / scale_view(scale, layout), num_bits)
    factor = lsq_factor(weight.numel() // scale.numel(), num_bits)
    if per_channel:
        dims = layout.reduce if layout is not None else 1
        grad_s = (gv * dv).sum(dim=dims).reshape(-1) * factor
    else:
        grad_s = (gv * dv).sum().reshape(scale.shape) * factor
    return grad_s


def lsq_step_grad(v: torch.Tensor, num_bits: int) -> torch.Tensor:
    """d(round(v).clamp(qmin, qmax)·s)/ds at v = w/s: round(v) - v inside the grid, the clamp bound outside."""
    qmin, qmax = int_range(num_bits)
    return torch.where((v >= qmin) & (v <= qmax), torch.round(v) - v, v.clamp(qmin, qmax))


def lsq_factor(values_per_scale: int, num_bits: int) -> float:
    """LSQ's gradient scale 1/sqrt(values per scale · qmax)."""
    return 1.0 / (values_per_scale * int_range(num_bits)[1]) ** 0.5
