"""ONNX Runtime's u8s8 int8 GEMM on x86 CPUs without VNNI, emulated in NumPy (issue 19).

What ONNX Runtime (1.32, CPU provider, default session options) does with an exported int8 QDQ layer
on x86-64, read from its source and checked against ORT itself under `qemu-x86_64 -cpu Haswell`:

* The graph optimizer's `QDQS8ToU8Transformer` (x86 builds do not allow int8 QDQ activations,
  session option `session.qdqisint8allowed`) rewrites every int8 activation QuantizeLinear to uint8
  with zero point z + 128: the activation codes reach the kernel as a = x_q + 128 in [0, 255].
* `DequantizeLinear -> MatMul` becomes `MatMulIntegerToFloat`, Q/DQ around a MatMul or Conv
  without a separate bias Add becomes `QLinearMatMul` / `QLinearConv`. With int8 weights the GEMM
  is MLAS's u8s8 kernel; its accumulator is
      C[m, n] = sum_k a[m, k] * b[k, n]  - z_a * sum_k b[k, n]  - z_b * sum_k a[m, k] + K z_a z_b
  where only the first sum runs in the SIMD kernel and the corrections are exact int32.
* On AVX2 without AVX-VNNI (onnxruntime/core/mlas/lib/x86_64/QgemmU8S8KernelAvx2.S,
  `MlasGemmU8S8KernelAvx2`) and on AVX-512BW/DQ/VL without AVX512-VNNI (Skylake-SP/X, Cascade Lake
  is VNNI; x86_64/QgemmU8X8KernelAvx512Core.S, macro `MultiplyAccumulateCellU8S8Avx512Core`,
  selected as `MlasGemmU8S8KernelAvx512Core` in platform.cpp) the first sum is
  `vpmaddubsw` (u8 x s8, adjacent byte pairs added with signed 16-bit saturation), then `vpmaddwd`
  with ones and `vpaddd` (exact int32). Packed B holds 4 consecutive k per column, so the pairs
  are (2j, 2j + 1) along the reduction dimension, K zero-padded at its end. The symmetric conv
  kernel (x86_64/ConvSymKernelAvx2.S, `MultiplyAccumulateRowAvx2`, used for QLinearConv when the
  input channels are a multiple of 4) does the same over the input channels of one kernel tap.
  A depthwise QLinearConv (one input and one output channel per group; qlinearconv.cc,
  `is_depthwise_conv`) runs MLAS's depthwise kernel instead, which widens to int16 and is exact
  (measured); a depthwise conv with a channel multiplier (out/groups > 1) is a GEMM per group over
  the kernel taps and does saturate.
  With VNNI (`vpdpbusd`, AVX512-VNNI or AVX-VNNI), on ARM64 (dot-product instructions) and in the
  u8u8 kernel (zero-extended to int16, then `vpmaddwd`) the products are added in int32: exact.

This module emulates that arithmetic exactly (`qgemm`, `qconv`), states the pair rule on stored
weight codes (`pair_violations`), and derives the exact worst case (`pair_can_saturate`). It
imports NumPy only.
"""
from __future__ import annotations

import numpy as np

INT16_MIN, INT16_MAX = -32768, 32767
KERNELS = ("u8s8_pairs", "exact")


def _int_array(name: str, value, lo: int, hi: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"{name} must hold integer codes, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got values in [{arr.min()}, {arr.max()}]")
    return arr


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


# ----------------------------------------------------------------------------------------------
# reduction order
# ----------------------------------------------------------------------------------------------

ORDERS = ("matmul", "linear", "conv")


