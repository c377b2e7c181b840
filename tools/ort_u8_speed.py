"""Latency of one exported-style W8A8 MatMul layer in ONNX Runtime, 1 thread: int8 weights (u8s8
kernel), the same codes as uint8 with zero point 128 (u8u8 kernel), and the float MatMul.

    python3 tools/ort_u8_speed.py [M K N] [repeats]
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ort_u8s8_probe import matmul_model  # noqa: E402


def float_model(w: np.ndarray, m: int):
    k, n = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def bench(model, x, repeats, extra=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    for key, val in (extra or {}).items():
        so.add_session_config_entry(key, val)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), 1e3 * float(np.min(times))


def main():
    m, k, n = (int(a) for a in sys.argv[1:4]) if len(sys.argv) >= 4 else (256, 1024, 1024)
    repeats = int(sys.argv[4]) if len(sys.argv) >= 5 else 30
    rng = np.random.default_rng(0)
    codes = rng.integers(-128, 128, (k, n))
    scales = np.full(n, 2.0 ** -9, np.float32)
    x = (rng.integers(-128, 128, (m, k)) * 2.0 ** -3).astype(np.float32)
    rows = {
        "int8 weights (u8s8)": bench(matmul_model(codes, scales, m, False, False), x, repeats),
        "uint8 zp 128 weights (u8u8)": bench(matmul_model(codes, scales, m, False, True), x, repeats),
        "int8 + session.x64quantprecision=1": bench(matmul_model(codes, scales, m, False, False), x, repeats,
                                                     {"session.x64quantprecision": "1"}),
        "float MatMul": bench(float_model(codes * scales[None], m), x, repeats),
    }
    print(f"M={m} K={k} N={n}, 1 thread, {repeats} runs, onnxruntime {ort.__version__}")
    for name, (med, best) in rows.items():
        print(f"  {name:38s} median {med:7.3f} ms  min {best:7.3f} ms")


if __name__ == "__main__":
    main()
