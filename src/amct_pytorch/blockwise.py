"""Block-wise quantization maths of two CPU runtimes: llama.cpp's Q8_0 / Q4_0 formats and
ONNX Runtime's MatMulNBits at accuracy_level=4 (issues 19 and 20).

A maths leaf: plain functions of tensors (it imports only torch). Blocks run along the last
dimension (K, the reduction dimension of a Linear: torch weight (N, K), activations (..., K)).

Activations: `quantize_act_blocks` / `fake_quant_act_blocks` are the one implementation of
dynamic per-block symmetric int8 activation quantization. Per block of `BlockActSpec.block`
elements of the last dim:

    amax = max |x|                              (float32)
    d    = amax / 127                           (float32)
    id   = 127 / amax   (reciprocal "127/amax")  or  1 / d  (reciprocal "1/d");  0 when amax == 0
    q    = round(x * id)                        (float32 product; ties to even or half away)
    d_s  = d stored as float32 or rounded to fp16 (round to nearest even)
    x̂    = q * d_s

`LLAMA_CPP_X86_Q8_0` is what llama.cpp's x86 AVX/AVX2 `quantize_row_q8_0` (and the repacked
`ggml_quantize_mat_q8_0_4x8`) compute for the activations of Q8_0/Q4_0 linears;
`LLAMA_CPP_NEON_Q8_0` the ARM NEON path; `LLAMA_CPP_REFERENCE_Q8_0` the scalar reference
(`quantize_row_q8_0_ref`, also `gguf`'s NumPy Q8_0). `ort_matmulnbits_level4(block)` is what
ONNX Runtime 1.32's MLAS computes for MatMulNBits with accuracy_level=4 on x86
(`QuantizeARow_CompInt8_avx2` / `_avx512`): block = the weight's block_size along K, float32
scale amax/127, multiplier 127/amax, `_mm*_round_ps(_MM_ROUND_NEAREST)` (ties to even); a last
partial block is quantized over its own elements (zero padding does not change amax).

Gradient of the activation fake-quant (straight-through): d x̂ / d x = identity, and nothing
flows through amax (the block scale is treated as a constant). Why: the grid never clips
(|x * id| <= 127 for every element of its block), so the STE's in-range mask is all ones;
amax is not a parameter; a path through amax would only hand the block's rounding residual
sum(g * (q - x*id)) / 127 to its arg-max element, a zero-mean term that a learned step (LSQ)
needs but that here only adds noise to one element per block.

Weights: llama.cpp's Q8_0 and Q4_0 as stored in GGUF (block 32 along K, one fp16 scale per
block), two ways:
- from float, exactly as `llama-quantize` / `gguf.quants.quantize` do (the PTQ peer):
  Q8_0 d = amax/127, q = roundf(w / d) (half away from zero, with the unrounded float32 1/d);
  Q4_0 d = m / -8 with m the block's signed value of largest magnitude (first one on ties),
  nibble = min(15, trunc(w * (1/d) + 8.5)), q = nibble - 8; fp16(d) is stored.
- given a learnable scale d (QAT): d_s = fp16(d) (any scale the format can store; STE through
  the fp16 rounding), q = clamp(round(w / d_s), qmin, qmax) with ties to even, ŵ = q * d_s.
  Q8_0 codes lie in [-127, 127] (the range from-float produces; -128 is avoided), Q4_0 codes in
  [-8, 7]; d may be negative (as from-float's Q4_0 d is), which mirrors the range.
  Gradients: w gets the plain straight-through gradient (as the project's other weight
  quantizers do); d gets LSQ's: dŵ/dd = q - w/d_s inside the grid, the clamped code outside,
  times 1/sqrt(32 * qmax) (LSQ's step-size gradient scale for 32 weights per scale).
Both return the integer codes and the fp16 scales too, so an exporter stores exactly what was
trained.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

QK = 32  # llama.cpp's Q8_0 / Q4_0 block length along K

_RECIPROCALS = ("127/amax", "1/d")
_ROUNDINGS = ("even", "away")
_SCALE_DTYPES = ("float32", "float16")
FP16_MAX = 65504.0
FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal)


class BlockActSpec(NamedTuple):
    """Dynamic per-block symmetric int8 activation quantization, see the module docstring."""

    block: int = QK
    scale_dtype: str = "float16"  # how d is stored and used: "float32" or "float16"
    reciprocal: str = "127/amax"  # "127/amax" or "1/d"
    rounding: str = "even"  # "even" (ties to even) or "away" (half away from zero, roundf)

    def check(self) -> "BlockActSpec":
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise ValueError(f"BlockActSpec.block={self.block!r}: expected a positive int")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"BlockActSpec.scale_dtype={self.scale_dtype!r}: expected one of {_SCALE_DTYPES}")
        if self.reciprocal not in _RECIPROCALS:
            raise ValueError(f"BlockActSpec.reciprocal={self.reciprocal!r}: expected one of {_RECIPROCALS}")
        if self.rounding not in _ROUNDINGS:
            raise ValueError(f"BlockActSpec.rounding={self.rounding!r}: expected one of {_ROUNDINGS}")
        return self


LLAMA_CPP_X86_Q8_0 = BlockActSpec(QK, "float16", "127/amax", "even")
LLAMA_CPP_NEON_Q8_0 = BlockActSpec(QK, "float16", "1/d", "even")
LLAMA_CPP_REFERENCE_Q8_0 = BlockActSpec(QK, "float16", "1/d", "away")


def ort_matmulnbits_level4(block: int) -> BlockActSpec:
    """ONNX Runtime MatMulNBits accuracy_level=4 on x86: block = the weight's block_size."""
    if not isinstance(block, int) or isinstance(block, bool) or block < 16 or block & (block - 1):
        raise ValueError(f"block={block!r}: MatMulNBits block_size is a power of two >= 16")
    return BlockActSpec(block, "float32", "127/amax", "even")


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: nearest integer, ties away from zero (exact in float32, unlike floor(v + 0.5))."""
    a = v.abs()
    f = a.floor()
    return torch.copysign(f + (a - f >= 0.5).to(v.dtype), v)


def _safe_div(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """numerator / t as one IEEE float32 division (torch's `scalar / tensor` computes
    reciprocal(t) * scalar, two roundings), 0 where t == 0."""
    nonzero = t != 0
    num = torch.full_like(t, numerator)
    return torch.where(nonzero, torch.div(num, torch.where(nonzero, t, torch.ones_like(t))), torch.zeros_like(t))


def _round(v: torch.Tensor, rounding: str) -> torch.Tensor:
    return torch.round(v) if rounding == "even" else round_half_away(v)


def _as_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """x (..., K) as float32 (..., nblocks, block), zero-padded at the end; returns (view, K)."""
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dimension (blocks run along the last one), got a scalar")
    k = x.shape[-1]
    xf = x.to(torch.float32)
    pad = (-k) % block
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    return xf.reshape(*x.shape[:-1], (k + pad) // block, block), k


def quantize_act_blocks(x: torch.Tensor, spec: BlockActSpec = LLAMA_CPP_X86_Q8_0):
    """(codes int8 (..., K), d (..., nblocks) float32 holding the stored scale) of x (..., K).

    The stored scale is float32 or an fp16-representable float32, per `spec.scale_dtype`; the
    dequantized value of code q in block b is q * d[..., b]."""
    spec = BlockActSpec(*spec).check()
    xb, k = _as_blocks(x, spec.block)
    codes, d = _block_codes(xb, spec)
    codes = codes.reshape(*x.shape[:-1], -1)[..., :k].to(torch.int8)
    return codes, d.squeeze(-1)


def _block_codes(xb: torch.Tensor, spec: BlockActSpec):
    """(codes as float32 integers, stored d (..., nblocks, 1)) of blocked float32 x."""
    amax = xb.abs().amax(dim=-1, keepdim=True)
    d = amax / 127.0
    if spec.reciprocal == "127/amax":
        inv = _safe_div(127.0, amax)
    else:
        inv = _safe_div(1.0, d)
    codes = _round(xb * inv, spec.rounding)
    if spec.scale_dtype == "float16":
        d = d.to(torch.float16).to(torch.float32)
    return codes, d


def _fake_quant_blocks(x: torch.Tensor, spec: BlockActSpec) -> torch.Tensor:
    """q * d_s per block without the int8 round trip (the same values: |q| <= 127 is exact in float32)."""
    xb, k = _as_blocks(x, spec.block)
    codes, d = _block_codes(xb, spec)
    out = (codes * d).reshape(*x.shape[:-1], -1)
    return (out[..., :k] if out.shape[-1] != k else out).to(x.dtype)


def dequantize_act_blocks(codes: torch.Tensor, d: torch.Tensor, block: int) -> torch.Tensor:
    """codes (..., K) * d (..., nblocks) broadcast per block, float32."""
    k = codes.shape[-1]
    scale = d.repeat_interleave(block, dim=-1)[..., :k]
    return codes.to(torch.float32) * scale


class _ActBlocksSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec):
        return _fake_quant_blocks(x, spec)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quant_act_blocks(x: torch.Tensor, spec: BlockActSpec = LLAMA_CPP_X86_Q8_0) -> torch.Tensor:
    """x̂ = q * d_s per block (see the module docstring), same dtype and shape as x; the gradient
    w.r.t. x is the identity (straight-through, amax treated as a constant)."""
    spec = BlockActSpec(*spec).check()
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if torch.is_grad_enabled() and x.requires_grad:
        return _ActBlocksSTE.apply(x, spec)
    return _fake_quant_blocks(x, spec)


# ----------------------------------------------------------------------------- weights

FORMATS = {"q8_0": (-127, 127), "q4_0": (-8, 7)}


def check_format(fmt: str) -> tuple[int, int]:
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: expected one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def _weight_blocks(weight: torch.Tensor, name: str = "weight", detach: bool = True) -> torch.Tensor:
    """(N, K) -> (N, K / 32, 32) float32 blocks along K (detached unless a gradient must flow)."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-d (N, K) weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % QK:
        raise ValueError(f"{name}: K = {k} (shape {tuple(weight.shape)}) is not a multiple of {QK}, "
                         f"the block length of Q8_0/Q4_0")
    return (weight.detach() if detach else weight).to(torch.float32).reshape(n, k // QK, QK)


def _fp16(d: torch.Tensor) -> torch.Tensor:
    return d.to(torch.float16).to(torch.float32)


def weight_codes_from_float(weight: torch.Tensor, fmt: str):
    """llama-quantize's Q8_0 / Q4_0 of a float (N, K) weight: (codes int8 (N, K), d float16 (N, K/32)).

    Codes are signed (Q4_0: nibble - 8); the value is codes * d."""
    check_format(fmt)
    wb = _weight_blocks(weight)
    if fmt == "q8_0":
        d = wb.abs().amax(dim=-1, keepdim=True) / 127.0
        inv = _safe_div(1.0, d)
        codes = round_half_away(wb * inv)
    else:
        idx = wb.abs().argmax(dim=-1, keepdim=True)  # first of equal magnitudes, as the C loop keeps
        d = torch.gather(wb, -1, idx) / -8.0
        inv = _safe_div(1.0, d)
        nibble = torch.trunc(wb * inv + 8.5).clamp(max=15.0)
        codes = nibble - 8.0
    return codes.reshape(weight.shape).to(torch.int8), d.squeeze(-1).to(torch.float16)


def dequantize_weight_blocks(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """codes (N, K) int8 * d (N, K/32) per block of 32, float32."""
    return codes.to(torch.float32) * d.to(torch.float32).repeat_interleave(QK, dim=-1)


def fake_quant_weight_from_float(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """The PTQ value of `weight_codes_from_float` with a straight-through gradient to weight."""
    codes, d = weight_codes_from_float(weight, fmt)
    wq = dequantize_weight_blocks(codes, d).to(weight.dtype)
    return wq + (weight - weight.detach()) if weight.requires_grad else wq


def initial_block_scale(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """A learnable scale's first value: from-float's d (N, K/32) as float32 (signed for Q4_0)."""
    return weight_codes_from_float(weight, fmt)[1].to(torch.float32)


def storable_scale(d: torch.Tensor) -> torch.Tensor:
    """fp16(d) with a straight-through gradient; |d| kept within [2^-24, 65504] (sign kept, 0 -> +)
    so every block has a finite, nonzero stored scale."""
    dd = d.detach()
    mag = dd.abs().clamp(FP16_TINY, FP16_MAX)
    target = _fp16(torch.where(dd < 0, -mag, mag))
    return target + (d - d.detach())  # value exactly target (d + (target - d) can round)


def weight_codes_learned(weight: torch.Tensor, d: torch.Tensor, fmt: str):
    """Codes int8 (N, K) and the stored scale float16 (N, K/32) for a learned scale d: what an
    exporter writes (never re-quantized from float)."""
    qmin, qmax = check_format(fmt)
    wb = _weight_blocks(weight)
    _check_scale(d, wb)
    ds = storable_scale(d.detach().to(torch.float32)).unsqueeze(-1)
    codes = torch.round(wb / ds).clamp(qmin, qmax)
    return codes.reshape(weight.shape).to(torch.int8), ds.squeeze(-1).to(torch.float16)


def _check_scale(d: torch.Tensor, wb: torch.Tensor):
    if tuple(d.shape) != tuple(wb.shape[:2]):
        raise ValueError(f"d: expected one scale per block of {QK}, shape {tuple(wb.shape[:2])}, "
                         f"got {tuple(d.shape)}")


def fake_quant_weight_learned(weight: torch.Tensor, d: torch.Tensor, fmt: str) -> torch.Tensor:
    """ŵ = clamp(round(w / fp16(d)), qmin, qmax) * fp16(d) per block of 32 along K.

    Gradients: straight-through to weight; LSQ to d (see the module docstring)."""
    qmin, qmax = check_format(fmt)
    wb = _weight_blocks(weight, detach=False)
    _check_scale(d, wb)
    ds = storable_scale(d.to(torch.float32)).unsqueeze(-1)
    out = _learned_blocks(wb, ds, qmin, qmax)
    return out.reshape(weight.shape).to(weight.dtype)


def _learned_blocks(wb, ds, qmin, qmax):
    v = wb / ds
    q = torch.round(v).clamp(qmin, qmax)
    if not (torch.is_grad_enabled() and (wb.requires_grad or ds.requires_grad)):
        return q * ds
    # value q * ds; gradient: identity to w, LSQ (q - v inside, q outside) / sqrt(32 qmax) to ds
    inside = (v >= qmin) & (v <= qmax)
    dv = torch.where(inside, q - v, q).detach()
    factor = 1.0 / (QK * qmax) ** 0.5
    # every added term is exactly 0 in value (x - x.detach()), so the value is q * ds bit for bit
    return (q * ds).detach() + (wb - wb.detach()) + dv * (ds - ds.detach()) * factor


def learned_scale_grad(weight: torch.Tensor, grad_wq: torch.Tensor, d: torch.Tensor, fmt: str) -> torch.Tensor:
    """The gradient of a learnable block scale d (N, K/32) given dL/dŵ (N, K): LSQ's, as
    `fake_quant_weight_learned`'s autograd computes it (q - w/d_s inside the grid, the clamped code
    outside, summed over the block, times 1/sqrt(32 qmax); straight through the fp16 rounding)."""
    qmin, qmax = check_format(fmt)
    n, k = weight.shape
    wb = weight.detach().to(torch.float32).reshape(n, k // QK, QK)
    ds = storable_scale(d.detach().to(torch.float32)).unsqueeze(-1)
    v = wb / ds
    q = torch.round(v).clamp(qmin, qmax)
    inside = (v >= qmin) & (v <= qmax)
    dv = torch.where(inside, q - v, q)
    g = grad_wq.to(torch.float32).reshape(n, k // QK, QK)
    return (g * dv).sum(-1) / (QK * qmax) ** 0.5


# ----------------------------------------------------------------------------- config names

DYNAMIC_ACT_PRESETS = {"llama.cpp-x86": LLAMA_CPP_X86_Q8_0, "llama.cpp-neon": LLAMA_CPP_NEON_Q8_0,
                       "llama.cpp-reference": LLAMA_CPP_REFERENCE_Q8_0}


def dynamic_act_spec(name: str, group_size: int | None = None) -> BlockActSpec:
    """The BlockActSpec of `retrain_data_config.dynamic_act` (config.DYNAMIC_ACTS): llama.cpp's
    Q8_0 activation quantizer per target ISA, or ONNX Runtime's MatMulNBits accuracy_level=4 with
    block = the weight's group_size."""
    if name == "ort-matmulnbits-level4":
        if group_size is None:
            raise ValueError("dynamic_act='ort-matmulnbits-level4': its block is the weight's group_size, got None")
        return ort_matmulnbits_level4(group_size)
    if name not in DYNAMIC_ACT_PRESETS:
        raise ValueError(f"dynamic_act={name!r}: expected one of {sorted(DYNAMIC_ACT_PRESETS)} or "
                         "'ort-matmulnbits-level4'")
    return DYNAMIC_ACT_PRESETS[name]
