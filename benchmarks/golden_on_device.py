"""Replay the golden recordings (tests/data) with LinearQAT on any device, eager and compiled.

The same per-step procedure as tests/test_golden.py, with module and inputs moved to
--device; prints the largest deviation per case and fails where it exceeds the float32
rounding bound of tests/golden_replay.py (rounding_tolerances), or --tol if given.
  python3 benchmarks/golden_on_device.py --device cuda [--compiled]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from amct_pytorch import qat_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the recordings and their replay
from golden_replay import CASES, excess, factor_tolerance, replay, rounding_tolerances  # noqa: E402


def worst_deviation(name, device, tol=None):
    """(largest |ours - reference|, where, largest excess over the bound) over outputs, loss, gradients
    and stored factors of every step; the bound is `tol` if given, else the float32 rounding bound."""
    worst, where, over = 0.0, "", float("-inf")
    for r in replay(name, device):
        m, step = r.module, r.record
        bounds = rounding_tolerances(r)
        pairs = [(r.output, "output"), (r.loss, "loss"), (m.weight.grad, "grad_weight"), (m.bias.grad, "grad_bias"),
                 (m.wts_scales, "wts_scales_after_forward")]
        if step["acts_quantized_this_step"]:
            pairs += [(m.acts_clip_max, "acts_clip_max_after_forward"), (m.acts_clip_max.grad, "grad_acts_clip_max")]
            if not r.fixed_min:
                pairs += [(m.acts_clip_min.grad, "grad_acts_clip_min")]
        for ours, key in pairs:
            ref = step[key]
            ours = ours.detach().cpu().reshape(ref.shape)
            bound = torch.full_like(ref, tol) if tol is not None else bounds.get(key, factor_tolerance(ref)).cpu()
            over = max(over, excess(ours, ref, bound))
            diff = float((ours - ref).abs().max())
            if diff > worst:
                worst, where = diff, f"step {r.t} {key} (|ref| max {float(ref.abs().max()):.3g})"
    return worst, where, over


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compiled", action="store_true", help="use the torch.compile kernels")
    p.add_argument("--tol", type=float, default=None,
                   help="a fixed absolute limit instead of the float32 rounding bound")
    args = p.parse_args(argv)
    qat_function.use_compiled_kernels(args.compiled)
    failed = False
    for name in CASES:
        worst, where, over = worst_deviation(name, torch.device(args.device), args.tol)
        ok = over <= 0
        failed |= not ok
        print(f"{name:15s} device={args.device} compiled={args.compiled} max|diff|={worst:.3g} at {where} "
              f"{'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
