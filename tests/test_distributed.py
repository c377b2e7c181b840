"""Multi-process training: 2 ranks (gloo, loopback only) with DistributedDataParallel.

One spawn runs every scenario; the parent compares the ranks with each other and with a
single-process run over the same global data.
"""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from amct_pytorch import LinearQAT, calibrating

IN, HID, OUT = 12, 8, 4
LOCAL_ROWS = (3, 5)  # ranks hold different local batch sizes
STEPS = 4
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


def run_scenario(name, rank, world, device="cpu"):
    """Calibrate and train; return the quantization state after calibration and after every step."""
    config, how = SCENARIOS[name]
    model = _model(config).to(device).train()
    batches = _batches(device)
    batch_num = config["retrain_data_config"]["batch_num"]
    record = {"steps": []}
    if how == "before_wrap":
        with calibrating(), torch.no_grad():
            for x, _ in batches[:batch_num]:
                model(_local(x, rank, world))
        record["calibrated"] = _quant_state(model)
    net = DDP(model, find_unused_parameters=(how == "in_loop")) if world > 1 else model
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
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
    return record


def _worker(rank, world, port, out_dir, device):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        records = {name: run_scenario(name, rank, world, device) for name in SCENARIOS}
        torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs: {a[k]} vs {b[k]}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    device = os.environ.get("AMCT_TEST_DDP_DEVICE", "cpu")  # gloo also carries CUDA tensors
    mp.spawn(_worker, args=(2, _free_port(), str(out), device), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_hold_identical_bounds_and_scales_through_training(two_ranks, name):
    r0, r1 = two_ranks[0][name], two_ranks[1][name]
    _assert_same(r0["calibrated"], r1["calibrated"], "after calibration")
    for step, (s0, s1) in enumerate(zip(r0["steps"], r1["steps"])):
        _assert_same(s0, s1, f"after step {step}")
    # the bounds really were learned (else equality through training would prove nothing)
    first, last = r0["calibrated"], r0["steps"][-1]
    assert not torch.equal(first["0.acts_clip_max"], last["0.acts_clip_max"])
    if "ulq" in name:
        assert not torch.equal(first["0.wts_scales"], last["0.wts_scales"])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_one_process_and_two_processes_give_the_same_bounds(two_ranks, name):
    single = run_scenario(name, 0, 1)
    double = two_ranks[0][name]
    bounds = [k for k in single["calibrated"] if "clip" in k]
    # calibrating in the loop, the weights move between calibration batches by gradients that
    # agree only up to float rounding: then only layer 0 is sure to see bit-identical input
    exact = bounds if SCENARIOS[name][1] == "before_wrap" else [k for k in bounds if k.startswith("0.")]
    for k in bounds:
        a, b = double["calibrated"][k], single["calibrated"][k]
        if k in exact:
            assert torch.equal(a, b), f"{k}: 2 processes {a} vs 1 process {b}"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    # training: DDP's averaged gradient is the global-mean gradient up to float rounding
    for s1, s2 in zip(single["steps"], double["steps"]):
        for k in s1:
            torch.testing.assert_close(s2[k].float(), s1[k].float(), rtol=1e-4, atol=1e-6)
    # rank 0's rows alone give other bounds: the ranks really pooled their data
    config = SCENARIOS[name][0]
    alone = _model(config).train()
    with calibrating(), torch.no_grad():
        for x, _ in _batches("cpu")[:config["retrain_data_config"]["batch_num"]]:
            alone(_local(x, 0, 2))
    assert not torch.equal(alone[0].acts_clip_max.detach(), double["calibrated"]["0.acts_clip_max"])
