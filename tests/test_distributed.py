"""Multi-process training: 2 ranks (gloo, loopback only) with DistributedDataParallel.

One spawn runs every scenario, with Adam and with plain SGD; the parent compares the ranks
with each other (bit for bit) and with a single-process run over the same global data.

What is guaranteed, and so what is asserted: the ranks hold the same bits (they apply one
all-reduced gradient); layer 0 calibrates on the same bits as the single process and agrees
exactly; deeper layers see matmuls over 3 or 5 rows instead of 8, which MKL may round
differently (its kernels depend on the shape, the CPU and the thread count), so they agree
within the float32 rounding bound of those matmuls; training agrees within rounding only with
an optimizer that is linear in the gradient (SGD). Adam divides each gradient element by its
own magnitude: a near-zero gradient whose sign flips with the summation order moves that
parameter by a full learning-rate step, so Adam runs are compared between ranks only.
"""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


from gloo_ranks import run_ranks
from amct_pytorch import LinearQAT, calibrating
from amct_pytorch.functional import fake_quant_weight

IN, HID, OUT = 12, 8, 4
LOCAL_ROWS = (3, 5)  # ranks hold different local batch sizes
STEPS = 4
LR = 1e-2
# "sgd" leaves ULQ's learnable weight scales where calibration put them: their LSQ gradient
# (round(v) - v inside the grid, qmax outside) jumps by 1 where a weight crosses a rounding tie
# and by ~qmax at the grid's edge, where ARQ's initial scale puts the largest weight exactly;
# rounding decides such crossings, and one moves the scale by ~LR * |grad| (measured: 2% of it
# after 4 steps with ATEN_CPU_CAPABILITY=default). So the scales' training is compared between
# ranks (bit for bit, with Adam) and not between a 1- and a 2-process run.
OPTIMIZERS = {
    "adam": lambda model: torch.optim.Adam(model.parameters(), lr=LR),
    "sgd": lambda model: torch.optim.SGD([p for n, p in model.named_parameters() if not n.endswith("wts_scales")],
                                         lr=LR),
}
EPS32 = torch.finfo(torch.float32).eps
SCENARIOS = {
    # calibrate on the bare model, then wrap: the default DDP settings suffice
    "exact_before_wrap": ({"retrain_data_config": {"batch_num": 3}}, "before_wrap"),
    "histogram_before_wrap": ({"retrain_data_config": {"batch_num": 3, "ifmr_search": "histogram"}}, "before_wrap"),
    # calibrate inside the DDP training loop: the clip bounds get no gradient in those steps
    "ulq_in_loop": ({"retrain_data_config": {"batch_num": 2},
                     "retrain_weight_config": {"weights_retrain_algo": "ulq_quantize", "channel_wise": True}},
                    "in_loop"),
}


def _model(config):
    torch.manual_seed(0)
    return nn.Sequential(LinearQAT(IN, HID, config=config), nn.ReLU(), LinearQAT(HID, OUT, config=config))


def _batches(device):
    gen = torch.Generator().manual_seed(1)
    rows = sum(LOCAL_ROWS)
    # each rank's rows get their own scale, so the ranks see different value ranges
    scale = torch.cat([torch.full((n, 1), 1.0 + 3 * r) for r, n in enumerate(LOCAL_ROWS)])
    return [((torch.randn(rows, IN, generator=gen) * scale).to(device), torch.randn(rows, OUT, generator=gen).to(device))
            for _ in range(STEPS)]


def _local(t, rank, world):
    if world == 1:
        return t
    start = sum(LOCAL_ROWS[:rank])
    return t[start:start + LOCAL_ROWS[rank]]


def _quant_state(model):
    return {f"{i}.{k}": v.detach().clone().cpu() for i, m in enumerate(model) if isinstance(m, LinearQAT)
            for k, v in m.state_dict().items() if k.startswith(("acts_", "wts_"))}


def _layer1_input_magnitude(model, record):
    """Hook on layer 0: while layer 1 calibrates, the largest element of |x| |ŵ|ᵀ + |b|, the
    magnitude of the dot products that make layer 1's calibration data (activations pass
    through unquantized during calibration, see test_linear_qat)."""
    first, second = model[0], model[2]

    def hook(module, args, out):
        if not second.is_calibrated:
            with torch.no_grad():
                wq = fake_quant_weight(module.weight, module.weight_qparams(), 8)
                mag = (args[0].abs() @ wq.abs().t() + module.bias.abs()).max()
            record["layer1_input_magnitude"] = max(record.get("layer1_input_magnitude", 0.0), float(mag))

    return first.register_forward_hook(hook)


def run_scenario(name, rank, world, device="cpu", optimizer="adam"):
    """Calibrate and train; return the quantization state after calibration and after every step."""
    config, how = SCENARIOS[name]
    model = _model(config).to(device).train()
    batches = _batches(device)
    batch_num = config["retrain_data_config"]["batch_num"]
    record = {"steps": []}
    hook = _layer1_input_magnitude(model, record)
    if how == "before_wrap":
        with calibrating(), torch.no_grad():
            for x, _ in batches[:batch_num]:
                model(_local(x, rank, world))
        record["calibrated"] = _quant_state(model)
    net = DDP(model, find_unused_parameters=(how == "in_loop")) if world > 1 else model
    opt = OPTIMIZERS[optimizer](net)
    for step, (x, target) in enumerate(batches):
        opt.zero_grad()
        # DDP averages the ranks' gradients: weight each rank's sum by world / global count,
        # so that the average is the gradient of the global mean even with unequal local batches
        err = F.mse_loss(net(_local(x, rank, world)), _local(target, rank, world), reduction="sum")
        (err * world / target.numel()).backward()
        opt.step()
        record["steps"].append(_quant_state(model))
        if how == "in_loop" and step + 1 == batch_num:
            record["calibrated"] = _quant_state(model)
    assert all(m.is_calibrated for m in model if isinstance(m, LinearQAT))
    hook.remove()
    return record


