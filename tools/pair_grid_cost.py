"""Accuracy cost of the kernel-aware INT8 weight grids as plain PTQ (issue 19): weights only, no
training. For each Linear: relative weight error ||w_q - w|| / ||w|| and the output's relative
MSE ||x w_q^T - x w^T||^2 / ||x w^T||^2 on x ~ N(0, 1) (256 rows), for

  int8-mse  the unconstrained INT8 grid with functional.mse_scale's step (clips outliers)
  int8      the unconstrained symmetric INT8 grid with ARQ's max-abs step (also what the uint8
            zero-point-128 fallback stores: the same codes, the same accuracy)
  pair      the pair-capped grid (amct_pytorch.pair_grid) with the same ARQ step
  pair-mse  the pair-capped grid with its own squared-error-optimal step (pair_mse_scale)
  int7      codes in [-64, 63] with ARQ's 7-bit step

on random Linears (1024 x 1024; nn.Linear's uniform init and Gaussian weights) and on the 36
Linears of all-MiniLM-L6-v2, per output channel and per tensor.

    PYTHONPATH=src python3 tools/pair_grid_cost.py
"""
from __future__ import annotations

import json
import sys

import torch

from amct_pytorch import pair_grid as pg
from amct_pytorch.functional import arq_scale, mse_scale, rows_layout


def quantized(w: torch.Tensor, grid: str, per_channel: bool) -> tuple[torch.Tensor, float]:
    """(w_q, fraction of pairs whose codes the grid changed)."""
    layout = rows_layout(w.shape)
    bits = 7 if grid == "int7" else 8
    s = arq_scale(w, bits, per_channel, layout if per_channel else None)
    if grid == "pair-mse":
        s = pg.pair_mse_scale(w, s, "linear")
    if grid == "int8-mse":
        s = mse_scale(w, 8, per_channel, layout if per_channel else None)
    sv = s.reshape(-1, 1) if per_channel else s.reshape(())
    if grid in ("int8", "int7", "int8-mse"):
        lo, hi = (-64, 63) if bits == 7 else (-128, 127)
        return torch.round(w / sv).clamp(lo, hi) * sv, 0.0
    plain = torch.round(w / sv).clamp(-128, 127)
    codes = pg.pair_codes(w, s, "linear").float()
    changed = (codes != plain).reshape(w.shape[0], -1, 2).any(dim=2).float().mean().item() if w.shape[1] % 2 == 0 \
        else (codes != plain).float().mean().item()
    return codes * sv, changed


def measure(w: torch.Tensor, x: torch.Tensor, per_channel: bool) -> dict:
    ref = x @ w.T
    out = {}
    for grid in ("int8", "int8-mse", "pair", "pair-mse", "int7"):
        wq, changed = quantized(w, grid, per_channel)
        out[grid] = {"w_rel": ((wq - w).norm() / w.norm()).item(),
                     "out_rel_mse": ((x @ wq.T - ref).square().sum() / ref.square().sum()).item(),
                     "pairs_changed": changed}
    return out


def summarize(title: str, rows: list[dict]) -> dict:
    grids = rows[0].keys()
    agg = {g: {k: sum(r[g][k] for r in rows) / len(rows) for k in rows[0][g]} for g in grids}
    print(f"{title} (mean over {len(rows)} layers)")
    print(f"  {'grid':9s} {'rel weight err':>15s} {'rel output MSE':>15s} {'x int8':>8s} {'pairs changed':>14s}")
    sys.stdout.flush()
    base = agg["int8"]["out_rel_mse"]
    for g, a in agg.items():
        print(f"  {g:9s} {a['w_rel']:15.3e} {a['out_rel_mse']:15.3e} {a['out_rel_mse'] / base:8.2f} "
              f"{100 * a['pairs_changed']:13.2f}%")
    return agg


def main():
    torch.manual_seed(0)
    results = {}
    for per_channel in (True, False):
        tag = "per_channel" if per_channel else "per_tensor"
        lin = [torch.nn.Linear(1024, 1024).weight.detach() for _ in range(2)]
        gauss = [torch.randn(1024, 1024) * 0.02 for _ in range(2)]
        x = torch.randn(256, 1024)
        results[f"random_uniform/{tag}"] = summarize(f"random Linear 1024x1024, nn.Linear init, {tag}",
                                                     [measure(w, x, per_channel) for w in lin])
        results[f"random_gauss/{tag}"] = summarize(f"random Linear 1024x1024, Gaussian, {tag}",
                                                   [measure(w, x, per_channel) for w in gauss])
    from amct_pytorch.demo.model import load_model
    model, _ = load_model()
    linears = [(n, m.weight.detach()) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    linears = [(n, w) for n, w in linears if n.startswith("encoder.")]
    assert len(linears) == 36, len(linears)
    for per_channel in (True, False):
        tag = "per_channel" if per_channel else "per_tensor"
        rows = []
        for _, w in linears:
            x = torch.randn(256, w.shape[1])
            rows.append(measure(w, x, per_channel))
        results[f"minilm36/{tag}"] = summarize(f"all-MiniLM-L6-v2, 36 encoder Linears, {tag}", rows)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