def reduction_view(codes, order: str) -> np.ndarray:
    """The weight codes as (K, N): column n is output n's reduction vector in the order the fused
    kernel reduces it, so that its pairs are rows (2j, 2j + 1).

    order="matmul": an ONNX MatMul/Gemm weight stored (K, N) (the exported Linear): as is.
    order="linear": a torch Linear weight (out, in): transposed, (in, out).
    order="conv":   a torch ConvNd weight (out, in/groups, *kernel): QLinearConv reduces over
                    (*kernel, in/groups) with the input channel fastest (NHWC im2col, and the
                    ConvSym kernel's per-tap channel blocks), so the view is
                    weight.transpose(0, 2, ..., 1).reshape(out, -1).T. A 1x1 conv's view equals
                    the Linear view of weight[:, :, 0, 0]. Each output channel reduces over its
                    own group's inputs only, so grouped convs need nothing more.
    """
    arr = np.asarray(codes)
    if order == "matmul":
        if arr.ndim != 2:
            raise ValueError(f"order='matmul' needs a 2-d (K, N) weight, got shape {arr.shape}")
        return arr
    if order == "linear":
        if arr.ndim != 2:
            raise ValueError(f"order='linear' needs a 2-d (out, in) weight, got shape {arr.shape}")
        return arr.T
    if order == "conv":
        if arr.ndim < 3:
            raise ValueError(f"order='conv' needs an (out, in/groups, *kernel) weight, got shape {arr.shape}")
        return np.moveaxis(arr, 1, -1).reshape(arr.shape[0], -1).T
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def _pairs(kn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (2j) and (2j + 1) of a (K, N) array, K zero-padded to even (as MLAS pads K)."""
    if kn.shape[0] % 2:
        kn = np.concatenate([kn, np.zeros((1,) + kn.shape[1:], kn.dtype)], axis=0)
    return kn[0::2], kn[1::2]


# ----------------------------------------------------------------------------------------------
# the pair rule
# ----------------------------------------------------------------------------------------------

def pair_can_saturate(q0, q1, a_lo: int = 0, a_hi: int = 255) -> np.ndarray:
    """Whether vpmaddubsw's int16 pair sum a0*q0 + a1*q1 can leave [-32768, 32767] for some
    activations a0, a1 in [a_lo, a_hi] (uint8 codes as the kernel sees them: x_q + 128).

    The sum is bilinear, so over the box its extremes sit at corners:
        max = sum_i (a_hi if q_i > 0 else a_lo) * q_i,   min = sum_i (a_lo if q_i > 0 else a_hi) * q_i.
    The pair saturates for some input iff max > 32767 or min < -32768.

    With the full range a in [0, 255] (what an int8 activation shifted by +128 can take) this is
        max = 255 * (q0+ + q1+),  min = -255 * (q0- + q1-)    (q+ = max(q, 0), q- = max(-q, 0))
    and since 255 * 128 = 32640 <= 32767 < 32895 = 255 * 129:
        a pair can saturate  <=>  q0, q1 have the same sign and |q0| + |q1| >= 129 (> 128).
    A pair of opposite signs never saturates (each side is at most 255 * 128 = 32640 in size),
    nor does any pair of 7-bit codes (|q| <= 64) or INT4 codes, and (127, 1) or (64, 64) are safe.
    """
    q0 = _int_array("q0", q0, -128, 127)
    q1 = _int_array("q1", q1, -128, 127)
    if not (0 <= a_lo <= a_hi <= 255):
        raise ValueError(f"need 0 <= a_lo <= a_hi <= 255, got a_lo={a_lo}, a_hi={a_hi}")
    hi = np.where(q0 > 0, a_hi, a_lo) * q0 + np.where(q1 > 0, a_hi, a_lo) * q1
    lo = np.where(q0 > 0, a_lo, a_hi) * q0 + np.where(q1 > 0, a_lo, a_hi) * q1
    return (hi > INT16_MAX) | (lo < INT16_MIN)


def is_depthwise(weight_shape, groups: int) -> bool:
    """ORT's depthwise QLinearConv (exact kernel): one input and one output channel per group."""
    return len(weight_shape) >= 3 and weight_shape[1] == 1 and weight_shape[0] == groups


def _check_groups(order: str, shape, groups: int) -> None:
    if not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if groups != 1 and (order != "conv" or shape[0] % groups):
        raise ValueError(f"groups={groups} needs order='conv' and out channels ({shape[0]}) divisible by it")


def pair_violation_mask(codes, order: str = "matmul", groups: int = 1) -> np.ndarray:
    """(ceil(K/2), N) bool: pair j of output n (rows 2j, 2j+1 of `reduction_view(codes, order)`)
    is same-sign with |q_2j| + |q_2j+1| > 128, i.e. can saturate in the u8s8 kernel (see
    `pair_can_saturate` for the derivation). All False for a depthwise conv (`is_depthwise`),
    which ORT runs on an exact kernel."""
    shape = np.shape(codes)
    _check_groups(order, shape, groups)
    kn = _int_array("codes", reduction_view(codes, order), -128, 127)
    a, b = _pairs(kn)
    mask = (a * b > 0) & (np.abs(a) + np.abs(b) > 128)
    if order == "conv" and is_depthwise(shape, groups):
        mask[:] = False
    return mask


def pair_violations(codes, order: str = "matmul", groups: int = 1) -> np.ndarray:
    """Where stored int8 weight codes break the u8s8 pair rule, as an (V, 3) int array of
    (k, k + 1, n) in the reduction view (`reduction_view(codes, order)`): rows k = 2j and k + 1
    of output column n are a same-sign pair with |q_k| + |q_k+1| > 128. Empty (0, 3) when the
    layer is exact on every CPU. For order="linear"/"conv" n is the output channel and k indexes
    the input (Linear) or the flattened (*kernel, in/groups) position (conv)."""
    mask = pair_violation_mask(codes, order, groups)
    j, n = np.nonzero(mask)
    return np.stack([2 * j, 2 * j + 1, n], axis=1).astype(np.int64) if j.size else np.zeros((0, 3), np.int64)


def worst_case_error(codes, order: str = "matmul", groups: int = 1) -> np.ndarray:
    """(N,) int64: the largest |exact - u8s8| accumulator error any uint8 activation can cause in
    each output column (multiply by s_x * s_w for output units). A positive pair saturates at
    32767 and loses at most 255 (q_a + q_b) - 32767 (all activations 255), a negative one at
    -32768 and gains at most 255 (|q_a| + |q_b|) - 32768; the pairs of one column use different
    activations, so the worst input drives all its positive pairs (others at 0) or all its
    negative ones: max(sum of positive losses, sum of negative gains). 0 for exact layers."""
    shape = np.shape(codes)
    _check_groups(order, shape, groups)
    kn = _int_array("codes", reduction_view(codes, order), -128, 127)
    a, b = _pairs(kn)
    pos = np.where((a > 0) & (b > 0), np.maximum(255 * (a + b) - INT16_MAX, 0), 0).sum(axis=0)
    neg = np.where((a < 0) & (b < 0), np.maximum(-255 * (a + b) + INT16_MIN, 0), 0).sum(axis=0)
    err = np.maximum(pos, neg).astype(np.int64)
    if order == "conv" and is_depthwise(shape, groups):
        err[:] = 0
    return err


def layer_summary(codes, order: str = "matmul", groups: int = 1) -> dict:
    """A per-layer record for export reports: whether the stored int8 codes are exact on every CPU
    under the u8s8 pair rule, how many pairs break it, the first one (k, k + 1, n) in the
    reduction view, and the worst-case accumulator error over the columns."""
    mask = pair_violation_mask(codes, order, groups)
    where = pair_violations(codes, order, groups)
    return {"exact_on_every_cpu": not bool(mask.any()), "violating_pairs": int(mask.sum()),
            "pairs": int(mask.size), "first_violation": tuple(int(t) for t in where[0]) if len(where) else None,
            "worst_case_accumulator_error": int(worst_case_error(codes, order, groups).max(initial=0))}


# ----------------------------------------------------------------------------------------------
# emulated integer GEMM / conv
# ----------------------------------------------------------------------------------------------

def qgemm(a_codes, b_codes, a_zero_point: int = 0, b_zero_point=0, kernel: str = "u8s8_pairs",
          chunk_rows: int = 256) -> np.ndarray:
    """MLAS's integer accumulator C (M, N) int64 for uint8 activations a (M, K) and int8 weights
    b (K, N): C = sum_k (a - z_a)(b - z_b), with the raw sum computed as the kernel computes it.

    kernel="u8s8_pairs": AVX2 / AVX-512BW without VNNI: sum over pairs j of
        sat16(a[2j] b[2j] + a[2j+1] b[2j+1]), in int32 (K zero-padded to even);
    kernel="exact": VNNI, ARM64 dot products, the u8u8 kernel: the plain integer sum.
    b_zero_point: a scalar or one per column (per-channel weight zero points). The corrections
    are exact as in MLAS. For a u8u8 layer (weights stored uint8) pass kernel="exact".
    """
    _check_kernel(kernel)
    a = _int_array("a_codes", a_codes, 0, 255)
    b = _int_array("b_codes", b_codes, -128, 255)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"a_codes (M, K) and b_codes (K, N) must agree on K, got {a.shape} and {b.shape}")
    if kernel == "u8s8_pairs" and b.size and b.max() > 127:
        raise ValueError("kernel='u8s8_pairs' takes int8 weight codes in [-128, 127]; uint8 weights use 'exact'")
    zb = np.broadcast_to(np.asarray(b_zero_point, np.int64), (b.shape[1],))
    k = a.shape[1]
    out = np.empty((a.shape[0], b.shape[1]), np.int64)
    b0, b1 = _pairs(b)
    for start in range(0, a.shape[0], max(1, chunk_rows)):
        blk = a[start:start + chunk_rows]
        if kernel == "exact":
            raw = blk @ b
        else:
            a0, a1 = _pairs(blk.T)
            pair = a0.T[:, :, None] * b0[None] + a1.T[:, :, None] * b1[None]   # (m, K/2, N)
            raw = np.clip(pair, INT16_MIN, INT16_MAX).sum(axis=1)
        out[start:start + chunk_rows] = (raw - a_zero_point * b.sum(axis=0)[None] - blk.sum(axis=1)[:, None] * zb[None]
                                         + k * a_zero_point * zb[None])
    return out


