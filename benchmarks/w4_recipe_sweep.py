"""QAT recipe sweep for the MiniLM main job (`amct-qat demo`): PTQ and QAT held-out mean cosine per recipe.

Reuses the demo itself (run.prepare / split_model / run_setting / train / Evaluator), so every
number is what `amct-qat demo` would print for that setting and step count; export and ONNX Runtime
are skipped. Experiments run one after another in one process (the float model, the reference
embeddings and the outlier-split model are made once); each appends a line to the log (markdown).

    PYTHONPATH=src python benchmarks/w4_recipe_sweep.py --list
    PYTHONPATH=src python benchmarks/w4_recipe_sweep.py --only g32_mse,g32_mse_lr --log sweep_log.md

A recipe = setting (w8a8, or INT4 weights per group / per channel with `scale_init` "arq" or
"mse"), QAT steps and learning rates (weights / clips / weight scales). The s/step column is
wall time under whatever else runs on the machine: compare it only between runs on a quiet one.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from amct_pytorch.demo.common.settings import Setting, setting_options
from amct_pytorch.demo.common.training import Timer
from amct_pytorch.demo.minilm.run import prepare, run_setting, split_model, uses_split
from amct_pytorch.demo.minilm.settings import SETTINGS, Options, gguf_setting, w4a8_config

W8A8 = SETTINGS["w8a8"]


def q8_0(lr_weights: float, steps: int = 100) -> Setting:
    base = gguf_setting("q8_0", steps)
    return replace(base, lr_weights=lr_weights, label=base.label.rsplit(", weight lr", 1)[0] + f", weight lr {lr_weights:g}")


def w4(group: int | None = 32, init: str = "arq") -> Setting:
    cfg = w4a8_config(group)
    if init != "arq":
        cfg["retrain_weight_config"]["scale_init"] = init
    name = f"w4a8g{group}" if group else "w4a8"
    return Setting(name, f"{name} scale_init={init}", cfg)


# name: (setting, steps, Options overrides)
EXPERIMENTS = {
    "g32_arq": (w4(32), 150, {}),
    "g32_mse": (w4(32, "mse"), 150, {}),
    "g32_mse_130": (w4(32, "mse"), 130, {}),
    "g32_mse_s3e-4": (w4(32, "mse"), 150, {"lr_weight_scales": 3e-4}),
    "g32_mse_s1e-4": (w4(32, "mse"), 150, {"lr_weight_scales": 1e-4}),
    "g32_mse_s1e-4_130": (w4(32, "mse"), 130, {"lr_weight_scales": 1e-4}),
    "g32_mse_s3e-5": (w4(32, "mse"), 150, {"lr_weight_scales": 3e-5}),
    "g32_mse_s3e-5_130": (w4(32, "mse"), 130, {"lr_weight_scales": 3e-5}),
    "g32_arq_s1e-4": (w4(32), 150, {"lr_weight_scales": 1e-4}),
    "g32_mse_s3e-3": (w4(32, "mse"), 150, {"lr_weight_scales": 3e-3}),
    "g32_mse_s1e-2": (w4(32, "mse"), 150, {"lr_weight_scales": 1e-2}),
    "g32_mse_w2e-5": (w4(32, "mse"), 150, {"lr_weights": 2e-5}),
    "g32_mse_w1e-4": (w4(32, "mse"), 150, {"lr_weights": 1e-4}),
    "g32_mse_w2e-4": (w4(32, "mse"), 150, {"lr_weights": 2e-4}),
    "g32_mse_w1e-4_s3e-3": (w4(32, "mse"), 150, {"lr_weights": 1e-4, "lr_weight_scales": 3e-3}),
    "g16_arq": (w4(16), 150, {}),
    "g16_mse": (w4(16, "mse"), 150, {}),
    "pc_mse": (w4(None, "mse"), 150, {}),
    "w8a8_80": (W8A8, 80, {}),
    "w8a8_100": (W8A8, 100, {}),
    "w8a8_120": (W8A8, 120, {}),
    # GGUF Q8_0 (llama.cpp profile; the PyTorch side equals llama.cpp to ~1e-4, docs/gguf.md): its PTQ
    # error is ~4e-4, so the weight learning rate must move the model by less than that (a setting's own
    # lr_weights overrides Options.lr_weights, so these set it on the setting)
    "q8_0_w5e-5": (q8_0(5e-5), 100, {"eval_points": 4}),
    "q8_0_w1e-5": (q8_0(1e-5), 100, {"eval_points": 4}),
    "q8_0_w5e-6": (q8_0(5e-6), 100, {"eval_points": 4}),
    "q8_0_w2e-6": (q8_0(2e-6), 100, {"eval_points": 4}),
    "q8_0_w1e-5_50": (q8_0(1e-5, 50), 50, {"eval_points": 2}),
    "q4_0": (gguf_setting("q4_0", 200), 200, {"eval_points": 4}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated experiment names (default: all)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--log", default="sweep_log.md", help="markdown log, one row per experiment (appended)")
    p.add_argument("--json", help="also append one JSON object per experiment to this file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, help="override every experiment's step count")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, 4 steps")
    return p.parse_args(argv)


HEADER = "| experiment | setting | steps | lr w / clip / scale | PTQ mean cos | QAT mean cos | QAT min cos | s/step | wall s |"


def row(r: dict) -> str:
    return (f"| {r['experiment']} | {r['label']} | {r['steps']} | {r['lrs']} | {r['ptq_mean_cos']:.4f} | "
            f"{r['qat_mean_cos']:.4f} | {r['qat_min_cos']:.4f} | {r['s_per_step']:.2f} | {r['wall_s']:.0f} |")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
    if args.list:
        for n in names:
            setting, steps, over = EXPERIMENTS[n]
            print(f"{n:24s} {setting.label:32s} {steps:4d} steps {over or ''}")
        return []
    torch.set_num_threads(args.threads)
    base_opts = Options(progress=False, eval_points=1)
    if args.quick:
        base_opts = replace(base_opts, max_train=64, max_eval=32, batch_size=8, calib_size=8)
    start = time.perf_counter()
    model, tokenizer, train_texts, _, evaluator, targets = prepare(base_opts, Timer())
    split, _ = split_model(model, evaluator, base_opts)
    print(f"prepared in {time.perf_counter() - start:.0f}s: {len(train_texts)} training sentences, "
          f"{evaluator.reference.shape[0]} held-out")
    log = Path(args.log)
    if not log.exists():
        log.write_text(HEADER + "\n" + "|---" * 9 + "|\n")
    results = []
    print(HEADER)
    for name in names:
        setting, steps, over = EXPERIMENTS[name]
        steps = 4 if args.quick else (args.steps or steps)
        opts = setting_options(replace(base_opts, steps=steps, **over), setting)
        t0 = time.perf_counter()
        res = run_setting(setting, split if uses_split(setting.config, opts) else model, tokenizer, train_texts,
                          targets, evaluator, opts)
        r = {"experiment": name, "label": setting.label, "steps": steps,
             "lrs": f"{opts.lr_weights:g} / {opts.lr_clips:g} / {opts.lr_weight_scales:g}",
             "ptq_mean_cos": res["ptq"]["mean_cos"], "qat_mean_cos": res["qat"]["mean_cos"],
             "qat_min_cos": res["qat"]["min_cos"], "s_per_step": res["times_s"]["train"] / steps,
             "wall_s": time.perf_counter() - t0, "times_s": res["times_s"],
             "config": res["config"], "quick": args.quick}
        r["curve"] = dict(zip(res["history"]["eval_step"], res["history"]["eval_mean_cos"]))
        results.append(r)
        print(row(r), "curve:", {k: round(v, 5) for k, v in r["curve"].items()}, flush=True)
        with log.open("a") as f:
            f.write(row(r) + ("  (quick)" if args.quick else "") + "\n")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    return results


if __name__ == "__main__":
    main()
