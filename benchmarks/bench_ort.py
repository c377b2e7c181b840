"""ONNX Runtime latency and file size of export_onnx's artifacts against the float model and ORT's own
dynamic quantization, on the CPU provider with 1 thread and otherwise DEFAULT session options.

Rows per model: float (export of the float model), our INT8 (default config: per-tensor weights),
our INT8 per-channel, our INT4 per-channel weights with INT8 activations (W4A8), and
`onnxruntime.quantization.quantize_dynamic(float.onnx, per_channel=True)` as a peer.

  (a) mlp:    4 x (Linear(1024) + ReLU), batch 64, random calibration data
  (b) minilm: all-MiniLM-L6-v2 sentence encoder (input_ids, attention_mask -> pooled embedding),
              calibrated on 32 sentences (a trained QAT model is not needed for latency and size);
              timed on held-out sentences in batches of 8 and 32, each batch padded to its own
              longest sentence (the export is at one example shape, the batches are at theirs).

Timing: every artifact runs the same batches; the artifacts take turns within each repetition
(so machine noise hits all of them alike), and the table gives the median over repetitions of the
time for one batch (the mean over the batches of that repetition), and its ratio to float.

  python benchmarks/bench_ort.py                  # both models, markdown table
  python benchmarks/bench_ort.py --model mlp --reps 5 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import amct_pytorch as amct
from amct_pytorch.export import export_onnx

CONFIGS = {
    "INT8 (per-tensor W)": {},
    "INT8 per-channel W": {"retrain_weight_config": {"channel_wise": True}},
    "W4A8 per-channel INT4 W": {"retrain_weight_config": {"dst_type": "INT4", "channel_wise": True}},
}


def quiet():
    warnings.filterwarnings("ignore")
    for name in ("onnxscript", "torch.onnx", "torch.export", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def session(path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()  # defaults, only the thread count pinned
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_artifacts(paths: dict[str, Path], feeds: list[dict], reps: int, threads: int, warmup: int = 2):
    """{name: (median ms per batch, [per-rep ms])}, artifacts interleaved within each repetition."""
    sessions = {name: session(p, threads) for name, p in paths.items()}
    for s in sessions.values():
        for _ in range(warmup):
            for f in feeds:
                s.run(None, f)
    times = {name: [] for name in sessions}
    for rep in range(reps):
        order = list(sessions)[rep % len(sessions):] + list(sessions)[:rep % len(sessions)]
        for name in order:
            s = sessions[name]
            start = time.perf_counter()
            for f in feeds:
                s.run(None, f)
            times[name].append((time.perf_counter() - start) * 1e3 / len(feeds))
    return {name: (statistics.median(t), t) for name, t in times.items()}


def peer_dynamic(float_path: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(float_path), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return out


def max_diff(paths, feeds, reference):
    """Max abs difference of each artifact's first output from `reference` (a list per feed)."""
    out = {}
    for name, p in paths.items():
        s = session(p, 1)
        out[name] = max(float(np.max(np.abs(s.run(None, f)[0] - r))) for f, r in zip(feeds, reference))
    return out


# ---- (a) the MLP ---------------------------------------------------------------------------
def mlp_artifacts(workdir: Path, width: int, depth: int, batch: int):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    float_model = nn.Sequential(*layers).eval()
    x = torch.randn(batch, width)
    paths = {"float": export_onnx(float_model, x, workdir / "mlp_float.onnx").path}
    models = {}
    for label, cfg in CONFIGS.items():
        model = copy.deepcopy(float_model)
        amct.to_qat(model, cfg)
        amct.calibrate(model, [torch.randn(256, width)], progress=False)
        model.eval()
        # check=False: on 256k activations a few codes sit on rounding ties (docs/export.md); diffs are in the table
        paths[label] = export_onnx(model, x, workdir / f"mlp_{len(paths)}.onnx", check=False).path
        models[label] = model
    paths["ORT quantize_dynamic (per-channel)"] = peer_dynamic(Path(paths["float"]), workdir / "mlp_ortdyn.onnx")
    feeds = [{"input_0": torch.randn(batch, width, generator=torch.Generator().manual_seed(k)).numpy()}
             for k in range(8)]
    return paths, {"batch": feeds}, models, float_model


