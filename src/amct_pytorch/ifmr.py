"""IFMR activation calibration (spec section 4): the exact search and a streaming histogram.

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
_HISTC_SHIFT = 64  # ranges above 2**64 are binned scaled down by 2**64 (see hist_update)


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

def hist_update(hist: torch.Tensor, hist_range: torch.Tensor, values: torch.Tensor, cover: float = 0.0):
    """Add `values` to a signed histogram over [-R, R) and return (hist, R).

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
    if factor > 1:
        bins = hist.numel() // 2
        # bins count outward from 0; a factor >= bins (up to 2**250 here) merges everything into bin 0
        idx = torch.arange(bins, device=hist.device) // min(factor, bins)
        merged = torch.zeros_like(hist).reshape(2, bins)
        merged[0].index_add_(0, idx, hist.reshape(2, bins)[0])
        merged[1].index_add_(0, idx, hist.reshape(2, bins)[1])
        hist, r = merged.reshape(-1), r * factor
    bins = hist.numel() // 2
    # histc multiplies (x + R) by the bin count first, which overflows float32 for R >= 2**115 and
    # puts every value in bin 0: bin such ranges scaled by a power of two (exact, same bins)
    x_b, r_b = (x * 2.0**-_HISTC_SHIFT, r * 2.0**-_HISTC_SHIFT) if r > 2.0**_HISTC_SHIFT else (x, r)
    # one histc over [-R, R); the negative half is stored mirrored (bin j = distance j from 0)
    signed = torch.histc(x_b, bins=2 * bins, min=-r_b, max=r_b).to(hist.dtype)
    update = torch.cat([signed[:bins].flip(0), signed[bins:]])
    return hist + update, torch.full_like(hist_range, r)


def ifmr_histogram(hist: torch.Tensor, hist_range: torch.Tensor, minmax: torch.Tensor, num_bits: int = 8):
    """IFMR on a histogram from hist_update; `minmax` holds the exact (min, max) seen.

    Each bin is represented by its centre, at a cost independent of the number of values;
    the bounds are usually within one candidate step of the exact search, but not always
    (tests/test_ifmr.py holds a case 2 steps off).
    """
    bins = hist.numel() // 2
    neg, pos = hist.reshape(2, bins)
    total = int(hist.sum().item())
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
    counts = (neg + pos).double()
    filled = torch.nonzero(counts).reshape(-1)  # empty bins add nothing: leave them out
    counts = counts[filled]
    centres = (filled.double() + 0.5) * width.double()
    cands = (ratios(hist.device) * amax).double().unsqueeze(1)
    steps = cands / denom.double()
    err = (torch.round(torch.minimum(centres, cands) / steps) * steps - centres).square()
    errors = (err * counts).sum(1)
    best = torch.argmin(errors)
    return _bounds(amax, denom, ratios(hist.device)[best], num_bits)
