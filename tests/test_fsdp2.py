"""FSDP2 (fully_shard on each QAT layer and on the root), 2 ranks over gloo on 127.0.0.1.

Calibration is pooled over the ranks (as under DDP); the clip bounds and the ULQ weight
scale written inside a forward reach the shards; after training every rank holds the same
(gathered) parameters and buffers; torch.distributed.checkpoint save/load resumes exactly. Under a bf16 MixedPrecisionPolicy,
amct_pytorch.fsdp.fully_shard_qat keeps the QAT layers float32 (their outputs equal the
un-sharded float32 layer's bit for bit); a QAT layer sharded with the bf16 policy is refused.
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


EMB_CONFIG = {"retrain_weight_config": {"weights_retrain_algo": "ulq_quantize", "channel_wise": True}}
VOCAB = 10


def run_embedding(rank, world):
    """EmbeddingQAT with a learnable per-row scale (initialised from ARQ inside its first training
    forward) feeding a LinearQAT; two training steps on token ids."""
    from amct_pytorch import EmbeddingQAT
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(EmbeddingQAT(VOCAB, IN, config=EMB_CONFIG),
                          LinearQAT(IN, OUT, config={"retrain_data_config": {"batch_num": 1}})).train()
    if world > 1:
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (sum(LOCAL_ROWS), 3), generator=gen)
    target = torch.randn(sum(LOCAL_ROWS), 3, OUT, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with calibrating(), torch.no_grad():
        model(_local(ids, rank, world))
    states = []
    for _ in range(2):
        _step(model, opt, ids, target, rank, world)
        states.append(_full_state(model))
    return states


def _all_configs(rank, world, out_dir):
    out = {name: run(name, rank, world, os.path.join(out_dir, f"ckpt_{name}")) for name in CONFIGS}
    out["embedding"] = run_embedding(rank, world)
    return out


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


def test_embedding_qat_learnable_scale_initialised_in_forward_reaches_the_shards(two_ranks):
    single = run_embedding(0, 1)
    for r in (0, 1):
        for step, (a, b) in enumerate(zip(two_ranks[r]["embedding"], single)):
            assert a.keys() == b.keys()
            for k in b:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"rank {r} step {step}: {k}")
    scales = two_ranks[0]["embedding"][0]["0.wts_scales"]
    assert scales.max() < 0.5  # ARQ's max|row|/127 (then one small SGD step), not the placeholder 1.0
    _same(two_ranks[0]["embedding"][-1], two_ranks[1]["embedding"][-1], "embedding model")


# ---- MixedPrecisionPolicy(param_dtype=bf16): amct_pytorch.fsdp.fully_shard_qat ------------------
MP_CONFIG = CONFIGS["hist_ulq"]  # learnable ULQ weight scale: wts_scales is a parameter too
QAT_PARAMS = ("weight", "bias", "acts_clip_max", "acts_clip_min", "wts_scales")
QAT_NAMES = ("1", "3")


def _mp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(IN), LinearQAT(IN, HID, config=MP_CONFIG), nn.GELU(),
                         LinearQAT(HID, OUT, config=MP_CONFIG)).train()


def _param_kinds(module, recurse=True):
    return {n: (type(p).__name__, p.dtype) for n, p in module.named_parameters(recurse=recurse)}


def _layer_state(state, name):
    return {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}


def _reference_outputs(state, calls, train):
    """Each QAT layer un-sharded, float32, loaded with `state`, fed the bf16 inputs it saw under FSDP."""
    out = {}
    for name, (x, _) in calls.items():
        ref = LinearQAT(IN if name == "1" else HID, HID if name == "1" else OUT, config=MP_CONFIG)
        ref.load_state_dict(_layer_state(state, name))
        ref.train(train)
        with torch.set_grad_enabled(train):
            out[name] = ref(x).detach()
    return out


def run_bf16(rank, world):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from amct_pytorch.fsdp import fsdp_param, fully_shard_qat

    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = fully_shard_qat(_mp_model(), mp_policy=bf16)
    rec = {"sharded": _param_kinds(model)}
    seen, calls, capture = {}, {}, [False]

    def pre_hook(name):  # runs after FSDP's (prepended) pre-forward hook: the unsharded parameters
        def hook(mod, args):
            params = tuple(sorted(_param_kinds(mod, recurse=False).items()))
            seen.setdefault(name, set()).add((("input", args[0].dtype),) + params)
        return hook

    def post_hook(name):
        def hook(mod, args, output):
            seen.setdefault(name + ".out", set()).add(output.dtype)
            if capture[0] and name in QAT_NAMES:
                calls[name] = (args[0].detach().clone(), output.detach().clone())
        return hook

    for name, mod in model.named_children():
        mod.register_forward_pre_hook(pre_hook(name))
        mod.register_forward_hook(post_hook(name))
    batches = _batches(5)
    with calibrating(), torch.no_grad():
        for x, _ in batches[:2]:
            model(_local(x, rank, world))
    rec["calibrated"] = _full_state(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i, (x, t) in enumerate(batches[2:]):
        before = _full_state(model)
        capture[0] = i == 2  # the last step's forward: its inputs and outputs, and the state it ran with
        out = model(_local(x, rank, world))
        rec["model_out"] = out.dtype
        err = (out.float() - _local(t, rank, world)).pow(2).sum()
        (err * world / t.numel()).backward()
        opt.step()
        opt.zero_grad()
    capture[0] = False
    rec["train_calls"] = calls.copy()
    rec["train_ref"] = _reference_outputs(before, calls, train=True)
    rec["trained"] = _full_state(model)
    rec["sharded_after"] = _param_kinds(model)
    model.eval()
    capture[0] = True
    with torch.no_grad():
        model(torch.randn(4, IN, generator=torch.Generator().manual_seed(7)))
    capture[0] = False
    rec["eval_calls"] = calls.copy()
    rec["eval_ref"] = _reference_outputs(rec["trained"], calls, train=False)
    rec["seen"] = seen

    # the same model sharded the plain way, every QAT layer under the bf16 policy: refused
    direct = _mp_model()
    for name in QAT_NAMES:
        fully_shard(direct.get_submodule(name), mp_policy=bf16)
    fully_shard(direct, mp_policy=bf16)
    try:
        fully_shard_qat(direct, mp_policy=bf16)
    except ValueError as err:
        rec["already_sharded_error"] = str(err)
    try:
        with calibrating(), torch.no_grad():
            direct(_local(batches[0][0], rank, world))
    except TypeError as err:
        rec["direct_error"] = str(err)
    rec["direct_state"] = {
        name: {"calib_batches": int(layer.calib_batches), "wts_scale_ready": bool(layer.wts_scale_ready),
               "calib_hist_sum": float(layer.calib_hist.sum()),
               **{p: fsdp_param(layer, p).sharded_param.to_local().clone() for p in QAT_PARAMS}}
        for name, layer in ((n, direct.get_submodule(n)) for n in QAT_NAMES)}
    rec["direct_init"] = {name: {p: getattr(_mp_model().get_submodule(name), p).detach().clone() for p in QAT_PARAMS}
                          for name in QAT_NAMES}
    return rec


@pytest.fixture(scope="module")
def bf16_ranks(tmp_path_factory):
    return run_ranks(run_bf16, tmp_path_factory.mktemp("fsdp2_bf16"))


def _not_bf16(t):
    return not torch.equal(t.bfloat16().float(), t)


def test_fully_shard_qat_keeps_qat_layers_float32_under_a_bf16_policy(bf16_ranks):
    r0, r1 = bf16_ranks
    for rec in (r0, r1):
        for key in ("sharded", "sharded_after"):  # sharded (master) parameters: all float32 DTensors
            assert rec[key] and all(kind == ("DTensor", torch.float32) for kind in rec[key].values()), rec[key]
        seen = rec["seen"]
        # the root's bf16 policy applied: LayerNorm ran with bf16 parameters on a bf16 input
        assert seen["0"] == {(("input", torch.bfloat16), ("bias", ("Parameter", torch.bfloat16)),
                              ("weight", ("Parameter", torch.bfloat16)))}
        for name in QAT_NAMES:  # the QAT layers: float32 unsharded parameters, bf16 in and out
            assert seen[name] == {(("input", torch.bfloat16),)
                                  + tuple(sorted((p, ("Parameter", torch.float32)) for p in QAT_PARAMS))}
            assert seen[name + ".out"] == {torch.bfloat16}
        assert rec["model_out"] == torch.bfloat16
    # every rank holds the same clip bounds, scales and gathered weights
    _same(r0["calibrated"], r1["calibrated"], "calibrated")
    _same(r0["trained"], r1["trained"], "trained")
    for name in QAT_NAMES:
        for p in ("acts_clip_max", "acts_clip_min", "wts_scales"):
            key = f"{name}.{p}"
            if p != "acts_clip_min" or MP_CONFIG["retrain_data_config"].get("fixed_min") is not True:
                assert not torch.equal(r0["calibrated"][key], r0["trained"][key]), f"{key} was not learned"
            # learned in float32: a bf16 round trip would change them (probability 2**-16 per value otherwise)
            assert r0["trained"][key].dtype == torch.float32 and _not_bf16(r0["trained"][key]), key


@pytest.mark.parametrize("phase", ["train", "eval"])
def test_qat_layer_under_bf16_fsdp_equals_the_unsharded_float32_layer_bit_for_bit(bf16_ranks, phase):
    # the all-gather of float32 shards is exact, and the layer runs the same float32 ops on the same
    # bf16 input as the un-sharded layer with the same state: nothing in between may differ
    for rec in bf16_ranks:
        calls, ref = rec[f"{phase}_calls"], rec[f"{phase}_ref"]
        assert set(calls) == set(QAT_NAMES)
        for name, (x, y) in calls.items():
            assert x.dtype == y.dtype == ref[name].dtype == torch.bfloat16
            assert torch.equal(y, ref[name]), f"{phase} {name}: max diff {(y.float() - ref[name].float()).abs().max()}"


def test_qat_layer_sharded_directly_with_a_bf16_policy_is_refused_before_any_state_change(bf16_ranks):
    for rank, rec in enumerate(bf16_ranks):
        assert "fully_shard_qat" in rec["already_sharded_error"] and "already sharded" in rec["already_sharded_error"]
        msg = rec["direct_error"]
        assert msg.startswith("module: LinearQAT got torch.bfloat16 parameters from FSDP2"), msg
        assert "amct_pytorch.fsdp.fully_shard_qat(model, mp_policy=" in msg
        for name in QAT_NAMES:
            state, init = rec["direct_state"][name], rec["direct_init"][name]
            assert state["calib_batches"] == 0 and not state["wts_scale_ready"] and state["calib_hist_sum"] == 0
            for p in QAT_PARAMS:  # each rank's shard still holds its slice of the initial value
                chunks = torch.chunk(init[p], len(bf16_ranks), dim=0)
                expect = chunks[rank] if rank < len(chunks) else init[p][:0]
                assert state[p].dtype == torch.float32 and torch.equal(state[p], expect), (name, p)


def test_fully_shard_qat_argument_errors():
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from amct_pytorch.fsdp import fully_shard_qat, qat_mp_policy

    with pytest.raises(TypeError, match=r"mp_policy: expected a torch.distributed.fsdp.MixedPrecisionPolicy or "
                                        r"None, got 'bf16' \(str\)"):
        fully_shard_qat(_mp_model(), mp_policy="bf16")
    with pytest.raises(TypeError, match=r"shard_root: expected a bool, got 1"):
        fully_shard_qat(_mp_model(), shard_root=1)
    with pytest.raises(TypeError, match=r"model: expected a torch.nn.Module, got int"):
        fully_shard_qat(3)
    with pytest.raises(ValueError, match=r"model: has no QAT layer.*to_qat"):
        fully_shard_qat(nn.Sequential(nn.Linear(2, 2)))
    assert qat_mp_policy(MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float16)) == \
        MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, output_dtype=torch.float16,
                             cast_forward_inputs=False)
