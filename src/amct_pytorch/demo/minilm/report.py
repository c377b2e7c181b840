"""The MiniLM demo's printed tables and plot (report.json and the files: common.report)."""
from __future__ import annotations

from pathlib import Path

from ..common.report import pyplot, save_figure


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
        which = ", ".join(s["name"] for s in report["settings"] if s.get("split_outliers", True))
        lines.append(f"PTQ and QAT of {which} quantize the model after a float-exact FFN outlier split: "
                     f"+{split['added_neurons']} of {split['hidden_before']} hidden neurons, float min cos "
                     f"{split['float_min_cos_after_split']:.6f}")
    if "deployment" in report:
        lines += ["", deployment_table(report)]
        if report["deployment"].get("gguf"):
            lines += ["", gguf_table(report)]
    return "\n".join(lines)


def gguf_table(report: dict) -> str:
    """One row per GGUF file run in llama.cpp: size (and token_embd's share), cosine to the float
    PyTorch model, agreement with the PyTorch QAT model, 1-thread latency against F32 / F16."""
    g = report["deployment"]["gguf"]
    head = (f"{'GGUF file':<12} {'MB':>6} {'embd %':>7} {'llama mean cos':>15} {'min cos':>8} "
            f"{'vs PyTorch mean':>16} {'min':>9} {'ms':>7} {'x F32':>6} {'x F16':>6}")
    lines = [head, "-" * len(head)]
    for name, f in g["files"].items():
        m = f["llama"]
        agree = (f"{m['vs_torch_mean_cos']:>16.6f} {m['vs_torch_min_cos']:>9.6f}" if "vs_torch_mean_cos" in m
                 else f"{'-':>16} {'-':>9}")
        lines.append(f"{name:<12} {f['size_mb']:>6.1f} {100 * f['token_embd_share']:>6.1f}% {m['mean_cos']:>15.4f} "
                     f"{m['min_cos']:>8.4f} {agree} {f['latency_ms']:>7.2f} {f['x_f32']:>6.2f} {f['x_f16']:>6.2f}")
    t = g["latency"]
    lines.append(f"llama-cpp-python {g['llama_cpp_python']}, embedding mode, MEAN pooling; accuracy on all "
                 f"{m['sentences']} held-out sentences; latency: {t['threads']} thread (n_threads_batch too), one "
                 f"sentence per call, median over the first {t['sentences']} sentences of each one's best of "
                 f"{t['reps']} passes")
    return "\n".join(lines)


def deployment_table(report: dict) -> str:
    """One row per ONNX artifact: size, accuracy of the ORT-run file on every held-out sentence
    (cosine to the float PyTorch model), and ORT latency with its ratio to the float artifact."""
    d = report["deployment"]
    timing = d["latency"]
    batches = list(timing["by_batch"])
    head = (f"{'artifact':<14} {'file MB':>8} {'ORT mean cos':>13} {'min cos':>8} {'vs PyTorch':>10} {'every CPU':>9}"
            + "".join(f"  {'ms @' + b + ' (x float)':>20}" for b in batches))
    lines = [head, "-" * len(head)]
    for name, a in d["artifacts"].items():
        ort = a["ort"]
        diff = f"{ort['max_abs_diff_vs_torch']:.1e}" if "max_abs_diff_vs_torch" in ort else "-"
        exact = a.get("int8_exactness")
        every = "-" if exact is None else "exact" if exact["exact_on_every_cpu"] else "SATURATES"
        row = (f"{name:<14} {a['size_mb']:>8.1f} {ort['mean_cos']:>13.4f} {ort['min_cos']:>8.4f} {diff:>10} "
               f"{every:>9}")
        for b in batches:
            row += f"  {a['latency_ms'][b]:>11.1f} ({a['x_float'][b]:.2f})".rjust(22)
        lines.append(row)
    for name, err in d.get("not_exported", {}).items():
        lines.append(f"{name:<14} not exported: {err}")
    ort = next(iter(d["artifacts"].values()))["ort"]
    lines.append(f"ONNX Runtime {d['onnxruntime']}, default session options; accuracy on all {ort['sentences']} "
                 f"held-out sentences (up to {ort['max_tokens']} tokens; 'vs PyTorch' = max abs difference to the "
                 f"exported model's eval output); latency: {timing['threads']} thread, median of {timing['reps']} "
                 f"repetitions over the first {timing['sentences']} held-out sentences; 'every CPU': its int8 "
                 "weights keep the u8s8 pair rule (exact on x86 CPUs without VNNI too) or 'SATURATES' there")
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> None:
    """Loss and held-out cosine over the training steps; clip ranges before/after QAT."""
    plt = pyplot()
    settings = report["settings"]
    deployment = report.get("deployment")
    rows = 1 + (len(settings) + 1) // 2 + (1 if deployment else 0)
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
        axes[1 + len(settings) // 2][1].axis("off")
    if deployment:
        _plot_deployment(axes[-1], deployment)
    fig.tight_layout()
    save_figure(fig, path)


def _plot_deployment(axes, deployment: dict) -> None:
    """Accuracy of each ORT-run artifact against its file size; ORT latency per batch size."""
    size_ax, time_ax = axes
    artifacts = deployment["artifacts"]
    for name, a in artifacts.items():
        size_ax.scatter(a["size_mb"], a["ort"]["mean_cos"], s=30)
        size_ax.annotate(name, (a["size_mb"], a["ort"]["mean_cos"]), textcoords="offset points", xytext=(4, 4),
                         fontsize=8)
    size_ax.set(title="ONNX Runtime: held-out mean cosine to the float model vs file size", xlabel="file MB",
                ylabel="mean cosine")
    size_ax.grid(alpha=0.3)
    timing = deployment["latency"]
    batches = list(timing["by_batch"])
    names = list(artifacts)
    width = 0.8 / max(1, len(batches))
    for k, b in enumerate(batches):
        time_ax.bar([i + k * width for i in range(len(names))], [artifacts[n]["latency_ms"][b] for n in names],
                    width=width, label=f"batch {b}")
    time_ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(names))], names, fontsize=8)
    time_ax.set(title=f"ONNX Runtime latency, {timing['threads']} thread (median ms per batch)", ylabel="ms")
    time_ax.grid(alpha=0.3, axis="y")
    time_ax.legend(fontsize=8)
