"""Every demo's outputs: the output folder, report.json, plot.png and the closing line.

Files are written under a temporary name and renamed only when complete, so an
interrupted run never leaves a report that looks finished.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .deps import require

REPORT, PLOT = "report.json", "plot.png"  # every demo's report files in its output folder


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def fresh_output_dir(out, names) -> Path:
    """Create `out` and delete the files `names` from an earlier run: a report in `out` always
    belongs to a finished run (they are written under temporary names and renamed at the end)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / name).unlink(missing_ok=True)
    return out


def begin_run(out) -> tuple[Path, float]:
    """A demo's first step: its output folder without an earlier run's report, and the start time
    (for `finish_report`)."""
    return fresh_output_dir(out, (REPORT, PLOT)), time.perf_counter()


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (the `demo` extra provides matplotlib)."""
    require("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=90)
    try:
        _replace_atomically(path, write)
    finally:
        plt.close(fig)


def write_json(report: dict, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    _replace_atomically(path, write)


def finish_report(report: dict, start: float, out: Path, log, table, write_plot, artifacts: str) -> dict:
    """A demo's last step: total time, the printed table, plot.png and report.json (written last,
    so a report.json in `out` belongs to a finished run), and the closing line."""
    report["total_time_s"] = round(time.perf_counter() - start, 1)
    log(table(report))
    write_plot(report, out / PLOT)
    write_json(report, out / REPORT)
    log(f"wrote {out / REPORT}, {out / PLOT} and {artifacts}; total {report['total_time_s']:.0f}s")
    return report
