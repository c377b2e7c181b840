"""CUDA training step and eval forward of LinearQAT against nn.Linear and torch.ao's QAT Linear,
eager and under torch.compile (default and mode="reduce-overhead"), plus a host-sync check.

Times are CUDA-event medians over --reps steps after warm-up, each as a ratio to nn.Linear's
median at the same shape. The sync check runs one calibrated training step and one eval
forward under torch.cuda.set_sync_debug_mode("error"): any host synchronisation raises.

  python3 benchmarks/bench_cuda_steps.py --json results_cuda_steps.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_linear import _eval_forward, _torch_ao, _train_step  # noqa: E402

from amct_pytorch import LinearQAT, calibrating  # noqa: E402

SHAPES = [(512, 1024, 1024), (1024, 2048, 2048), (2048, 4096, 4096)]


def timed(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sync_check(mod, x, g):
    """'ok' when a training step and an eval forward make no host synchronisation."""
    results = {}
    for name, fn in (("train", _train_step(mod, x, g)), ("eval", _eval_forward(mod, x))):
        mod.train(name == "train")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            results[name] = "ok"
        except RuntimeError as err:
            results[name] = f"sync: {str(err).splitlines()[0][:120]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", type=Path)
    p.add_argument("--granularity", default="tensor,channel", help="comma-separated: tensor, channel")
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                   help="comma-separated NxINxOUT")
    args = p.parse_args(argv)
    # one compiled module per shape and config: more than dynamo's default recompile limit of one function
    torch._dynamo.config.recompile_limit = 64
    dev = torch.device("cuda")
    rows, syncs = [], {}
    for n, i, o in [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]:
        torch.manual_seed(0)
        x = torch.randn(n, i, device=dev, requires_grad=True)
        g = torch.randn(n, o, device=dev)
        base = nn.Linear(i, o, device=dev)
        base_train = timed(_train_step(base, x, g), args.reps, args.warmup)
        base_eval = timed(_eval_forward(base, x), args.reps, args.warmup)
        impls = {}
        for gran in args.granularity.split(","):
            cfg = {"retrain_weight_config": {"channel_wise": gran == "channel"}}
            ours = LinearQAT(i, o, device=dev, config=cfg).train()
            with torch.no_grad(), calibrating():
                ours(x)
            if gran == "tensor":
                syncs[f"{n}x{i}->{o}"] = sync_check(ours, x, g)
            impls[f"LinearQAT per-{gran}"] = ours
            impls[f"LinearQAT per-{gran} compiled"] = torch.compile(ours, fullgraph=True)
            impls[f"LinearQAT per-{gran} compiled reduce-overhead"] = torch.compile(ours, fullgraph=True,
                                                                                 mode="reduce-overhead")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ao = _torch_ao(i, o, 8, gran == "channel", dev).train()
                with torch.no_grad():
                    ao(x)
            impls[f"torch.ao per-{gran}"] = ao
        for name, mod in impls.items():
            try:
                mod.train()
                train = timed(_train_step(mod, x, g), args.reps, args.warmup)
                mod.eval()
                evl = timed(_eval_forward(mod, x), args.reps, args.warmup)
            except Exception as err:  # report, do not stop the whole run
                if not any("error" in r for r in rows):  # the first failure in full, for diagnosis
                    import traceback
                    traceback.print_exc(limit=-12)
                rows.append(dict(shape=f"{n}x{i}->{o}", impl=name, error=f"{type(err).__name__}: {err}"[:200]))
                print(rows[-1], flush=True)
                continue
            rows.append(dict(shape=f"{n}x{i}->{o}", impl=name, train_ratio=round(train / base_train, 3),
                             eval_ratio=round(evl / base_eval, 3), linear_train_ms=round(base_train, 3),
                             linear_eval_ms=round(base_eval, 3)))
            r = rows[-1]
            print(f"| {r['shape']} | {name} | {r['train_ratio']:.2f}x | {r['eval_ratio']:.2f}x | "
                  f"{r['linear_train_ms']:.3f} ms |", flush=True)
    print("host-sync check (set_sync_debug_mode('error')):", syncs)
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": rows, "sync_check": syncs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
