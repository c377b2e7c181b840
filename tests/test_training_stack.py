"""Issue 11: the QAT modules in the real training stack (autocast, torch.compile, activation
checkpointing, meta-device init, silent-skip warning, checkpoint migration).

docs/training_stack.md lists each integration with the test that shows it.
"""
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import amct_pytorch
from amct_pytorch import (CalibrationSkippedWarning, Conv2dQAT, ConvTranspose2dQAT, LinearQAT, calibrating,
                          migrate_optimizer_state, strict_inputs)

ULQ = {"retrain_weight_config": {"weights_retrain_algo": "ulq_quantize", "channel_wise": True}}


def mlp(config=None, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(LinearQAT(8, 16, config=config), nn.ReLU(), LinearQAT(16, 16, config=config), nn.ReLU(),
                         LinearQAT(16, 4, config=config)).train()


def float_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).train()


def qstate(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "acts_" in k or "wts_" in k
            or "calib" in k}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# ---- autocast ---------------------------------------------------------------------------
@pytest.mark.parametrize("config", [None, ULQ], ids=["arq", "ulq"])
@pytest.mark.parametrize("backward_inside", [True, False])
def test_autocast_bf16_training_behaves_like_the_float_layers(config, backward_inside):
    """Every layer accepts the autocast dtype and returns it (as nn.Linear does); parameters,
    clip bounds, scales and their gradients stay float32; the quantized math is the float32 one."""
    q, ref, flt = mlp(config), mlp(config), float_mlp()
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(6, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = q(x)
            assert y.dtype == flt(x).dtype == torch.bfloat16
            loss = y.float().pow(2).mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        # float32 reference: the same math, each layer's output rounded to bf16 as under autocast
        h = x
        for layer in ref:
            h = layer(h)
            if isinstance(layer, LinearQAT):
                h = h.bfloat16().float()
        h.pow(2).mean().backward()
        for (n, p), (_, p_ref) in zip(q.named_parameters(), ref.named_parameters()):
            assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32), n
            if p_ref.grad is None:
                assert p.grad is None, n
            else:
                torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=n)
        torch.testing.assert_close(y.float(), h, rtol=0, atol=0)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for p, p_ref in zip(q.parameters(), ref.parameters()):
                p_ref.copy_(p)
                p_ref.grad = None
    assert all(m.is_calibrated for m in q if isinstance(m, LinearQAT))


@pytest.mark.parametrize("cls,shape", [(Conv2dQAT, (2, 3, 6, 6)), (ConvTranspose2dQAT, (2, 3, 5, 5))])
def test_autocast_conv_family(cls, shape):
    torch.manual_seed(0)
    m = cls(3, 4, 3).train()
    x = torch.randn(shape, requires_grad=True)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
    assert m.is_calibrated and m.acts_clip_max.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_autocast_float32_dtype_and_disabled_autocast_return_float32():
    m = mlp()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert m(torch.randn(2, 8)).dtype == torch.float32


