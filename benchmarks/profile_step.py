"""Where a LinearQAT training step spends its time: torch.profiler table next to nn.Linear's.

  python3 benchmarks/profile_step.py --shape 1024x2048x2048 [--compiled] [--channel-wise]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from amct_pytorch import LinearQAT, calibrating, qat_function


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1024x2048x2048", help="NxINxOUT")
    p.add_argument("--compiled", action="store_true")
    p.add_argument("--channel-wise", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=18)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, i, o = (int(v) for v in args.shape.lower().split("x"))
    x = torch.randn(n, i, requires_grad=True)
    g = torch.randn(n, o)
    qat_function.use_compiled_kernels(args.compiled)
    ours = LinearQAT(i, o, config={"retrain_weight_config": {"channel_wise": args.channel_wise}}).train()
    with torch.no_grad(), calibrating():
        ours(x)
    for name, mod in (("nn.Linear", nn.Linear(i, o)), ("LinearQAT" + (" compiled" if args.compiled else ""), ours)):
        def step():
            mod.zero_grad(set_to_none=True)
            x.grad = None
            mod(x).backward(g)
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        print(f"\n== {name}, {args.shape}, {args.threads} threads, {args.steps} steps ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
