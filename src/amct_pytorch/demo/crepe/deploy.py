"""The CREPE demo's deployment: the float and QAT models in ONNX, run in ONNX Runtime."""
from __future__ import annotations

import os
import statistics
import time

import torch

from ...export import export_onnx
from ..common.ort import ort_session, quiet_third_party
from . import data as crepe_data
from .model import FRAME


def export_float(model, path) -> dict:
    """The float model through torch.onnx.export (dynamo, dynamic batch), for the latency baseline."""
    start = time.perf_counter()
    with quiet_third_party():
        torch.onnx.export(model.eval(), (torch.zeros(8, FRAME),), path, dynamo=True, external_data=False,
                          input_names=["input_0"], dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), verbose=False)
    return {"path": str(path), "size_bytes": os.path.getsize(path), "time_s": round(time.perf_counter() - start, 2)}


def export_check(student, evaluator, torch_salience, path) -> dict:
    """Export the QAT model with amct_pytorch.export_onnx (dynamic batch), run the artifact in
    ONNX Runtime on the whole eval set (a run.PitchEval): max abs diff to PyTorch and the
    artifact's own RPA."""
    start = time.perf_counter()
    with quiet_third_party():  # rounding ties can move one activation by a grid step: check=False, measured below
        export_onnx(student.eval(), (evaluator.frames[:8],), path, check=False)
    export_s = time.perf_counter() - start
    session = ort_session(path)
    name = session.get_inputs()[0].name
    b = evaluator.batch_size
    got = torch.cat([torch.from_numpy(session.run(None, {name: evaluator.frames[i:i + b].numpy()})[0])
                     for i in range(0, len(evaluator.frames), b)])
    diff = (got.double() - torch_salience.double()).abs()
    metrics = evaluator.metrics(got)
    return {"path": str(path), "size_bytes": os.path.getsize(path), "frames": len(got),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "ort_rpa": metrics["rpa"], "ort_cents_error": metrics["cents_error"],
            "export_s": round(export_s, 2), "time_s": round(time.perf_counter() - start, 2)}


def ort_latency(path, batch: int, runs: int) -> dict:
    """Median wall time of one ONNX Runtime run on `batch` frames, 1 thread, default graph
    optimizations; also the op types of the optimized graph (whether QLinearConv appeared)."""
    import onnx

    optimized = f"{path}.ort_optimized.onnx"
    session = ort_session(path, threads=1, optimized_path=optimized)
    feed = {session.get_inputs()[0].name: crepe_data.synthesize(batch, 7)[0].numpy()}
    session.run(None, feed)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    ops = {}
    try:
        for node in onnx.load(optimized).graph.node:
            key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
            ops[key] = ops.get(key, 0) + 1
    finally:
        if os.path.exists(optimized):
            os.remove(optimized)
    return {"median_ms": round(1000 * statistics.median(times), 1), "min_ms": round(1000 * min(times), 1),
            "runs": runs, "batch": batch, "threads": 1,
            "optimized_ops": {k: ops[k] for k in sorted(ops)}}
