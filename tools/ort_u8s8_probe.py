"""Run hand-built QDQ graphs through ONNX Runtime and save every output (issue 19).

Standalone (numpy, onnx, onnxruntime only, no torch, no amct_pytorch) so that it runs quickly
under `qemu-x86_64 -cpu Haswell python3.11 tools/ort_u8s8_probe.py OUT.npz`, which emulates an
AVX2 CPU without VNNI and AVX-512: there ORT's u8s8 kernels add adjacent pairs of u8*s8 products
in saturating int16 (vpmaddubsw). Natively on a VNNI CPU the same graphs are exact.

All scales are powers of two, so every float output is an exact multiple of its step and the
integer accumulator (or requantized code) can be read back exactly: the comparison with the NumPy
emulation in amct_pytorch.saturation is exact, not within a tolerance.

Cases (name -> graph):
  mm_*      x -> Q(int8) -> DQ -> MatMul(DQ(W int8 (K, N), per-column scale)) -> y float
            (ORT fuses to MatMulIntegerToFloat)
  qmm_*     the same with y -> Q(int8) -> DQ (ORT fuses to QLinearMatMul)
  conv_*    x -> Q -> DQ -> Conv(DQ(W int8 (O, C, kh, kw), per-channel), no bias) -> Q -> DQ
            (ORT fuses to QLinearConv)
  *_u8w     the same codes stored as uint8 q + 128 with zero point 128
  *_capped / *_7bit  pair-capped and 7-bit int8 codes; conv_g2 / conv_dw / conv_dw_m2 grouped,
            depthwise and depthwise-with-multiplier convs; mm_k1536* a long reduction
The script writes, per case, the inputs, the weight codes and the ORT output, plus the op types
of ORT's optimized graph, into one .npz file.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SX = 2.0 ** -3      # activation step (x = q * SX exactly for q in int8)
SY_MM = 2.0 ** -2   # output step of the QLinearMatMul / QLinearConv cases


def _dq_weight(codes: np.ndarray, scales: np.ndarray, axis: int, u8: bool):
    if u8:
        stored = (codes.astype(np.int16) + 128).astype(np.uint8)
        zp = np.full(scales.shape, 128, np.uint8)
    else:
        stored, zp = codes.astype(np.int8), np.zeros(scales.shape, np.int8)
    inits = [numpy_helper.from_array(stored, "w_q"), numpy_helper.from_array(scales.astype(np.float32), "w_s"),
             numpy_helper.from_array(zp, "w_zp")]
    node = helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], axis=axis)
    return inits, node


def _act_qdq(src: str, dst: str, scale: float, tag: str):
    inits = [numpy_helper.from_array(np.array(scale, np.float32), f"{tag}_s"),
             numpy_helper.from_array(np.array(0, np.int8), f"{tag}_zp")]
    nodes = [helper.make_node("QuantizeLinear", [src, f"{tag}_s", f"{tag}_zp"], [f"{tag}_q"]),
             helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_s", f"{tag}_zp"], [dst])]
    return inits, nodes


def matmul_model(codes: np.ndarray, scales: np.ndarray, m: int, requant: bool, u8: bool) -> onnx.ModelProto:
    k, n = codes.shape
    inits, nodes = _act_qdq("x", "xd", SX, "x")
    w_inits, w_node = _dq_weight(codes, scales, 1, u8)
    inits += w_inits
    nodes += [w_node, helper.make_node("MatMul", ["xd", "w"], ["mm"])]
    if requant:
        o_inits, o_nodes = _act_qdq("mm", "y", SY_MM, "y")
        inits += o_inits
        nodes += o_nodes
    else:
        nodes.append(helper.make_node("Identity", ["mm"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def conv_model(codes: np.ndarray, scales: np.ndarray, x_shape, u8: bool, groups: int = 1) -> onnx.ModelProto:
    inits, nodes = _act_qdq("x", "xd", SX, "x")
    w_inits, w_node = _dq_weight(codes, scales, 0, u8)
    inits += w_inits
    o_inits, o_nodes = _act_qdq("c", "y", SY_MM, "y")
    inits += o_inits
    nodes += [w_node, helper.make_node("Conv", ["xd", "w"], ["c"], group=groups)] + o_nodes
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def run(model: onnx.ModelProto, x: np.ndarray, tmp: str, name: str):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = os.path.join(tmp, name + ".opt.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    opt = onnx.load(so.optimized_model_filepath)
    return y, [node.op_type for node in opt.graph.node]


def cap_pairs(kn: np.ndarray) -> np.ndarray:
    """Rows (2j, 2j+1) of a (K, N) code array with |q0| + |q1| <= 128 wherever they share a sign:
    the smaller partner gives way (an independent, minimal re-implementation for the probe)."""
    kn = kn.copy()
    a, b = kn[0:-1:2], kn[1::2]
    same = (a * b > 0) & (np.abs(a) + np.abs(b) > 128)
    small_a = np.abs(a) <= np.abs(b)
    room_a = np.sign(a) * (128 - np.abs(b))
    room_b = np.sign(b) * (128 - np.abs(a))
    kn[0:-1:2] = np.where(same & small_a, room_a, a)
    kn[1::2] = np.where(same & ~small_a, room_b, b)
    return kn


def cases(rng: np.random.Generator):
    """(name, kind, codes, groups, x_codes) with x = x_codes * SX."""
    out = []
    # hand-built MatMul: column j holds two 127s (or -128s) at the rows named
    k, n, m = 8, 6, 3
    w = np.zeros((k, n), np.int64)
    w[0, 0] = w[1, 0] = 127          # pair (0, 1): saturates
    w[1, 1] = w[2, 1] = 127          # rows 1, 2: different pairs
    w[0, 2] = w[2, 2] = 127          # rows 0, 2: different pairs
    w[2, 3] = w[3, 3] = -128         # pair (2, 3), negative: saturates
    w[4, 4], w[5, 4] = 127, -128     # opposite signs: exact
    w[6, 5], w[7, 5] = 64, 64        # |sum| = 128: exact at the bound
    xq = np.stack([np.full(k, 127), np.full(k, -128), rng.integers(-128, 128, k)])
    out.append(("mm_hand", "mm", w, None, xq))
    # random full-range MatMul (int8 weights), its pair-capped twin, M = 1 (GEMV) and odd K
    for tag, (k, n, m) in {"mm_rand": (64, 24, 5), "mm_rand_m1": (64, 24, 1), "mm_rand_k37": (37, 20, 4)}.items():
        w = rng.integers(-128, 128, (k, n))
        xq = rng.integers(-128, 128, (m, k))
        xq[0] = np.where(w[:, 0] >= 0, 127, -128)   # the worst row for column 0
        out.append((tag, "mm", w, None, xq))
    # the same random layer with capped pairs, and 7-bit codes: exact everywhere
    k, n, m = 64, 24, 5
    w = rng.integers(-128, 128, (k, n))
    xq = rng.integers(-128, 128, (m, k))
    xq[0] = np.where(w[:, 0] >= 0, 127, -128)
    out.append(("mm_rand_capped", "mm", cap_pairs(w), None, xq))
    out.append(("mm_rand_7bit", "mm", rng.integers(-64, 64, (k, n)), None, xq))
    # a long reduction (MiniLM's FFN-out K): int8 wrong, capped / 7-bit / uint8 storage exact; with
    # K = 1536 the activation row sums no longer fit int16 (the u8u8 kernel's zero-point term)
    k, n, m = 1536, 8, 3
    w = rng.integers(-128, 128, (k, n))
    xq = rng.integers(-128, 128, (m, k))
    xq[0], xq[1] = 127, -128
    out.append(("mm_k1536", "mm", w, None, xq))
    out.append(("mm_k1536_capped", "mm", cap_pairs(w), None, xq))
    out.append(("mm_k1536_7bit", "mm", rng.integers(-64, 64, (k, n)), None, xq))
    # requantized MatMul -> QLinearMatMul
    k, n, m = 16, 8, 4
    w = rng.integers(-40, 41, (k, n))
    w[0, 0] = w[1, 0] = 127
    w[4, 3] = w[5, 3] = -128
    w[2, 5] = w[4, 5] = 127
    xq = rng.integers(-128, 128, (m, k))
    xq[:, :6] = 127
    out.append(("qmm_hand", "qmm", w, None, xq))
    # convs: codes (O, C, kh, kw); the reduction order is to be determined by the test
    for tag, (o, c, kh, kw, h, wd) in {"conv_c3": (4, 3, 3, 3, 5, 5), "conv_c8": (4, 8, 3, 3, 5, 5),
                                       "conv_c16_1x1": (8, 16, 1, 1, 4, 4), "conv_c5": (3, 5, 2, 2, 4, 4)}.items():
        wc = rng.integers(-20, 21, (o, c, kh, kw))
        flat = np.arange(c * kh * kw)
        # channel 0: a pair adjacent in (kh, kw, c) order that is NOT adjacent in torch's (c, kh, kw) order
        # channel 1: a pair adjacent in torch order, not in (kh, kw, c) order (when kh * kw > 1)
        def khkwc(idx):
            t, ci = divmod(int(idx), c)
            return ci, t // kw, t % kw
        if c % 2 == 1 and kh * kw > 1:   # (kh, kw, c) index c-1, c: crosses the first tap
            a, b = khkwc(c - 1), khkwc(c)
        else:
            a, b = khkwc(0), khkwc(1)
        wc[0][a] = wc[0][b] = 127
        if kh * kw > 1:
            wc[1, 0, 0, 0] = wc[1, 0, 0, 1] = 127     # torch-adjacent, (kh, kw, c) indices 0 and c
        wc[2 % o, :, :, :] = rng.integers(-128, 128, (c, kh, kw))   # a full-range channel
        x = rng.integers(-128, 128, (1, c, h, wd))
        x[0, :, : kh + 1, : kw + 1] = 127
        out.append((tag, "conv", wc, 1, x))
        del flat
    # grouped (2 groups of 3 input channels), depthwise (ORT's exact depthwise kernel) and
    # depthwise with channel multiplier 2 (a GEMM per group over the 9 taps), full-range codes
    for tag, (o, c, g) in {"conv_g2": (4, 6, 2), "conv_dw": (8, 8, 8), "conv_dw_m2": (16, 8, 8)}.items():
        wc = rng.integers(-128, 128, (o, c // g, 3, 3))
        x = rng.integers(-128, 128, (1, c, 5, 5))
        x[0, :, :4, :4] = 127
        out.append((tag, "conv", wc, g, x))
    return out


def main(path: str) -> None:
    rng = np.random.default_rng(19)
    record = {}
    meta = {"ort": ort.__version__, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, codes, groups, xq in cases(rng):
            for u8 in (False, True):
                full = name + ("_u8w" if u8 else "")
                if kind == "conv":
                    scales = (2.0 ** -(5 + np.arange(codes.shape[0]) % 3)).astype(np.float32)
                    model = conv_model(codes, scales, xq.shape, u8, groups)
                else:
                    scales = (2.0 ** -(5 + np.arange(codes.shape[1]) % 3)).astype(np.float32)
                    model = matmul_model(codes, scales, xq.shape[0], kind == "qmm", u8)
                x = (xq * SX).astype(np.float32)
                t0 = time.perf_counter()
                y, ops = run(model, x, tmp, full)
                meta["cases"][full] = {"kind": kind, "ops": ops, "seconds": time.perf_counter() - t0,
                                       "groups": groups or 1}
                record[full + "/y"] = y
                record[full + "/codes"] = codes.astype(np.int8)
                record[full + "/w_scale"] = scales
                record[full + "/x_codes"] = xq.astype(np.int8)
    record["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(path, **record)
    print(json.dumps({k: v["ops"] for k, v in meta["cases"].items()}, indent=0))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ort_u8s8_probe.npz")
