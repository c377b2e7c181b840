"""IFMR activation calibration (docs/numerics.md, "IFMR calibration"): the exact search and a streaming histogram.

Both pick c = r * M among 61 ratios r in [0.7, 1.3] minimising the MSE of symmetric
quantization with step s = c / qmax (c / 2^(n-1) when |min| > |max|), and return
(clip_max, clip_min) = (qmax * s, qmin * s) as float32 0-d tensors.
"""
from __future__ import annotations

import torch

from .functional import int_range

PERCENTILE = 0.999999
HIST_BINS = 4096  # bins per sign; the histogram covers [-R, R) in 2 * HIST_BINS bins
_FLOAT_LIMIT = 1e38  # bounds are kept below this so hi - lo stays finite


def ratios(device=None) -> torch.Tensor:
    """The 61 candidate ratios exactly as torch.arange(0.7, 1.3, 0.01) yields them (float32)."""
    return torch.arange(0.7, 1.3, 0.01, dtype=torch.float32, device=device)


def percentile_k(numel: int) -> int:
    """Rank of the percentile cut: the k-th largest / smallest value is kept."""
    return max(numel - int(PERCENTILE * numel), 1)


def percentile_extremes(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo): the k-th largest value clamped >= 0 and the k-th smallest clamped <= 0."""
    flat = values.reshape(-1)
    k = percentile_k(flat.numel())
    if k == 1:
        lo, hi = torch.aminmax(flat)
    else:
        hi = torch.topk(flat, k).values[-1]
        lo = torch.topk(flat, k, largest=False).values[-1]
    return hi.clamp(min=0.0), lo.clamp(max=0.0)


def _candidates(hi: torch.Tensor, lo: torch.Tensor, num_bits: int):
    """(M, denominator): M = max(|hi|, |lo|) (1 where all values are 0), and qmax or 2^(n-1)."""
    _, qmax = int_range(num_bits)
    neg_wins = lo.abs() > hi.abs()
    amax = torch.maximum(hi.abs(), lo.abs())
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    denom = torch.where(neg_wins, float(qmax + 1), float(qmax))
    return amax, denom


def _bounds(amax, denom, best_ratio, num_bits):
    qmin, qmax = int_range(num_bits)
    step = (best_ratio * amax) / denom
    clip_max = (qmax * step).clamp(max=_FLOAT_LIMIT)
    clip_min = (qmin * step).clamp(min=-_FLOAT_LIMIT)
    return clip_max, clip_min


def ifmr_exact(values: torch.Tensor, num_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's exact IFMR search over every value (memory: one copy of `values`).

    Every candidate's error is evaluated element by element in float32 as the spec says;
    the sum of squares is one dot product (the mean's 1/n is common to all candidates).

    The data is scaled by a power of two so that M lies in [0.5, 1): every operation of
    the search commutes exactly with that scaling, so the chosen candidate is the one the
    unscaled search picks, and values near the float32 limits cannot overflow.
    """
    x = values.detach().reshape(-1).float()
    hi, lo = percentile_extremes(x)
    amax, denom = _candidates(hi, lo, num_bits)
    _, exponent = torch.frexp(amax)
    x = torch.ldexp(x, -exponent)
    cands = ratios(x.device) * torch.ldexp(amax, -exponent)
    steps = cands / denom
    errors = torch.empty(cands.numel(), dtype=torch.float64, device=x.device)
    buf = torch.empty_like(x)
    # clamping to c is the identity for every c >= max|x|: those candidates skip it
    clamps = (cands < x.abs().max()).tolist()
    for i in range(cands.numel()):
        c, s = cands[i], steps[i]
        if clamps[i]:
            torch.clamp(x, -c, c, out=buf)
            buf.div_(s)
        else:
            torch.div(x, s, out=buf)
        buf.round_().mul_(s).sub_(x)
        errors[i] = torch.dot(buf, buf)  # n * mean square error; n is common to all candidates
    best = torch.argmin(errors)  # first minimum on ties
    return _bounds(amax, denom, ratios(x.device)[best], num_bits)


# ---- streaming histogram (opt-in: retrain_data_config.ifmr_search = "histogram") ----
#
# Layout: a float64 tensor of shape (2, 2 * HIST_BINS); row 0 holds counts, row 1 the sums of
# the values in each bin. Columns: HIST_BINS bins for x < 0 stored mirrored (column j = |x| in
# [j w, (j + 1) w), w = R / HIST_BINS), then HIST_BINS bins for x >= 0.