# ---- torch.compile -----------------------------------------------------------------------
@pytest.mark.parametrize("config", [None, ULQ], ids=["arq", "ulq"])
def test_calibrated_training_step_and_eval_compile_fullgraph_without_graph_breaks(config):
    torch._dynamo.reset()
    eager = mlp(config)
    eager(torch.randn(6, 8)).sum().backward()  # batch_num 1: calibrated
    eager.zero_grad()
    comp = copy.deepcopy(eager)
    compiled = torch.compile(comp, fullgraph=True)  # raises on any graph break or host sync
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(comp.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(6, 8)
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        ye.pow(2).sum().backward()
        yc.pow(2).sum().backward()
        # the ULQ sums run in another order in the compiled graph: float-rounding differences only
        assert_same(grads(comp), grads(eager), exact=False)
        opt_e.step(), opt_c.step(), opt_e.zero_grad(), opt_c.zero_grad()
        assert_same(qstate(comp), qstate(eager), exact=False)
    eager.eval(), comp.eval()
    x = torch.randn(6, 8)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    for train in (True, False):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(comp.train(train))(x)
        assert explained.graph_break_count == 0, explained.break_reasons


def test_non_fullgraph_compile_during_calibration_still_calibrates():
    torch._dynamo.reset()
    eager, comp = mlp({"retrain_data_config": {"batch_num": 2}}), mlp({"retrain_data_config": {"batch_num": 2}})
    compiled = torch.compile(comp)
    for _ in range(3):
        x = torch.randn(6, 8)
        eager(x).sum().backward()
        compiled(x).sum().backward()
    assert all(m.is_calibrated for m in comp if isinstance(m, LinearQAT))
    assert_same(qstate(comp), qstate(eager), exact=False)


def test_strict_mode_restores_the_finiteness_check_after_calibration():
    m = mlp()
    m(torch.randn(6, 8))
    x = torch.randn(6, 8)
    x[0, 0] = float("nan")
    assert torch.isnan(m(x)[0]).all()  # propagates, as in nn.Linear
    with strict_inputs(), pytest.raises(ValueError, match="NaN or infinite"):
        m(x)
    amct_pytorch.set_strict_inputs(True)
    try:
        assert amct_pytorch.strict_inputs_enabled()
        with pytest.raises(ValueError, match="NaN or infinite"):
            m(x)
    finally:
        amct_pytorch.set_strict_inputs(False)
    with pytest.raises(TypeError):
        amct_pytorch.set_strict_inputs(1)


# ---- activation checkpointing -----------------------------------------------------------------
def _segmented(model, x, how):
    if how == "none":
        return model(x)
    h = checkpoint(model[:3], x, use_reentrant=(how == "reentrant"))
    return checkpoint(model[3:], h, use_reentrant=(how == "reentrant"))


@pytest.mark.parametrize("how", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("config", [{"retrain_data_config": {"batch_num": 1}},
                                    {"retrain_data_config": {"batch_num": 2, "ifmr_search": "histogram"}},
                                    dict(ULQ, retrain_data_config={"batch_num": 3})], ids=["b1", "b2_hist", "b3_ulq"])
def test_checkpointing_calibrates_once_per_batch_and_matches_the_plain_run(how, config):
    plain, ckpt = mlp(config), mlp(config)
    opt_p = torch.optim.Adam(plain.parameters(), lr=1e-2)
    opt_c = torch.optim.Adam(ckpt.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationSkippedWarning)  # not in reentrant's no-grad first pass
        for step in range(5):
            x = torch.randn(6, 8, requires_grad=True)
            yp, yc = _segmented(plain, x, "none"), _segmented(ckpt, x, how)
            assert torch.equal(yp, yc)
            yp.pow(2).sum().backward()
            yc.pow(2).sum().backward()
            assert_same(grads(ckpt), grads(plain))
            assert_same(qstate(ckpt), qstate(plain))
            batches = [int(m.calib_batches) for m in ckpt if isinstance(m, LinearQAT)]
            assert batches == [min(step + 1, config["retrain_data_config"]["batch_num"])] * 3
            opt_p.step(), opt_c.step(), opt_p.zero_grad(), opt_c.zero_grad()
    assert all(m.is_calibrated for m in ckpt if isinstance(m, LinearQAT))


# ---- meta device ---------------------------------------------------------------------------
@pytest.mark.parametrize("config", [None, ULQ, {"retrain_data_config": {"batch_num": 2, "ifmr_search": "histogram"}},
                                    {"retrain_data_config": {"clip_max": 3.0, "clip_min": -1.0}}],
                         ids=["arq", "ulq", "hist", "fixed_clip"])
@pytest.mark.parametrize("cls", ["linear", "conv2d"])
def test_meta_init_to_empty_reset_parameters_gives_a_fresh_module(config, cls):
    def build(device):
        if cls == "linear":
            return LinearQAT(8, 4, device=device, config=config)
        return Conv2dQAT(3, 4, 3, device=device, config=config)

    x = torch.randn(2, 8) if cls == "linear" else torch.randn(2, 3, 5, 5)
    torch.manual_seed(0)
    fresh = build(None).train()
    meta = build("meta")
    meta.to_empty(device="cpu")
    with torch.no_grad():  # uninitialised memory, as to_empty leaves it
        for t in list(meta.parameters()) + list(meta.buffers()):
            t.copy_(torch.full_like(t, 7) if t.dtype != torch.bool else torch.ones_like(t))
    torch.manual_seed(0)
    meta.reset_parameters()
    meta.train()
    assert_same(dict(meta.state_dict()), dict(fresh.state_dict()))
    assert meta.is_calibrated == fresh.is_calibrated
    for _ in range(2):
        ya, yb = fresh(x), meta(x)
        assert torch.equal(ya, yb)
        ya.sum().backward(), yb.sum().backward()
    assert_same(dict(meta.state_dict()), dict(fresh.state_dict()))


def test_reset_parameters_after_calibration_uncalibrates():
    m = mlp(ULQ)
    m(torch.randn(6, 8)).sum().backward()
    assert m[0].is_calibrated and bool(m[0].wts_scale_ready)
    m[0].reset_parameters()
    assert not m[0].is_calibrated and not bool(m[0].wts_scale_ready) and int(m[0].calib_batches) == 0


# ---- the silent-skip warning -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "no_grad", "inference_mode"])
def test_forward_that_could_calibrate_but_does_not_warns_once_per_module(mode):
    m = mlp()
    m.train(mode != "eval")
    ctx = {"eval": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with pytest.warns(CalibrationSkippedWarning, match=r"amct_pytorch\.calibrat") as record, ctx():
        m(torch.randn(2, 8))
        m(torch.randn(2, 8))
    assert len([w for w in record if w.category is CalibrationSkippedWarning]) == 3  # one per layer


def test_no_warning_when_calibrating_calibrated_or_exporting(tmp_path):
    m = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationSkippedWarning)
        with calibrating(), torch.no_grad():
            m.eval()(torch.randn(2, 8))
        m.eval()(torch.randn(2, 8))  # calibrated now
        fresh = mlp().eval()
        torch.jit.trace(fresh, torch.randn(2, 8), check_trace=False)


# ---- checkpoints of earlier releases ---------------------------------------------------------
def test_release_checkpoint_with_0d_clip_bounds_and_its_adam_state_load():
    m = mlp()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(2):
        m(torch.randn(6, 8)).pow(2).sum().backward()
        opt.step(), opt.zero_grad()
    # what the previous release saved: 0-d clip bounds, 0-d Adam moments for them
    sd = {k: (v.reshape(()) if "clip" in k else v) for k, v in m.state_dict().items()}
    osd = copy.deepcopy(opt.state_dict())
    for pid, st in osd["state"].items():
        if st["exp_avg"].numel() == 1 and st["exp_avg"].dim() == 1:
            st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].reshape(()), st["exp_avg_sq"].reshape(())
    buf = io.BytesIO()
    torch.save({"model": sd, "opt": osd}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    new = mlp(seed=1)
    new.load_state_dict(saved["model"])
    assert new[0].acts_clip_max.shape == (1,) and torch.equal(new[0].acts_clip_max, m[0].acts_clip_max)
    new_opt = torch.optim.Adam(new.parameters(), lr=1e-2)
    new_opt.load_state_dict(saved["opt"])
    assert migrate_optimizer_state(new_opt) == 12  # 3 layers x 2 bounds x (exp_avg, exp_avg_sq)
    x = torch.randn(6, 8)
    for model, o in ((m, opt), (new, new_opt)):
        model(x).pow(2).sum().backward()
        o.step()
    assert_same(qstate(new), qstate(m))
