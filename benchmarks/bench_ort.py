"""ONNX Runtime latency and file size of export_onnx's artifacts against the float model and ORT's own
dynamic quantization, on the CPU provider with 1 thread and otherwise DEFAULT session options.

Rows per model: float (export of the float model), our INT8 (default config: per-tensor weights),
our INT8 per-channel, our INT4 per-channel weights with INT8 activations (W4A8), group-wise INT4
weights (one scale per row and 32 inputs) with INT8 activations in both export forms (the standard
blocked QDQ, and com.microsoft MatMulNBits, export_onnx's default), and
`onnxruntime.quantization.quantize_dynamic(float.onnx, per_channel=True)` as a peer. "max abs diff
vs torch" is ORT against the PyTorch model the artifact was exported from (none for the peer).

  (a) mlp:    4 x (Linear(1024) + ReLU), batch 64, random calibration data
  (b) minilm: all-MiniLM-L6-v2 sentence encoder (input_ids, attention_mask -> pooled embedding),
              calibrated on 32 sentences (a trained QAT model is not needed for latency and size);
              timed on held-out sentences in batches of 8 and 32, each batch padded to its own
              longest sentence (the export is at one example shape, the batches are at theirs).

Timing (amct_pytorch.demo.minilm.deploy.time_artifacts): every artifact runs the same batches; the artifacts
take turns within each repetition (so machine noise hits all of them alike), and the table gives the
median over repetitions of the time for one batch (the mean over the batches of that repetition), and
its ratio to float. Sessions: amct_pytorch.demo.common.ort.ort_session (default options, thread count pinned).

  python benchmarks/bench_ort.py                  # both models, markdown table
  python benchmarks/bench_ort.py --model mlp --reps 5 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import amct_pytorch as amct
from amct_pytorch.demo.common.ort import ort_session, quiet_third_party
from amct_pytorch.demo.minilm.deploy import export_encoder, peer_dynamic, session_feed
from amct_pytorch.demo.minilm.deploy import time_artifacts as interleaved_times
from amct_pytorch.demo.minilm.model import SentenceEncoder
from amct_pytorch.export import export_onnx

GROUP_WISE = {"dst_type": "INT4", "channel_wise": True, "group_size": 32}
# label: (to_qat config, export_onnx options)
CONFIGS = {
    "INT8 (per-tensor W)": ({}, {}),
    "INT8 per-channel W": ({"retrain_weight_config": {"channel_wise": True}}, {}),
    "W4A8 per-channel INT4 W": ({"retrain_weight_config": {"dst_type": "INT4", "channel_wise": True}}, {}),
    "W4A8 group-wise INT4 W (G=32), blocked QDQ": ({"retrain_weight_config": GROUP_WISE}, {"group_wise_int4": "qdq"}),
    "W4A8 group-wise INT4 W (G=32), MatMulNBits": ({"retrain_weight_config": GROUP_WISE},
                                                   {"group_wise_int4": "matmulnbits"}),
}
PEER = "ORT quantize_dynamic (per-channel)"


def time_artifacts(paths: dict[str, Path], feeds: list[dict], reps: int, threads: int, warmup: int = 2):
    """{name: {"median_ms", "per_rep_ms"}}, artifacts interleaved within each repetition."""
    sessions = {name: ort_session(p, threads) for name, p in paths.items()}
    return interleaved_times(sessions, feeds, reps, warmup=warmup)


def outputs(path, feeds) -> list[np.ndarray]:
    """The first output of `path` in ORT (1 thread) for each feed."""
    s = ort_session(path, 1)
    return [s.run(None, session_feed(s, f))[0] for f in feeds]


def max_diff(paths, feeds, reference):
    """Max abs difference of each artifact's first output from `reference` (a list per feed)."""
    return {name: max(float(np.max(np.abs(o - r))) for o, r in zip(outputs(p, feeds), reference))
            for name, p in paths.items()}


# ---- (a) the MLP ---------------------------------------------------------------------------
def mlp_artifacts(workdir: Path, width: int, depth: int, batch: int):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    float_model = nn.Sequential(*layers).eval()
    x = torch.randn(batch, width)
    paths = {"float": export_onnx(float_model, x, workdir / "mlp_float.onnx").path}
    models = {"float": float_model}
    for label, (cfg, export_kwargs) in CONFIGS.items():
        model = copy.deepcopy(float_model)
        amct.to_qat(model, cfg)
        amct.calibrate(model, [torch.randn(256, width)], progress=False)
        model.eval()
        # check=False: on 256k activations a few codes sit on rounding ties (docs/export.md); diffs are in the table
        paths[label] = export_onnx(model, x, workdir / f"mlp_{len(paths)}.onnx", check=False, **export_kwargs).path
        models[label] = model
    paths[PEER] = peer_dynamic(Path(paths["float"]), workdir / "mlp_ortdyn.onnx")
    feeds = [{"input_0": torch.randn(batch, width, generator=torch.Generator().manual_seed(k)).numpy()}
             for k in range(8)]

    def torch_out(model, feed):
        with torch.no_grad():
            return model(torch.from_numpy(feed["input_0"])).numpy()
    return paths, {"batch": feeds}, models, torch_out


