"""Conv2dQAT against nn.Conv2d and torch.ao's QAT Conv2d, side by side in one process.

The same paired-ratio method as bench_linear.py (whose measuring helpers this script uses):
each layer and a plain nn.Conv2d of the same shape run back to back on the same input, and
the median of the per-pair ratios is reported.

  train  one training step (zero grads, forward, backward) / nn.Conv2d's
  eval   eval-mode forward under no_grad / nn.Conv2d's
  extra  peak memory of one training step minus nn.Conv2d's, in MB and in weight sizes
  saved  bytes autograd saves for backward, in units of the input size (nn.Conv2d: x + w)

Peers: torch.ao.nn.qat.Conv2d (with an input FakeQuantize, as torch.ao's QAT flow inserts),
brevitas.nn.QuantConv2d when importable (skipped with the reason otherwise).

  python3 benchmarks/bench_conv.py --json benchmarks/results_conv_cpu.json
  python3 benchmarks/bench_conv.py --quick
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_linear import _drop_grads, _eval_forward, _train_step, paired_ratio, peak_bytes  # noqa: E402

from amct_pytorch import Conv2dQAT, calibrating  # noqa: E402

# name: (batch, in_channels, size, out_channels, kernel, groups)
SHAPES = {
    "resnet3x3 32x64x56x56->64": (32, 64, 56, 64, 3, 1),
    "depthwise3x3 32x128x56x56": (32, 128, 56, 128, 3, 128),
}
QUICK = {"tiny 2x8x12x12->8": (2, 8, 12, 8, 3, 1)}


def _float(c_in, c_out, k, groups, device):
    return nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, device=device)


def _ours(c_in, c_out, k, groups, channel_wise, device):
    return Conv2dQAT(c_in, c_out, k, padding=k // 2, groups=groups, device=device,
                     config={"retrain_weight_config": {"channel_wise": channel_wise}})


def _torch_ao(c_in, c_out, k, groups, channel_wise, device):
    from torch.ao.quantization import FakeQuantize, QConfig
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
    obs = MovingAveragePerChannelMinMaxObserver if channel_wise else MovingAverageMinMaxObserver
    scheme = torch.per_channel_symmetric if channel_wise else torch.per_tensor_symmetric
    wq = FakeQuantize.with_args(observer=obs, quant_min=-128, quant_max=127, dtype=torch.qint8, qscheme=scheme)
    aq = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    conv = _float(c_in, c_out, k, groups, device)
    conv.qconfig = QConfig(activation=aq, weight=wq)

    class AoConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.act, self.conv = aq().to(device), torch.ao.nn.qat.Conv2d.from_float(conv)

        def forward(self, x):
            return self.conv(self.act(x))

    return AoConv().to(device)


def _brevitas(c_in, c_out, k, groups, channel_wise, device):
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Int8WeightPerTensorFloat
    weight = Int8WeightPerChannelFloat if channel_wise else Int8WeightPerTensorFloat
    return qnn.QuantConv2d(c_in, c_out, k, padding=k // 2, groups=groups, weight_quant=weight,
                           input_quant=Int8ActPerTensorFloat, device=device)


IMPLS = {"Conv2dQAT": _ours, "torch.ao QAT": _torch_ao, "brevitas": _brevitas}


def saved_bytes(mod, x):
    """Bytes autograd keeps for backward after one forward (distinct storages counted once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    mod.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mod(x)
    del y
    return sum(seen.values())


def bench(name, shape, channel_wise, args, device, skipped):
    n, c_in, size, c_out, k, groups = shape
    torch.manual_seed(0)
    x = torch.randn(n, c_in, size, size, device=device, requires_grad=True)
    base = _float(c_in, c_out, k, groups, device)
    g = torch.randn_like(base(x))
    base_step, base_eval = _train_step(base, x, g), _eval_forward(base, x)
    base_step()
    base_peak = peak_bytes(base_step, device, _drop_grads(base, x))
    base_saved = saved_bytes(base, x)
    weight_mb = base.weight.numel() * 4 / 2**20
    rows = []
    for impl, build in IMPLS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = build(c_in, c_out, k, groups, channel_wise, device).train()
                with torch.no_grad(), calibrating():
                    mod(x)
                train, base_ms, train_min = paired_ratio(base_step, _train_step(mod, x, g), args.reps, args.warmup,
                                                         device)
                extra = (peak_bytes(_train_step(mod, x, g), device, _drop_grads(mod, x)) - base_peak) / 2**20
                saved = saved_bytes(mod, x)
                mod.eval()
                evl, base_eval_ms, _ = paired_ratio(base_eval, _eval_forward(mod, x), args.reps, args.warmup, device)
        except Exception as err:  # a peer that cannot run here is reported, not fatal
            if impl == "Conv2dQAT":
                raise
            skipped.setdefault(impl, f"{type(err).__name__}: {err}".splitlines()[0][:160])
            continue
        rows.append(dict(shape=name, granularity="channel" if channel_wise else "tensor", impl=impl,
                         train_ratio=round(train, 3), train_ratio_of_min=round(train_min, 3), eval_ratio=round(evl, 3),
                         extra_peak_mb=round(extra, 1), extra_peak_weights=round(extra / weight_mb, 2),
                         saved_vs_float=round(saved / base_saved, 3), conv_train_ms=round(base_ms * 1e3, 2),
                         conv_eval_ms=round(base_eval_ms * 1e3, 2)))
        r = rows[-1]
        print(f"| {r['shape']} | per-{r['granularity']} | {impl} | {r['train_ratio']:.2f}x | {r['eval_ratio']:.2f}x "
              f"| {r['extra_peak_mb']:.1f} MB | {r['saved_vs_float']:.2f} | {r['conv_train_ms']:.1f} ms |", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="tiny shape, 1 rep: a smoke run")
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--reps and --threads must be >= 1, --warmup >= 0")
    shapes = QUICK if args.quick else SHAPES
    if args.quick:
        args.reps, args.warmup = 1, 0
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print("| shape | weights | impl | train step vs nn.Conv2d | eval vs nn.Conv2d | extra peak | saved for "
          "backward vs nn.Conv2d | nn.Conv2d step |")
    print("|---|---|---|---|---|---|---|---|")
    skipped, rows = {}, []
    for name, shape in shapes.items():
        for channel_wise in (False, True):
            rows += bench(name, shape, channel_wise, args, device, skipped)
    for impl, why in skipped.items():
        print(f"skipped {impl}: {why}")
    result = {"torch": torch.__version__, "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "rows": rows, "skipped": skipped}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
