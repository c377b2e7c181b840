"""LinearQAT against nn.Linear and other QAT Linear layers, side by side in one process.

Every timing is a *paired ratio*: the layer and a plain nn.Linear of the same shape run
back to back (alternating which goes first) on the same input, and the median of the
per-pair ratios is reported after warm-up, so machine noise largely cancels out.

  train  one training step (zero grads, forward, backward) / the same for nn.Linear
  eval   eval-mode forward under no_grad / the same for nn.Linear
  calib  one calibration forward (batch_num=1, IFMR included) / a plain no_grad forward
  extra  peak memory of one training step minus nn.Linear's, in MB and in weight sizes
         (CPU: the torch profiler's allocation events, replayed in time order;
         CUDA: torch.cuda peak allocated bytes)

Peers (torchao, brevitas, nvidia-modelopt) are used when importable and skipped with the
reason otherwise; README.md '## Performance' has the install commands.

  python3 benchmarks/bench_linear.py --json benchmarks/results.json
  python3 benchmarks/bench_linear.py --quick            # seconds-long smoke run

'LinearQAT compiled' is the same layer with amct_pytorch.qat_function.use_compiled_kernels()
(torch.compile kernels; compile time is paid in warm-up, not timed).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from amct_pytorch import LinearQAT, calibrating

FULL_SHAPES = "512x1024x1024,1024x2048x2048,2048x4096x4096"


# ---- the layers --------------------------------------------------------------------
def _ours(i, o, bits, channel_wise, device, search="exact"):
    dst = f"INT{bits}"
    cfg = {"retrain_data_config": {"dst_type": dst, "ifmr_search": search},
           "retrain_weight_config": {"dst_type": dst, "channel_wise": channel_wise}}
    return LinearQAT(i, o, device=device, config=cfg)


def _ours_compiled(i, o, bits, channel_wise, device):
    from amct_pytorch import qat_function
    inner = _ours(i, o, bits, channel_wise, device)

    class Compiled(nn.Module):  # the kernel choice is taken at forward time and kept for backward
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            before = qat_function.compiled_kernels_enabled()
            qat_function.use_compiled_kernels(True)
            try:
                return self.inner(x)
            finally:
                qat_function.use_compiled_kernels(before)

    return Compiled()


def _torch_ao(i, o, bits, channel_wise, device):
    from torch.ao.quantization import FakeQuantize, QConfig
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if channel_wise:
        wq = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=qmin, quant_max=qmax,
                                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    else:
        wq = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=qmin, quant_max=qmax,
                                    dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    aq = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=(1 << bits) - 1,
                                dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    lin = nn.Linear(i, o, device=device)
    lin.qconfig = QConfig(activation=aq, weight=wq)
    act = aq().to(device)

    class AoLinear(nn.Module):  # torch.ao's QAT Linear fake-quantizes the weight; the input needs its own
        def __init__(self):
            super().__init__()
            self.act, self.lin = act, torch.ao.nn.qat.Linear.from_float(lin)

        def forward(self, x):
            return self.lin(self.act(x))

    return AoLinear().to(device)


def _torchao(i, o, bits, channel_wise, device):
    from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig
    dtype = {8: torch.int8, 4: torch.int4}[bits]
    act = IntxFakeQuantizeConfig(dtype, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(dtype, "per_channel" if channel_wise else "per_tensor", is_symmetric=True)
    return FakeQuantizedLinear(i, o, bias=True, activation_config=act, weight_config=weight, device=device)


def _brevitas(i, o, bits, channel_wise, device):
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Int8WeightPerTensorFloat
    weight = Int8WeightPerChannelFloat if channel_wise else Int8WeightPerTensorFloat
    return qnn.QuantLinear(i, o, bias=True, weight_quant=weight, weight_bit_width=bits,
                           input_quant=Int8ActPerTensorFloat, input_bit_width=bits, device=device)


def _modelopt(i, o, bits, channel_wise, device, x=None):
    import modelopt.torch.quantization as mtq
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"] = {"num_bits": bits, "axis": 0 if channel_wise else None}
        elif entry.get("quantizer_name") == "*input_quantizer":
            entry["cfg"] = {"num_bits": bits, "axis": None}
    model = nn.Sequential(nn.Linear(i, o, device=device))
    model = mtq.quantize(model, cfg, lambda m: m(x))
    return model


PEERS = {"torch.ao QAT": _torch_ao, "torchao": _torchao, "brevitas": _brevitas, "modelopt": _modelopt}


# ---- measuring ---------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _drop_grads(mod, x):
    def run():
        mod.zero_grad(set_to_none=True)
        x.grad = None
    return run


def _train_step(mod, x, g):
    drop = _drop_grads(mod, x)

    def run():
        drop()
        mod(x).backward(g)
    return run


def _eval_forward(mod, x):
    def run():
        with torch.no_grad():
            mod(x)
    return run


def paired_ratio(base, fn, reps, warmup, device):
    """(median over reps of time(fn)/time(base), median base time, min(fn)/min(base)).

    The pairs run back to back, order alternating. The ratio of minima is a second view that
    is less sensitive to other load on the machine (each side's least disturbed run)."""
    for _ in range(warmup):
        base()
        fn()
    ratios, base_times, fn_times = [], [], []
    for rep in range(reps):
        order = (base, fn) if rep % 2 == 0 else (fn, base)
        times = {}
        for f in order:
            _sync(device)
            start = time.perf_counter()
            f()
            _sync(device)
            times[f] = time.perf_counter() - start
        ratios.append(times[fn] / times[base])
        base_times.append(times[base])
        fn_times.append(times[fn])
    return statistics.median(ratios), statistics.median(base_times), min(fn_times) / min(base_times)


def peak_bytes(fn, device, prepare=None):
    """Peak bytes allocated by torch during fn() above what was allocated before it.

    prepare() runs first, unmeasured (e.g. dropping last step's gradients), so that frees
    of older blocks inside fn do not count against this step.
    """
    if prepare is not None:
        prepare()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []  # (time, pointer, +/- bytes) of every CPU allocation and free inside fn

    def walk(nodes):
        for node in nodes:
            fields = node.extra_fields if node.tag == _EventType.Allocation else None
            if fields is not None and fields.device.type == "cpu":
                events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
            walk(node.children)
    walk(prof.profiler.kineto_results.experimental_event_tree())
    live, level, peak = set(), 0, 0
    for _, ptr, size in sorted(events):
        if size > 0:
            live.add(ptr)
        elif ptr not in live:
            continue  # freeing a block from before fn (e.g. last step's grads): not this step's memory
        else:
            live.discard(ptr)
        level += size
        peak = max(peak, level)
    return peak


# ---- the runs ----------------------------------------------------------------------
def bench_training(shape, bits, channel_wise, impls, args, device, skipped):
    n, i, o = shape
    torch.manual_seed(0)
    x = torch.randn(n, i, device=device, requires_grad=True)
    g = torch.randn(n, o, device=device)
    base = nn.Linear(i, o, device=device)
    base_step, base_eval = _train_step(base, x, g), _eval_forward(base, x)
    base_step()  # first use allocates library workspaces (cuBLAS): keep them out of the peak
    base_peak = peak_bytes(base_step, device, _drop_grads(base, x))
    weight_mb = i * o * 4 / 2**20
    rows = []
    for name, build in impls.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = build(i, o, bits, channel_wise, device, x=x.detach()) if name == "modelopt" else build(
                    i, o, bits, channel_wise, device)
                mod.train()
                with torch.no_grad(), calibrating():
                    mod(x)  # calibrates ours; observers of the peers see one batch
                train, base_ms, train_min = paired_ratio(base_step, _train_step(mod, x, g), args.reps, args.warmup,
                                                         device)
                extra = (peak_bytes(_train_step(mod, x, g), device, _drop_grads(mod, x)) - base_peak) / 2**20
                mod.eval()
                evl, base_eval_ms, eval_min = paired_ratio(base_eval, _eval_forward(mod, x), args.reps, args.warmup,
                                                           device)
        except Exception as err:  # a peer that cannot run here is reported, not fatal
            if name.startswith("LinearQAT"):
                raise
            config = f"INT{bits} per-{'channel' if channel_wise else 'tensor'}"
            skipped.setdefault(f"{name} {config}", f"{type(err).__name__}: {err}".splitlines()[0][:160])
            continue
        rows.append(dict(shape=f"{n}x{i}->{o}", bits=bits, granularity="channel" if channel_wise else "tensor",
                         impl=name, train_ratio=round(train, 3), eval_ratio=round(evl, 3),
                         train_ratio_of_min=round(train_min, 3), eval_ratio_of_min=round(eval_min, 3),
                         extra_peak_mb=round(extra, 1), extra_peak_weights=round(extra / weight_mb, 2),
                         linear_train_ms=round(base_ms * 1e3, 2), linear_eval_ms=round(base_eval_ms * 1e3, 2)))
        print(_row_text(rows[-1]), flush=True)
    return rows


def bench_calibration(shape, args, device):
    n, i, o = shape
    torch.manual_seed(0)
    x = torch.randn(n, i, device=device)
    base = nn.Linear(i, o, device=device)
    rows = []
    for search in ("exact", "histogram"):
        mods = [_ours(i, o, 8, False, device, search) for _ in range(args.reps + args.warmup)]

        def calibrate():
            with torch.no_grad(), calibrating():
                mods.pop()(x)
        ratio, base_ms, ratio_min = paired_ratio(_eval_forward(base, x), calibrate, args.reps, args.warmup, device)
        rows.append(dict(shape=f"{n}x{i}->{o}", search=search, calib_ratio=round(ratio, 3),
                         calib_ratio_of_min=round(ratio_min, 3),
                         linear_forward_ms=round(base_ms * 1e3, 2), state_mb=_state_growth(shape, search, device)))
        print(f"calibration {rows[-1]}", flush=True)
    return rows


def _state_growth(shape, search, device, batches=(1, 4)):
    """Calibration state (MB) held after 1 and after 4 of batch_num=8 calibration batches."""
    n, i, o = shape
    m = LinearQAT(i, o, device=device, config={"retrain_data_config": {"batch_num": 8, "ifmr_search": search}})
    x = torch.randn(n, i, device=device)
    sizes = []
    for done in range(1, max(batches) + 1):
        with torch.no_grad(), calibrating():
            m(x)
        if done in batches:
            sizes.append(round(sum(b.numel() * b.element_size() for k, b in m.named_buffers() if "calib" in k) / 2**20, 2))
    return sizes


def check_input_cost(shape, args, device):
    """Time of LinearQAT's finite-input check relative to one nn.Linear training step."""
    n, i, o = shape
    x = torch.randn(n, i, device=device, requires_grad=True)
    m = LinearQAT(i, o, device=device)
    base = nn.Linear(i, o, device=device)
    ratio, _, _ = paired_ratio(_train_step(base, x, torch.randn(n, o, device=device)), lambda: m._check_input(x),
                               args.reps, args.warmup, device)
    return round(ratio, 4)


def _row_text(r):
    return (f"{r['shape']:>18} INT{r['bits']} {r['granularity']:>7}  {r['impl']:<18} train {r['train_ratio']:5.2f}x "
            f"(min {r['train_ratio_of_min']:.2f}x)  eval {r['eval_ratio']:5.2f}x (min {r['eval_ratio_of_min']:.2f}x)  extra peak {r['extra_peak_mb']:7.1f} MB ({r['extra_peak_weights']:.2f} W)  "
            f"[nn.Linear step {r['linear_train_ms']:.1f} ms]")


def markdown(result):
    lines = ["Ratios to nn.Linear: median of paired ratios (ratio of minima in brackets).", "",
             "| shape | bits | weights | layer | train step | eval fwd | extra peak MB (× weight) | nn.Linear step ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["training"]:
        lines.append(f"| {r['shape']} | INT{r['bits']} | per-{r['granularity']} | {r['impl']} | {r['train_ratio']:.2f}× "
                     f"({r['train_ratio_of_min']:.2f}×) | {r['eval_ratio']:.2f}× ({r['eval_ratio_of_min']:.2f}×) | "
                     f"{r['extra_peak_mb']:.1f} ({r['extra_peak_weights']:.2f}) | {r['linear_train_ms']:.1f} |")
    lines += ["", "| shape | IFMR search | calibration / plain forward | calibration state MB after 1, 4 batches |",
              "|---|---|---|---|"]
    for r in result["calibration"]:
        lines.append(f"| {r['shape']} | {r['search']} | {r['calib_ratio']:.2f}× ({r['calib_ratio_of_min']:.2f}×) | "
                     f"{r['state_mb'][0]}, {r['state_mb'][1]} |")
    if result["check_input"]:
        lines += ["", "Input check (`_check_input`) / nn.Linear training step: " + ", ".join(
            f"{k}: {v:.3f}×" for k, v in result["check_input"].items())]
    if result["skipped"]:
        lines += ["", "Skipped peers: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items())]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=FULL_SHAPES, help="comma-separated NxINxOUT (batch x in -> out)")
    p.add_argument("--bits", default="8,4")
    p.add_argument("--granularity", default="tensor,channel")
    p.add_argument("--peers", default="all", help="'all', 'none' or a comma-separated subset of: " + ", ".join(PEERS))
    p.add_argument("--peer-bits", default="8", help="bit widths at which peers are timed (ours: all of --bits)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-compiled", action="store_true", help="skip 'LinearQAT compiled' (torch.compile kernels)")
    p.add_argument("--quick", action="store_true", help="tiny shape, 1 rep, no peers or compile: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.reps, args.warmup, args.peers, args.no_compiled = "64x128x96", 1, 1, "none", True
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        assert all(len(s) == 3 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        p.error(f"--shapes: expected comma-separated NxINxOUT with positive ints, got {args.shapes!r}")
    bits = [int(b) for b in args.bits.split(",")]
    peer_bits = [int(b) for b in args.peer_bits.split(",")]
    if not set(bits + peer_bits) <= {4, 8}:
        p.error(f"--bits/--peer-bits: allowed values are 4 and 8, got {args.bits!r} / {args.peer_bits!r}")
    grans = args.granularity.split(",")
    if not set(grans) <= {"tensor", "channel"}:
        p.error(f"--granularity: allowed values are 'tensor' and 'channel', got {args.granularity!r}")
    wanted = list(PEERS) if args.peers == "all" else [] if args.peers == "none" else args.peers.split(",")
    unknown = set(wanted) - set(PEERS)
    if unknown:
        p.error(f"--peers: unknown {sorted(unknown)}; allowed: all, none, {', '.join(PEERS)}")

    skipped, peers = {}, {}
    for name in wanted:
        module = {"torch.ao QAT": "torch.ao.nn.qat", "torchao": "torchao.quantization.qat", "brevitas": "brevitas.nn",
                  "modelopt": "modelopt.torch.quantization"}[name]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                __import__(module)
            peers[name] = PEERS[name]
        except Exception as err:  # ImportError and the odd broken install alike
            skipped[name] = f"cannot import {module}: {type(err).__name__}: {err}".splitlines()[0][:160]
            print(f"skipping {name}: {skipped[name]}", flush=True)

    result = dict(torch=torch.__version__, python=platform.python_version(), device=str(device),
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                  threads=args.threads, reps=args.reps, warmup=args.warmup, command=" ".join(sys.argv),
                  training=[], calibration=[], check_input={}, skipped=skipped)
    for shape in shapes:
        for b in bits:
            for gran in grans:
                impls = {"LinearQAT": _ours}
                if not args.no_compiled:
                    impls["LinearQAT compiled"] = _ours_compiled
                impls.update(peers if b in peer_bits else {})
                result["training"] += bench_training(shape, b, gran == "channel", impls, args, device, skipped)
        result["calibration"] += bench_calibration(shape, args, device)
        result["check_input"]["x".join(map(str, shape))] = check_input_cost(shape, args, device)
    print()
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