# ---- (b) MiniLM -------------------------------------------------------------------------------
def minilm_artifacts(workdir: Path, batches=(8, 32), max_sentences: int = 256):
    from amct_pytorch.demo.minilm import data as demo_data
    from amct_pytorch.demo.minilm.model import SKIP, load_model, tokenize

    model, tokenizer = load_model()
    train, held_out = demo_data.split_sentences(demo_data.doc_sentences())
    held_out = held_out[:max_sentences]
    example = held_out[:8]
    paths = {"float": export_encoder(model, tokenizer, example, workdir / "minilm_float.onnx",
                                     check=True, atol=1e-4)["path"]}
    models = {"float": model}
    for label, (cfg, export_kwargs) in CONFIGS.items():
        qat = copy.deepcopy(model)
        amct.to_qat(qat, cfg, skip=SKIP)
        amct.calibrate(qat, [tokenize(tokenizer, train[:32])], progress=False)
        qat.eval()
        paths[label] = export_encoder(qat, tokenizer, example, workdir / f"minilm_{len(paths)}.onnx",
                                      **export_kwargs)["path"]
        models[label] = qat
    paths[PEER] = peer_dynamic(Path(paths["float"]), workdir / "minilm_ortdyn.onnx")
    feeds = {f"batch {b}": [tokenize(tokenizer, held_out[k:k + b]) for k in range(0, len(held_out) - b + 1, b)]
             for b in batches}

    def torch_out(model, batch):
        with torch.no_grad():
            return SentenceEncoder(model).eval()(batch["input_ids"], batch["attention_mask"]).numpy()
    return paths, feeds, models, torch_out


def run(model_name: str, reps: int, threads: int, workdir: Path) -> list[dict]:
    if model_name == "mlp":
        paths, feed_sets, models, torch_out = mlp_artifacts(workdir, 1024, 4, 64)
        title = "4 x (Linear(1024) + ReLU), batch 64"
    else:
        paths, feed_sets, models, torch_out = minilm_artifacts(workdir)
        title = "all-MiniLM-L6-v2 encoder, held-out sentences at their own lengths"
    rows = []
    sizes = {name: os.path.getsize(p) for name, p in paths.items()}
    for setting, feeds in feed_sets.items():
        reference = outputs(paths["float"], feeds)
        diffs = max_diff(paths, feeds, reference)
        vs_torch = {name: max(float(np.max(np.abs(o - torch_out(models[name], f))))
                              for o, f in zip(outputs(paths[name], feeds), feeds)) for name in models}
        timed = time_artifacts(paths, feeds, reps, threads)
        base = timed["float"]["median_ms"]
        for name in paths:
            ms = timed[name]["median_ms"]
            rows.append({"model": title, "setting": setting, "artifact": name, "size_mb": sizes[name] / 1e6,
                         "ms": ms, "ratio": ms / base, "max_abs_diff_vs_float": diffs[name],
                         "max_abs_diff_vs_torch": vs_torch.get(name), "batches": len(feeds), "reps": reps,
                         "ms_per_rep": timed[name]["per_rep_ms"]})
    return rows


def table(rows) -> str:
    lines = ["| model | setting | artifact | file MB | median ms / batch | × float | max abs diff vs float "
             "| max abs diff vs torch |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        torch_diff = "–" if r.get("max_abs_diff_vs_torch") is None else f"{r['max_abs_diff_vs_torch']:.2g}"
        lines.append(f"| {r['model']} | {r['setting']} | {r['artifact']} | {r['size_mb']:.1f} | {r['ms']:.2f} | "
                     f"{r['ratio']:.2f} | {r['max_abs_diff_vs_float']:.3g} | {torch_diff} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "minilm", "all"], default="all")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="write the ONNX files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(max(1, args.threads))
    import onnxruntime as ort

    rows = []
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp, quiet_third_party():
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in (["mlp", "minilm"] if args.model == "all" else [args.model]):
            rows += run(name, args.reps, args.threads, workdir)
    load.append(os.getloadavg()[0])
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {args.threads} thread(s), "
          f"default session options, CPUExecutionProvider, {args.reps} repetitions, "
          f"1-min load average {load[0]:.2f} at the start, {load[1]:.2f} at the end")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "torch": torch.__version__,
                                         "threads": args.threads, "load_average_1min": load, "rows": rows},
                                        indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