def empty_histogram(device=None) -> torch.Tensor:
    return torch.zeros(2, 2 * HIST_BINS, dtype=torch.float64, device=device)


def histogram_from_counts(counts: torch.Tensor, hist_range: torch.Tensor) -> torch.Tensor:
    """The current layout from an old counts-only histogram (shape (2 * HIST_BINS,)): each bin's
    values are taken to sit at its centre, which is what the old search assumed."""
    bins = counts.numel() // 2
    centres = (torch.arange(bins, dtype=torch.float64, device=counts.device) + 0.5) * (float(hist_range) / bins)
    counts = counts.double()
    return torch.stack([counts, counts * torch.cat([-centres, centres])])


def hist_update(hist: torch.Tensor, hist_range: torch.Tensor, values: torch.Tensor, cover: float = 0.0):
    """Add `values` to a histogram (layout above) over [-R, R) and return (hist, R).

    R only ever grows by powers of two, so old bins merge exactly into the new ones.
    R also covers |cover| (the max |x| of all ranks: every rank then bins on one grid).
    """
    x = values.detach().reshape(-1).float()
    lo, hi = torch.aminmax(x)
    need = torch.maximum(hi.abs(), lo.abs())
    r = float(hist_range)
    need = max(float(need), abs(float(cover)))
    if r <= 0:  # first batch: R = the smallest power of two above max|x|
        r = 2.0 ** (torch.frexp(torch.tensor(need)).exponent.item() if need > 0 else 0)
    factor = 1
    while need >= r * factor:
        factor *= 2
    bins = hist.shape[1] // 2
    if factor > 1:
        # bins count outward from 0; a factor >= bins (up to 2**250 here) merges everything into bin 0
        idx = torch.arange(bins, device=hist.device) // min(factor, bins)
        merged = torch.zeros_like(hist).reshape(2, 2, bins)
        merged.index_add_(2, idx, hist.reshape(2, 2, bins))
        hist, r = merged.reshape(hist.shape), r * factor
    xd = x.double()  # float64: |x| * bins / R is exact for any R
    column = xd.abs().mul_(bins / r).floor_().long().add_((x >= 0).long(), alpha=bins)
    update = torch.stack([torch.bincount(column, minlength=2 * bins).to(hist.dtype),
                          torch.bincount(column, weights=xd, minlength=2 * bins).to(hist.dtype)])
    return hist + update, torch.full_like(hist_range, r)


def ifmr_histogram(hist: torch.Tensor, hist_range: torch.Tensor, minmax: torch.Tensor, num_bits: int = 8):
    """IFMR on a histogram from hist_update; `minmax` holds the exact (min, max) seen.

    Each bin is represented by the mean of its values, at a cost independent of the number
    of values: the sum of (q - x)^2 over a bin is n (q - mean)^2 plus a term that is the
    same for every candidate, so a bin whose values share one grid point q counts exactly;
    only bins straddling a rounding boundary are approximated, and there both grid points
    are almost equally far from the values.
    """
    bins = hist.shape[1] // 2
    (neg, pos), (neg_sum, pos_sum) = hist.reshape(2, 2, bins)
    total = int(neg.sum().item() + pos.sum().item())
    k = percentile_k(total)
    width = hist_range / bins
    if k == 1:
        lo, hi = minmax[0].clamp(max=0.0), minmax[1].clamp(min=0.0)
    else:  # upper edge of the bin holding the k-th largest (smallest) value
        hi_bin = torch.nonzero(torch.cumsum(pos.flip(0), 0) >= k)[0, 0]
        lo_bin = torch.nonzero(torch.cumsum(neg.flip(0), 0) >= k)[0, 0]
        hi = torch.minimum((bins - hi_bin) * width, minmax[1]).clamp(min=0.0)
        lo = torch.maximum(-(bins - lo_bin) * width, minmax[0]).clamp(max=0.0)
    amax, denom = _candidates(hi.float(), lo.float(), num_bits)
    counts = neg + pos  # the error of x and -x is the same: bins of both signs merge by |x|
    filled = torch.nonzero(counts).reshape(-1)  # empty bins add nothing: leave them out
    counts = counts[filled]
    means = (pos_sum - neg_sum)[filled] / counts  # mean |x| per bin
    cands = (ratios(hist.device) * amax).double().unsqueeze(1)
    steps = cands / denom.double()
    err = (torch.round(torch.minimum(means, cands) / steps) * steps - means).square()
    errors = (err * counts).sum(1)
    best = torch.argmin(errors)
    return _bounds(amax, denom, ratios(hist.device)[best], num_bits)
