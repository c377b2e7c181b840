"""Group-wise INT4 linears as ONNX Runtime's com.microsoft `MatMulNBits`: the packing of its B
input and the graph rewrite of a blocked weight Q/DQ + MatMul/Gemm into one MatMulNBits node.
"""
from __future__ import annotations

import numpy as np

from .onnx_graph import FoldedWeight, attr, blocked_codes

MATMULNBITS_ACCURACY_LEVEL = 1  # float32 compute: exact dequantization, then a float matmul (see fold_matmulnbits)
MS_DOMAIN = "com.microsoft"


def linear_consumer(g, dq):
    """(node, activation input, bias input or None) when the blocked weight `dq` feeds a linear as
    x @ Wᵀ: `Gemm(x, W, b, transB=1)` (alpha = beta = 1, no transA) or `Transpose -> MatMul(x, Wᵀ)`;
    plus the Transpose to drop (or None). None when it feeds anything else."""
    gemm = g.only_consumer(dq.output[0], "Gemm")
    if gemm is not None:
        if (gemm.input[1] == dq.output[0] and gemm.input[0] != dq.output[0] and attr(gemm, "transB", 0)
                and not attr(gemm, "transA", 0) and attr(gemm, "alpha", 1.0) == 1.0
                and attr(gemm, "beta", 1.0) == 1.0):
            bias = gemm.input[2] if len(gemm.input) > 2 and gemm.input[2] else None
            return gemm, gemm.input[0], bias, None
        return None
    transpose = g.only_consumer(dq.output[0], "Transpose")
    if transpose is None or list(attr(transpose, "perm", [1, 0])) != [1, 0]:
        return None
    matmul = g.only_consumer(transpose.output[0], "MatMul")
    if matmul is None or matmul.input[1] != transpose.output[0] or matmul.input[0] == transpose.output[0]:
        return None
    return matmul, matmul.input[0], None, transpose


def pack_matmulnbits(codes: np.ndarray, block: int) -> np.ndarray:
    """INT4 codes (N, K) in [-8, 7] -> MatMulNBits' B: uint8 (N, K / block, block / 2), each code
    stored as code + 8 (the default zero point), two per byte along K, the first in the low nibble."""
    n, k = codes.shape
    u = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(n, k // block, block // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).astype(np.uint8)


def matmulnbits_codes(packed: np.ndarray) -> np.ndarray:
    """`pack_matmulnbits` undone: uint8 (N, blocks, block / 2) -> int8 codes (N, blocks * block)."""
    packed = np.asarray(packed, dtype=np.uint8)
    pairs = np.stack([packed & 0x0F, packed >> 4], axis=-1)
    return (pairs.astype(np.int8) - 8).reshape(packed.shape[0], -1)


def fold_matmulnbits(g, proto, q, dq, src, drop, before, dead_values) -> FoldedWeight | None:
    """A group-wise INT4 linear weight (blocked Q/DQ on a 2-D (N, K) weight, blocks along K) and its
    MatMul / Gemm -> one com.microsoft MatMulNBits(x, B, scales), bias as a separate Add; None (nothing
    changed) when the pattern does not fit, and the caller keeps the blocked DequantizeLinear.

    MatMulNBits dequantizes B as (code - 8)·scale per block (the default zero point 8 for bits=4,
    so symmetric codes c in [-8, 7] are stored as c + 8) and multiplies with x. accuracy_level 1
    (float32) makes ORT's CPU kernel compute exactly that in float32; accuracy_level 4 would
    quantize x again per block to int8 inside the kernel, which our activation Q/DQ already did on
    another grid, so its outputs would differ from the QAT model.
    """
    from onnx import helper, numpy_helper  # optional dependency

    found = blocked_codes(g, q, dq)
    if found is None:
        return None
    codes, zp, axis, block, bits = found
    n, k = codes.shape if codes.ndim == 2 else (0, 0)
    if (bits != 4 or codes.ndim != 2 or axis != 1 or np.any(zp != 0) or block < 16 or block & (block - 1)
            or k % block):
        return None
    use = linear_consumer(g, dq)
    if use is None:
        return None
    node, x, bias, transpose = use
    name = g.fresh(f"{q.input[0]}_matmulnbits")
    init = numpy_helper.from_array(pack_matmulnbits(codes, block), name)
    proto.graph.initializer.append(init)
    scales = q.input[1]  # (N, K / block) float32, the blocked quantizer's own scale constant
    y = node.output[0]
    out = g.fresh(f"{y}_matmulnbits") if bias else y
    node.op_type, node.domain = "MatMulNBits", MS_DOMAIN
    del node.input[:]
    node.input.extend([x, name, scales])
    del node.attribute[:]
    node.attribute.extend([helper.make_attribute("K", k), helper.make_attribute("N", n),
                           helper.make_attribute("bits", 4), helper.make_attribute("block_size", block),
                           helper.make_attribute("accuracy_level", MATMULNBITS_ACCURACY_LEVEL)])
    node.output[0] = out
    if bias:
        before.setdefault(("after", id(node)), []).append(
            helper.make_node("Add", [out, bias], [y], name=g.fresh(f"{node.name}_bias")))
    drop.add(id(dq))
    dead_values.add(dq.output[0])
    if transpose is not None:
        drop.add(id(transpose))
        dead_values.add(transpose.output[0])
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return FoldedWeight(src.name, name, 4, None, 1, codes.size * 4, len(init.raw_data), "matmulnbits",
                        storage="matmulnbits", reason="group-wise INT4 (codes + 8 in nibbles); float32 compute")