# ---- (b) MiniLM -------------------------------------------------------------------------------
def minilm_artifacts(workdir: Path, batches=(8, 32), max_sentences: int = 256):
    from amct_pytorch.demo import data as demo_data
    from amct_pytorch.demo.model import load_model, tokenize
    from amct_pytorch.demo.run import SKIP, SentenceEncoder

    model, tokenizer = load_model()
    train, held_out = demo_data.split_sentences(demo_data.doc_sentences())
    held_out = held_out[:max_sentences]
    example = tokenize(tokenizer, held_out[:8])
    example = (example["input_ids"], example["attention_mask"])
    paths = {"float": export_onnx(SentenceEncoder(model).eval(), example, workdir / "minilm_float.onnx",
                                  atol=1e-4).path}
    for label, cfg in CONFIGS.items():
        qat = copy.deepcopy(model)
        amct.to_qat(qat, cfg, skip=SKIP)
        amct.calibrate(qat, [tokenize(tokenizer, train[:32])], progress=False)
        qat.eval()
        paths[label] = export_onnx(SentenceEncoder(qat).eval(), example, workdir / f"minilm_{len(paths)}.onnx",
                                   check=False).path
    paths["ORT quantize_dynamic (per-channel)"] = peer_dynamic(Path(paths["float"]), workdir / "minilm_ortdyn.onnx")
    feeds = {}
    for b in batches:
        feeds[f"batch {b}"] = []
        for k in range(0, len(held_out) - b + 1, b):
            enc = tokenize(tokenizer, held_out[k:k + b])
            feeds[f"batch {b}"].append({"input_0": enc["input_ids"].numpy(), "input_1": enc["attention_mask"].numpy()})
    return paths, feeds


def run(model_name: str, reps: int, threads: int, workdir: Path) -> list[dict]:
    if model_name == "mlp":
        paths, feed_sets, _, _ = mlp_artifacts(workdir, 1024, 4, 64)
        title = "4 x (Linear(1024) + ReLU), batch 64"
    else:
        paths, feed_sets = minilm_artifacts(workdir)
        title = "all-MiniLM-L6-v2 encoder, held-out sentences at their own lengths"
    rows = []
    sizes = {name: os.path.getsize(p) for name, p in paths.items()}
    for setting, feeds in feed_sets.items():
        reference = [session(paths["float"], 1).run(None, f)[0] for f in feeds]
        diffs = max_diff(paths, feeds, reference)
        timed = time_artifacts(paths, feeds, reps, threads)
        base = timed["float"][0]
        for name in paths:
            rows.append({"model": title, "setting": setting, "artifact": name, "size_mb": sizes[name] / 1e6,
                         "ms": timed[name][0], "ratio": timed[name][0] / base, "max_abs_diff_vs_float": diffs[name],
                         "batches": len(feeds), "reps": reps, "ms_per_rep": timed[name][1]})
    return rows


def table(rows) -> str:
    lines = ["| model | setting | artifact | file MB | median ms / batch | × float | max abs diff vs float |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['setting']} | {r['artifact']} | {r['size_mb']:.1f} | {r['ms']:.2f} | "
                     f"{r['ratio']:.2f} | {r['max_abs_diff_vs_float']:.3g} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "minilm", "all"], default="all")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="write the ONNX files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(max(1, args.threads))
    import onnxruntime as ort

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in (["mlp", "minilm"] if args.model == "all" else [args.model]):
            rows += run(name, args.reps, args.threads, workdir)
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {args.threads} thread(s), "
          f"default session options, CPUExecutionProvider, {args.reps} repetitions")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "torch": torch.__version__,
                                         "threads": args.threads, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