def _all_scenarios(rank, world, device):
    return {(name, opt): run_scenario(name, rank, world, device, opt) for name in SCENARIOS for opt in OPTIMIZERS}


def _assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs: {a[k]} vs {b[k]}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    device = os.environ.get("AMCT_TEST_DDP_DEVICE", "cpu")  # gloo also carries CUDA tensors
    return run_ranks(_all_scenarios, out, device)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_hold_identical_bounds_and_scales_through_training(two_ranks, name, optimizer):
    r0, r1 = two_ranks[0][name, optimizer], two_ranks[1][name, optimizer]
    _assert_same(r0["calibrated"], r1["calibrated"], "after calibration")
    for step, (s0, s1) in enumerate(zip(r0["steps"], r1["steps"])):
        _assert_same(s0, s1, f"after step {step}")
    # the bounds really were learned (else equality through training would prove nothing)
    first, last = r0["calibrated"], r0["steps"][-1]
    assert not torch.equal(first["0.acts_clip_max"], last["0.acts_clip_max"])
    if "ulq" in name and optimizer == "adam":
        assert not torch.equal(first["0.wts_scales"], last["0.wts_scales"])


# Training with SGD: each step moves a parameter by LR times its gradient, and the two runs'
# gradients differ by float rounding (sums over 3 + 5 rows and an all-reduce instead of 8
# rows: ~ terms * eps32 ~ 1e-5 of the gradients' magnitudes, which are <= ~1 here), so over
# STEPS steps of LR = 1e-2 the compared states (|value| >= 1e-3) move apart by ~1e-7 relative.
# Where rounding decides a discontinuity the difference stays below TRAIN_RTOL too: a value
# crossing a rounding tie changes a clip gradient by |dL/dx̂|/L (L = 255; ~4e-6 after the LR
# against clip bounds >= 1), a weight crossing one moves the outputs by one code step (~1e-3)
# and the gradients by ~1e-3 of themselves. Measured across kernel settings: <= 2e-7
# relative. The weights' training shows in ARQ's scales (max|w| / 127): they move >= 5e-3.
TRAIN_RTOL, TRAIN_ATOL = 1e-4, 1e-7


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_one_process_and_two_processes_give_the_same_bounds(two_ranks, name):
    single = run_scenario(name, 0, 1, optimizer="sgd")
    double = two_ranks[0][name, "sgd"]
    bounds = [k for k in single["calibrated"] if "clip" in k]
    # layer 0 calibrates on bit-identical input (x itself); layer 1 on relu(x ŵᵀ + b) over 3 or
    # 5 rows per rank, which may round differently from the 8-row matmul: each element by at
    # most IN + 1 roundings of its magnitude |x||ŵ|ᵀ + |b| (gamma_(IN+1), per run, so
    # (IN + 1) * eps32 between the runs). IFMR's clip is candidate * max|value| with
    # candidate * qmax / denom <= 1.3, plus a few roundings of its own. In the in-loop case
    # the weights also moved by one SGD step whose gradients differ by rounding: far smaller
    # (LR * gradient rounding), covered by the factor 2.
    for k in bounds:
        a, b = double["calibrated"][k], single["calibrated"][k]
        if k.startswith("0."):
            assert torch.equal(a, b), f"{k}: 2 processes {a} vs 1 process {b}"
        else:
            tol = 2 * 1.3 * (IN + 1) * EPS32 * single["layer1_input_magnitude"] + 4 * EPS32 * float(b.abs())
            assert float((a - b).abs()) <= tol, f"{k}: 2 processes {a} vs 1 process {b}, bound {tol:.3g}"
    if SCENARIOS[name][1] == "before_wrap":  # training moved the compared state far beyond the tolerance
        moved = (single["steps"][-1]["0.wts_scales"] - single["calibrated"]["0.wts_scales"]).abs()
        assert float((moved / single["calibrated"]["0.wts_scales"].abs()).max()) > 10 * TRAIN_RTOL
    for step, (s1, s2) in enumerate(zip(single["steps"], double["steps"])):
        for k in s1:
            if s1[k].is_floating_point():
                torch.testing.assert_close(s2[k], s1[k], rtol=TRAIN_RTOL, atol=TRAIN_ATOL,
                                           msg=lambda m: f"after step {step}, {k}: {m}")
            else:  # integer offsets: equal unless a value sits within rounding of a .5 tie
                assert torch.equal(s2[k], s1[k]), f"after step {step}, {k}: {s2[k]} vs {s1[k]}"
    # rank 0's rows alone give other bounds: the ranks really pooled their data
    config = SCENARIOS[name][0]
    alone = _model(config).train()
    with calibrating(), torch.no_grad():
        for x, _ in _batches("cpu")[:config["retrain_data_config"]["batch_num"]]:
            alone(_local(x, 0, 2))
    assert not torch.equal(alone[0].acts_clip_max.detach(), double["calibrated"]["0.acts_clip_max"])