def ort_activation_codes(x_codes, x_zero_point: int = 0) -> tuple[np.ndarray, int]:
    """int8 activation codes (and zero point) as ORT's kernel sees them after QDQS8ToU8: + 128."""
    xq = _int_array("x_codes", x_codes, -128, 127)
    return xq + 128, int(x_zero_point) + 128


def matmul_integer_to_float(x_codes, w_codes, x_scale: float, w_scale, x_zero_point: int = 0,
                            w_zero_point=0, kernel: str = "u8s8_pairs") -> np.ndarray:
    """What ORT's fused MatMulIntegerToFloat returns for int8 activation codes x (M, K), weight
    codes w (K, N) (int8, or uint8 with zero point 128) and scales: C * (s_x * s_w) in float32."""
    a, za = ort_activation_codes(x_codes, x_zero_point)
    acc = qgemm(a, w_codes, za, w_zero_point, kernel)
    mult = (np.float32(x_scale) * np.asarray(w_scale, np.float32)).astype(np.float32)
    return (acc.astype(np.float32) * mult).astype(np.float32)


def requantize(acc, multiplier, zero_point: int, qmin: int = -128, qmax: int = 127) -> np.ndarray:
    """QLinearMatMul / QLinearConv output codes: clamp(rint(float32(acc) * multiplier) + z), with
    round-half-to-even as the kernels' cvtps2dq; multiplier = s_x * s_w / s_y (per column)."""
    scaled = np.asarray(acc, np.float32) * np.asarray(multiplier, np.float32)
    return np.clip(np.rint(scaled).astype(np.int64) + zero_point, qmin, qmax)


