"""A seconds-long run of benchmarks/bench_linear.py so the benchmark never rots (no timing checks)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_linear.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_linear", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_table_and_json(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "bench.json"
    result = bench.main(["--quick", "--bits", "8", "--granularity", "channel", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["training"] == result["training"]
    (row,) = saved["training"]
    assert row["impl"] == "LinearQAT" and row["shape"] == "64x128->96" and row["granularity"] == "channel"
    for key in ("train_ratio", "eval_ratio", "train_ratio_of_min", "eval_ratio_of_min", "linear_train_ms"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert math.isfinite(row["extra_peak_mb"])
    assert {r["search"] for r in saved["calibration"]} == {"exact", "histogram"}
    by_search = {r["search"]: r["state_mb"] for r in saved["calibration"]}
    assert by_search["histogram"][0] == by_search["histogram"][1]  # state independent of batch count
    assert by_search["exact"][1] > by_search["exact"][0]  # the exact search keeps every value
    table = capsys.readouterr().out
    assert "| 64x128->96 | INT8 | per-channel | LinearQAT |" in table and "histogram" in table


def test_peak_bytes_sees_torch_cpu_allocations():
    import torch
    bench = _load()
    assert bench.peak_bytes(lambda: torch.empty(1 << 20), torch.device("cpu")) >= 4 << 20


@pytest.mark.parametrize("argv, match", [
    (["--shapes", "64x128"], "--shapes"), (["--bits", "3"], "--bits"),
    (["--granularity", "row"], "--granularity"), (["--peers", "nope"], "--peers")])
def test_bad_arguments_are_named(argv, match, capsys):
    with pytest.raises(SystemExit):
        _load().main(argv)
    assert match in capsys.readouterr().err


def test_conv_benchmark_quick_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_conv", BENCH.parent / "bench_conv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "conv.json"
    result = mod.main(["--quick", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows == result["rows"]
    ours = [r for r in rows if r["impl"] == "Conv2dQAT"]
    assert {r["granularity"] for r in ours} == {"tensor", "channel"}
    for r in ours:
        for key in ("train_ratio", "eval_ratio", "saved_vs_float", "conv_train_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, key
    assert "| tiny 2x8x12x12->8 | per-tensor | Conv2dQAT |" in capsys.readouterr().out
