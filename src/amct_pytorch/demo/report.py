"""The demo's outputs: the printed table, report.json and plot.png.

Files are written under a temporary name and renamed only when complete, so an
interrupted run never leaves a report that looks finished.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def table(report: dict) -> str:
    """The results as a fixed-width text table (also used in the README)."""
    head = f"{'setting':<10} {'phase':<6} {'mean cos':>9} {'min cos':>8} {'Lee-50 r':>9} {'Δ Lee':>8}  time"
    lines = [head, "-" * len(head)]
    f = report["float"]
    lines.append(f"{'float':<10} {'-':<6} {1:>9.4f} {1:>8.4f} {f['lee_pearson']:>9.4f} {0:>+8.4f}  "
                 f"{f['eval_time_s']:.1f}s eval")
    for s in report["settings"]:
        t = s["times_s"]
        for phase, spent in (("PTQ", f"{t['calibrate']:.1f}s calib + {t['ptq_eval']:.1f}s eval"),
                             ("QAT", f"{t['train']:.1f}s train ({s['steps']} steps) + {t['qat_eval']:.1f}s eval")):
            m = s[phase.lower()]
            lines.append(f"{s['name']:<10} {phase:<6} {m['mean_cos']:>9.4f} {m['min_cos']:>8.4f} "
                         f"{m['lee_pearson']:>9.4f} {m['lee_delta']:>+8.4f}  {spent}")
    split = report.get("outlier_split", {})
    if split.get("enabled"):
        lines.append(f"PTQ and QAT quantize the model after a float-exact FFN outlier split: +{split['added_neurons']} "
                     f"of {split['hidden_before']} hidden neurons, float min cos {split['float_min_cos_after_split']:.6f}")
    return "\n".join(lines)


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(report: dict, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    _replace_atomically(path, write)


def write_plot(report: dict, path: Path) -> None:
    """Loss and held-out cosine over the training steps; clip ranges before/after QAT."""
    from .model import require

    require("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    rows = 1 + (len(settings) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.2 * rows), squeeze=False)
    loss_ax, cos_ax = axes[0]
    for s in settings:
        h = s["history"]
        loss_ax.plot(h["step"], h["loss"], label=s["name"], lw=0.8)
        cos_ax.plot(h["eval_step"], h["eval_mean_cos"], marker="o", label=s["name"])
    loss_ax.set(title="distillation loss (1 - cos) per training batch", xlabel="step", yscale="log")
    cos_ax.set(title="held-out mean cosine to the float embeddings", xlabel="step")
    for ax in (loss_ax, cos_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    for k, s in enumerate(settings):
        ax = axes[1 + k // 2][k % 2]
        before, after = s["clip_ranges"]["before"], s["clip_ranges"]["after"]
        names = list(before)
        x = range(len(names))
        for side, colour in ((1, "tab:red"), (0, "tab:blue")):
            label = "clip_max" if side else "clip_min"
            ax.plot(x, [before[n][side] for n in names], "o--", color=colour, ms=3, alpha=0.5,
                    label=f"{label} after calibration")
            ax.plot(x, [after[n][side] for n in names], "o-", color=colour, ms=3, label=f"{label} after QAT")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set(title=f"{s['name']}: activation clip range per layer",
               xlabel="layer in model order (per block: query, key, value, attn out, FFN in, FFN out)")
        ax.set_xticks(list(x)[::6], [f"block {k // 6}" for k in x][::6], fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if len(settings) % 2:
        axes[-1][1].axis("off")
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=90)
    try:
        _replace_atomically(path, write)
    finally:
        plt.close(fig)
