"""FSDP2 (fully_shard on each QAT layer and on the root), 2 ranks over gloo on 127.0.0.1.

Calibration is pooled over the ranks (as under DDP); the clip bounds and the ULQ weight
scale written inside a forward reach the shards; after training every rank holds the same
(gathered) parameters and buffers; torch.distributed.checkpoint save/load resumes exactly.
"""
import os

import pytest
import torch
import torch.nn as nn


from gloo_ranks import run_ranks
from amct_pytorch import LinearQAT, calibrating

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) not available", allow_module_level=True)

IN, HID, OUT = 12, 8, 4
LOCAL_ROWS = (3, 5)
CONFIGS = {
    "exact_arq": {"retrain_data_config": {"batch_num": 2}},
    "hist_ulq": {"retrain_data_config": {"batch_num": 2, "ifmr_search": "histogram"},
                 "retrain_weight_config": {"weights_retrain_algo": "ulq_quantize", "channel_wise": True}},
}


def _model(config):
    torch.manual_seed(0)
    return nn.Sequential(LinearQAT(IN, HID, config=config), nn.ReLU(), LinearQAT(HID, OUT, config=config)).train()


def _shard(model):
    from torch.distributed.fsdp import fully_shard
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def _batches(n):
    gen = torch.Generator().manual_seed(1)
    rows = sum(LOCAL_ROWS)
    scale = torch.cat([torch.full((k, 1), 1.0 + 3 * r) for r, k in enumerate(LOCAL_ROWS)])
    return [(torch.randn(rows, IN, generator=gen) * scale, torch.randn(rows, OUT, generator=gen)) for _ in range(n)]


def _local(t, rank, world):
    if world == 1:
        return t
    start = sum(LOCAL_ROWS[:rank])
    return t[start:start + LOCAL_ROWS[rank]]


def _full_state(model):
    out = {}
    for k, v in model.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = v.detach().clone()
    return out


def _step(model, opt, x, target, rank, world):
    err = (model(_local(x, rank, world)) - _local(target, rank, world)).pow(2).sum()
    (err * world / target.numel()).backward()  # FSDP averages: the gradient of the global mean
    opt.step()
    opt.zero_grad()


def run(name, rank, world, ckpt_dir=None):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    config = CONFIGS[name]
    model = _model(config)
    if world > 1:
        _shard(model)
    batches = _batches(6)
    record = {}
    with calibrating(), torch.no_grad():  # calibration pooled over ranks
        for x, _ in batches[:2]:
            model(_local(x, rank, world))
    record["calibrated"] = _full_state(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    record["steps"] = []
    for x, t in batches[2:4]:
        _step(model, opt, x, t, rank, world)
        record["steps"].append(_full_state(model))
    if ckpt_dir is not None:  # save, resume into a fresh sharded model and optimizer, go on in both
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
        resumed = _shard(_model(config) if world > 1 else _model(config))
        ropt = torch.optim.Adam(resumed.parameters(), lr=1e-2)
        rmsd, rosd = get_state_dict(resumed, ropt)
        state = {"model": rmsd, "optim": rosd}
        dcp.load(state, checkpoint_id=ckpt_dir)
        set_state_dict(resumed, ropt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        record["resumed_loaded"] = _full_state(resumed)
        for x, t in batches[4:]:
            _step(model, opt, x, t, rank, world)
            _step(resumed, ropt, x, t, rank, world)
        record["continued"], record["resumed"] = _full_state(model), _full_state(resumed)
        record["resumed_calibrated"] = all(m.is_calibrated for m in resumed if isinstance(m, LinearQAT))
    return record


def _all_configs(rank, world, out_dir):
    return {name: run(name, rank, world, os.path.join(out_dir, f"ckpt_{name}")) for name in CONFIGS}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    return run_ranks(_all_configs, out, str(out))


def _same(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}: {a[k]} vs {b[k]}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_identical_through_calibration_training_and_dcp_resume(two_ranks, name):
    r0, r1 = two_ranks[0][name], two_ranks[1][name]
    _same(r0["calibrated"], r1["calibrated"], "calibrated")
    for i, (a, b) in enumerate(zip(r0["steps"], r1["steps"])):
        _same(a, b, f"step {i}")
    assert float(r0["calibrated"]["0.acts_clip_max"]) > 0  # the in-forward write reached the shard
    assert not torch.equal(r0["calibrated"]["0.acts_clip_max"], r0["steps"][-1]["0.acts_clip_max"])  # learned
    if "ulq" in name:  # the ULQ scale was initialised from ARQ (not left at 1) and then learned
        assert not torch.equal(r0["calibrated"]["0.wts_scales"], torch.ones_like(r0["calibrated"]["0.wts_scales"]))
        assert not torch.equal(r0["calibrated"]["0.wts_scales"], r0["steps"][-1]["0.wts_scales"])
    _same(r0["resumed_loaded"], r0["steps"][-1], "loaded from DCP")
    _same(r0["resumed"], r0["continued"], "resumed vs continued")
    _same(r1["resumed"], r1["continued"], "resumed vs continued (rank 1)")
    assert r0["resumed_calibrated"] and r1["resumed_calibrated"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pooled_calibration_and_training_match_one_process(two_ranks, name):
    single = run(name, 0, 1)
    double = two_ranks[0][name]
    for k in single["calibrated"]:
        if "clip" in k:
            torch.testing.assert_close(double["calibrated"][k], single["calibrated"][k], rtol=1e-6, atol=0)
    for a, b in zip(double["steps"], single["steps"]):
        for k in b:
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6, msg=k)