def im2col(x_codes, kernel_shape) -> tuple[np.ndarray, tuple[int, ...]]:
    """(N, C, *spatial) codes -> ((N * prod(out), prod(kernel) * C) patches in (*kernel, C) order,
    (N, *out)); stride 1, no padding, no dilation (what the probe graphs use)."""
    x = np.asarray(x_codes)
    nd = len(kernel_shape)
    if x.ndim != nd + 2:
        raise ValueError(f"x_codes must be (N, C, *spatial) with {nd} spatial dims, got shape {x.shape}")
    out_sp = [x.shape[2 + i] - kernel_shape[i] + 1 for i in range(nd)]
    if min(out_sp) <= 0:
        raise ValueError(f"kernel {tuple(kernel_shape)} larger than input {x.shape[2:]}")
    xl = np.moveaxis(x, 1, -1)  # (N, *spatial, C)
    cols = []
    for offs in np.ndindex(*kernel_shape):
        sl = (slice(None),) + tuple(slice(o, o + s) for o, s in zip(offs, out_sp)) + (slice(None),)
        cols.append(xl[sl])
    patches = np.stack(cols, axis=-2)  # (N, *out, prod(kernel), C)
    return patches.reshape(-1, int(np.prod(kernel_shape)) * x.shape[1]), (x.shape[0], *out_sp)


def qconv(x_codes, w_codes, x_zero_point: int = 0, w_zero_point=0, groups: int = 1,
          kernel: str = "u8s8_pairs") -> np.ndarray:
    """Integer accumulator of QLinearConv (stride 1, no padding) with int8 activation codes x
    (N, C, *spatial) shifted to uint8 as ORT does, int8 weight codes (O, C/groups, *k):
    (N, O, *out) int64, each group a u8s8 GEMM in (*kernel, C/groups) order; a depthwise conv
    (`is_depthwise`) is exact whatever `kernel` says, as ORT's depthwise kernel is."""
    _check_kernel(kernel)
    a, za = ort_activation_codes(x_codes, x_zero_point)
    w = np.asarray(w_codes)
    o, cg = w.shape[:2]
    if a.shape[1] != cg * groups or o % groups:
        raise ValueError(f"x has {a.shape[1]} channels, weight {w.shape} with groups={groups} needs {cg * groups}")
    og = o // groups
    zb = np.broadcast_to(np.asarray(w_zero_point, np.int64), (o,))
    if is_depthwise(w.shape, groups):
        kernel = "exact"
    outs = []
    for g in range(groups):
        cols, out_shape = im2col(a[:, g * cg:(g + 1) * cg], w.shape[2:])
        wg = reduction_view(w[g * og:(g + 1) * og], "conv")
        outs.append(qgemm(cols, wg, za, zb[g * og:(g + 1) * og], kernel))
    acc = np.concatenate(outs, axis=1)  # (N * prod(out), O)
    acc = acc.reshape(out_shape + (o,))
    return np.moveaxis(acc, -1, 1)
