"""The CREPE demo's printed table and plot (report.json and the files: common.report)."""
from __future__ import annotations

from pathlib import Path

from ..common.report import pyplot, save_figure


def table(report: dict) -> str:
    """The results as a fixed-width text table (RPA in percent, error in cents)."""
    f = report["float"]
    head = f"{'setting':<8} {'phase':<12} {'RPA %':>7} {'Δ RPA':>7} {'|err| c':>8}  time"
    lines = [head, "-" * len(head)]
    lines.append(f"{'float':<8} {'-':<12} {100 * f['rpa']:>7.2f} {0:>+7.2f} {f['cents_error']:>8.1f}  "
                 f"{f['eval_time_s']:.1f}s eval")
    for s in report["settings"]:
        t = s["times_s"]
        rows = [("PTQ", s["ptq"], f"{t['calibrate']:.1f}s calib + {t['ptq_eval']:.1f}s eval"),
                ("QAT", s["qat"], f"{t['train']:.1f}s train ({s['steps']} steps, BN {s['bn_mode']}) "
                                   f"+ {t['qat_eval']:.1f}s eval")]
        for mode, r in s["bn_modes"].items():
            if mode != s["bn_mode"]:
                rows.append((f"QAT BN {mode}", r, f"{t.get(f'train_bn_{mode}', 0):.1f}s train"))
        o = s.get("onnx")
        if o:
            rows.append(("ONNX RT", {"rpa": o["ort_rpa"], "cents_error": o["ort_cents_error"]},
                         f"max |diff| {o['max_abs_diff']:.1e} vs PyTorch"))
        for phase, m, spent in rows:
            lines.append(f"{s['name']:<8} {phase:<12} {100 * m['rpa']:>7.2f} {100 * (m['rpa'] - f['rpa']):>+7.2f} "
                         f"{m['cents_error']:>8.1f}  {spent}")
    lat = [("float", f["onnx"])] + [(s["name"] + " QAT", s["onnx"]) for s in report["settings"] if s.get("onnx")]
    lines.append("ONNX Runtime, 1 thread, batch "
                 f"{f['onnx']['latency']['batch']}: " + "; ".join(
                     f"{n} {o['latency']['median_ms']:.0f} ms ({o['size_bytes'] / 1e6:.2f} MB)" for n, o in lat))
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> None:
    """Training loss and RPA along training per setting (and BatchNorm mode); final RPA per phase."""
    plt = pyplot()
    fig, (loss_ax, rpa_ax, bar_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    f_rpa = 100 * report["float"]["rpa"]
    for s in report["settings"]:
        for mode, r in s["bn_modes"].items():
            h = r["history"]
            label = s["name"] + ("" if len(s["bn_modes"]) == 1 else f" (BN {mode})")
            style = "-" if mode == s["bn_mode"] else ":"
            loss_ax.plot(h["step"], h["loss"], style, label=label, lw=0.8)
            rpa_ax.plot(h["eval_step"], [100 * v for v in h["eval_rpa"]], style, marker="o", label=label)
    rpa_ax.axhline(f_rpa, color="k", lw=0.8, ls="--", label="float")
    loss_ax.set(title="distillation loss (BCE to the float saliences)", xlabel="step", yscale="log")
    rpa_ax.set(title=f"RPA (%) on the first {report['data']['curve_frames']} eval frames", xlabel="step")
    names = [s["name"] for s in report["settings"]]
    x = range(len(names))
    width = 0.25
    for k, (phase, colour) in enumerate((("ptq", "tab:orange"), ("qat", "tab:green"))):
        vals = [100 * s[phase]["rpa"] for s in report["settings"]]
        bars = bar_ax.bar([i + (k - 0.5) * width for i in x], vals, width, label=phase.upper(), color=colour)
        bar_ax.bar_label(bars, fmt="%.1f", fontsize=8)
    bar_ax.axhline(f_rpa, color="k", lw=0.8, ls="--", label=f"float {f_rpa:.2f}")
    bar_ax.set_xticks(list(x), names)
    lo = min([100 * s["ptq"]["rpa"] for s in report["settings"]] + [f_rpa])
    bar_ax.set_ylim(max(0.0, lo - 5), 100.5)
    bar_ax.set(title=f"RPA (%) on all {report['data']['eval_frames']} eval frames")
    for ax in (loss_ax, rpa_ax, bar_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
