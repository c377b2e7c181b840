"""ONNX Runtime latency of a 4 x (Linear(1024) + ReLU) MLP, 1 intra-op thread, M = 1, 32, 256 rows:
float vs group-wise INT4 (group 32) as MatMulNBits at accuracy_level 1 (float32 compute, behind the
activation Q/DQ: the default w4a8g export) and at accuracy_level 4 (int8 compute, the
dynamic_act='ort-matmulnbits-level4' preset: no activation Q/DQ), and level 4's agreement with its
PyTorch model (issue 19's table).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/ort_level4.py --out benchmarks/results_ort_level4.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from amct_pytorch.convert import calibrate, to_qat
from amct_pytorch.export import export_onnx, ort_session

K, LAYERS = 1024, 4
CONFIGS = {
    "level1": {"retrain_weight_config": {"dst_type": "INT4", "channel_wise": True, "group_size": 32}},
    "level4": {"retrain_weight_config": {"dst_type": "INT4", "channel_wise": True, "group_size": 32},
               "retrain_data_config": {"dynamic_act": "ort-matmulnbits-level4"}},
}


def mlp(seed=0):
    torch.manual_seed(seed)
    mods = []
    for _ in range(LAYERS):
        mods += [nn.Linear(K, K), nn.ReLU()]
    return nn.Sequential(*mods).eval()


def timed(session, x, reps):
    name = session.get_inputs()[0].name
    for _ in range(3):
        session.run(None, {name: x})
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        out.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = mlp()
    calib = [torch.randn(64, K)]
    rows = (1, 32, 256)
    res = {"cpu": platform.processor() or platform.machine(), "load_before": os.getloadavg(), "threads": 1,
           "reps": args.reps, "k": K, "layers": LAYERS, "by_rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"float": Path(tmp) / "float.onnx"}
        torch.onnx.export(base, (calib[0],), paths["float"], input_names=["x"], dynamo=False,
                          dynamic_axes={"x": {0: "m"}})
        models = {}
        for name, cfg in CONFIGS.items():
            m = mlp()
            to_qat(m, cfg)
            if name == "level1":
                calibrate(m, calib)
            m.eval()
            paths[name] = Path(tmp) / f"{name}.onnx"
            export_onnx(m, calib[0], paths[name], check=False)
            models[name] = m
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        sessions = {n: ort_session(p, opts) for n, p in paths.items()}
        for m_rows in rows:
            x = np.random.default_rng(m_rows).standard_normal((m_rows, K)).astype(np.float32)
            row = {}
            for n, s in sessions.items():
                row[f"{n}_ms"] = round(timed(s, x, args.reps), 4)
            for n in CONFIGS:
                row[f"{n}_x_float"] = round(row[f"{n}_ms"] / row["float_ms"], 3)
            with torch.no_grad():
                want = models["level4"](torch.from_numpy(x)).numpy()
            got = sessions["level4"].run(None, {sessions["level4"].get_inputs()[0].name: x})[0]
            row["level4_max_abs_diff_vs_torch"] = float(np.abs(got - want).max())
            row["level4_max_abs_output"] = float(np.abs(want).max())
            res["by_rows"][str(m_rows)] = row
            print(m_rows, row, flush=True)
    res["load_after"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
