"""LinearQAT behaviour: API, float master weights, learnable scales, state, variants."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amct_pytorch import LinearQAT
from amct_pytorch.functional import act_qparams, arq_scale, fake_quant_weight, int_range, quantize_weight
from amct_pytorch.nn.module.quantization.linear import LinearQAT as DeepLinearQAT
from float_bounds import assert_within, sum_tolerance

CLIPS = {"retrain_data_config": {"clip_max": 2.0, "clip_min": -2.0}}


def _calibrated(in_f=16, out_f=8, config=None, seed=0):
    torch.manual_seed(seed)
    m = LinearQAT(in_f, out_f, config=config).train()
    for _ in range(m.config.retrain_data_config.batch_num):
        m(torch.randn(32, in_f))
    assert m.is_calibrated
    return m


# ---- API ---------------------------------------------------------------------------
def test_import_paths_and_subclass():
    assert LinearQAT is DeepLinearQAT
    m = LinearQAT(4, 3)
    assert isinstance(m, nn.Linear)
    assert m.weight.shape == (3, 4) and m.bias.shape == (3,)


@pytest.mark.parametrize("bias, has_bias", [(True, True), (False, False), (0, False), ("yes", True), (None, False)])
def test_bias_truthiness(bias, has_bias):
    assert (LinearQAT(4, 3, bias=bias).bias is not None) == has_bias


@pytest.mark.parametrize("arg, value, error", [
    ("in_features", 0, ValueError), ("in_features", True, TypeError), ("in_features", 2.0, TypeError),
    ("out_features", -1, ValueError), ("out_features", "3", TypeError)])
def test_bad_features(arg, value, error):
    kw = {"in_features": 4, "out_features": 3, arg: value}
    with pytest.raises(error, match=arg):
        LinearQAT(**kw)


def test_dtype_and_device_arguments():
    assert LinearQAT(4, 3, dtype=torch.float32).weight.dtype == torch.float32
    with pytest.raises(TypeError, match="float32.*torch.float16"):
        LinearQAT(4, 3, dtype=torch.float16)
    for device in ("cpu", torch.device("cpu")):
        m = LinearQAT(4, 3, device=device)
        assert all(t.device.type == "cpu" for t in list(m.parameters()) + list(m.buffers()))
    with pytest.raises(ValueError, match="device"):
        LinearQAT(4, 3, device="not-a-device")


def test_from_float_shares_parameters_and_mode():
    lin = nn.Linear(6, 5).eval()
    m = LinearQAT.from_float(lin, {"retrain_weight_config": {"channel_wise": True}})
    assert m.weight is lin.weight and m.bias is lin.bias
    assert not m.training
    assert m.wts_scales.shape == (5,)
    lin_nb = nn.Linear(6, 5, bias=False)
    assert LinearQAT.from_float(lin_nb).bias is None
    with pytest.raises(TypeError, match="LinearQAT"):
        LinearQAT.from_float(m)
    with pytest.raises(TypeError, match="Conv1d"):
        LinearQAT.from_float(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="float32"):
        LinearQAT.from_float(nn.Linear(3, 2).half())


def test_to_float_returns_plain_linear_with_master_weights():
    m = _calibrated()
    lin = m.to_float()
    assert type(lin) is nn.Linear and lin.weight is m.weight
    x = torch.randn(3, 16)
    torch.testing.assert_close(lin(x), F.linear(x, m.weight, m.bias), rtol=0, atol=0)


def test_extra_repr_shows_config_and_status():
    m = LinearQAT(4, 3, config={"retrain_data_config": {"batch_num": 2}})
    assert "calibrating 0/2" in repr(m) and "arq_retrain" in repr(m) and "state updates" in repr(m)
    m(torch.randn(2, 4))
    assert "calibrating 1/2" in repr(m)
    m(torch.randn(2, 4))
    assert "calibrated" in repr(m)


# ---- numerics of the forward ----------------------------------------------------------
def test_forward_equals_manual_fake_quant():
    m = _calibrated()
    x = torch.randn(10, 16) * 3
    scale, offset = act_qparams(m.acts_clip_max.detach(), m.acts_clip_min.detach(), 8)
    xq = (torch.round(x / scale + offset).clamp(-128, 127) - offset) * scale
    wq = fake_quant_weight(m.weight.detach(), arq_scale(m.weight.detach(), 8, False), 8)
    torch.testing.assert_close(m(x), F.linear(xq, wq, m.bias), rtol=0, atol=1e-6)


def test_calibration_calls_pass_activations_through():
    m = LinearQAT(16, 8, config={"retrain_data_config": {"batch_num": 2}}).train()
    x = torch.randn(4, 16) * 5
    wq = fake_quant_weight(m.weight.detach(), arq_scale(m.weight.detach(), 8, False), 8)
    torch.testing.assert_close(m(x), F.linear(x, wq, m.bias), rtol=0, atol=1e-6)
    assert not m.is_calibrated and int(m.calib_batches) == 1


@pytest.mark.parametrize("bits", [8, 4])
def test_ulq_gradients_match_spec_formula(bits):
    dst = f"INT{bits}"
    m = _calibrated(config={"retrain_data_config": {"dst_type": dst}, "retrain_weight_config": {"dst_type": dst}})
    x = torch.randn(20, 16) * 2
    x.requires_grad_(True)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    # naive re-derivation of spec section 4
    qmin, qmax = int_range(bits)
    L = 2**bits - 1
    cmax, cmin = m.acts_clip_max.detach(), m.acts_clip_min.detach()
    scale, offset = act_qparams(cmax, cmin, bits)
    wq = fake_quant_weight(m.weight.detach(), arq_scale(m.weight.detach(), bits, False), bits)
    gx = g @ wq
    xd = x.detach()
    up = xd > scale * (qmax - offset)
    dn = xd < scale * (qmin - offset)
    xt = torch.where(up, cmax, torch.where(dn, cmin, xd)) / scale
    e = (torch.round(xt) - xt) / L
    # the module adds the same terms in another order (blocks, clipped elements factored out)
    for grad, terms in ((m.acts_clip_max.grad, gx * (e + up)), (m.acts_clip_min.grad, gx * (dn.float() - e))):
        assert_within(grad, terms.sum().reshape(1), sum_tolerance(terms), "clip gradient")
    assert torch.equal(x.grad, gx * ~(up | dn))  # the same matmul, masked
    assert up.any() or dn.any() or bits == 8


# ---- float master weights -----------------------------------------------------------------
def _regression_run(write_back: bool, steps=150):
    """SGD on a linear teacher; returns (initial, final) held-out loss and changed codes."""
    torch.manual_seed(0)
    teacher = torch.randn(8, 32) * 0.2
    xs = torch.randn(steps, 64, 32)
    x_eval = torch.randn(512, 32)
    m = LinearQAT(32, 8, bias=False, config={"retrain_data_config": {"clip_max": 4.0, "clip_min": -4.0}})
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    codes0 = quantize_weight(m.weight.detach(), arq_scale(m.weight.detach(), 8, False), 8)

    def eval_loss():
        with torch.no_grad():
            return F.mse_loss(m.eval()(x_eval), x_eval @ teacher.t()).item()

    start = eval_loss()
    m.train()
    for x in xs:
        if write_back:  # what the reference does: ŵ overwrites the float weight every forward
            with torch.no_grad():
                m.weight.copy_(fake_quant_weight(m.weight, arq_scale(m.weight, 8, False), 8))
        opt.zero_grad()
        F.mse_loss(m(x), x @ teacher.t()).backward()
        opt.step()
    codes = quantize_weight(m.weight.detach(), arq_scale(m.weight.detach(), 8, False), 8)
    return start, eval_loss(), (codes != codes0).sum().item()


def test_float_master_weights_learn_where_write_back_stalls():
    start, ours, changed_ours = _regression_run(write_back=False)
    _, ref, changed_ref = _regression_run(write_back=True)
    # write-back erases every sub-half-step update: its codes move only when max|w|
    # (hence the scale) shifts, and the loss does not fall at all
    assert ref > start * 0.99
    assert changed_ours > 2 * changed_ref
    assert ours < ref * 0.95 and ours < start * 0.95


def test_forward_never_writes_the_quantized_weight():
    m = _calibrated()
    before = m.weight.detach().clone()
    m(torch.randn(4, 16)).sum().backward()
    assert torch.equal(m.weight.detach(), before)


def test_ulq_weight_scale_learns():
    torch.manual_seed(0)
    m = LinearQAT(32, 8, config=CLIPS | {"retrain_weight_config": {"weights_retrain_algo": "ulq_quantize"}})
    x = torch.randn(64, 32)
    m(x)
    init = m.wts_scales.detach().clone()
    torch.testing.assert_close(init, arq_scale(m.weight.detach(), 8, False))
    assert isinstance(m.wts_scales, nn.Parameter) and m.wts_scales.requires_grad
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    target = torch.randn(64, 8)
    for _ in range(20):
        opt.zero_grad()
        F.mse_loss(m(x), target).backward()
        assert m.wts_scales.grad is not None and m.wts_scales.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(m.wts_scales.detach(), init)


def test_ulq_channel_wise_scale_learns_per_row():
    torch.manual_seed(0)
    cfg = CLIPS | {"retrain_weight_config": {"weights_retrain_algo": "ulq_quantize", "channel_wise": True}}
    m = LinearQAT(16, 4, config=cfg)
    m(torch.randn(8, 16)).pow(2).sum().backward()
    assert m.wts_scales.shape == (4,) and (m.wts_scales.grad != 0).all()


# ---- state ----------------------------------------------------------------------------
@pytest.mark.parametrize("search", ["exact", "histogram"])
def test_state_dict_round_trip_is_bit_identical_and_never_recalibrates(search):
    cfg = {"retrain_data_config": {"batch_num": 2, "ifmr_search": search}}
    m = _calibrated(config=cfg)
    m(torch.randn(32, 16))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    for key in ("weight", "bias", "acts_clip_max", "acts_clip_min", "acts_scale", "acts_offset",
                "wts_scales", "wts_offsets", "calib_done"):
        assert key in state
    fresh = LinearQAT(16, 8, config=cfg).train()
    fresh.load_state_dict(state)
    assert fresh.is_calibrated
    x = torch.randn(5, 16) * 10  # a very different batch: recalibration would move the clips
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    assert torch.equal(fresh.acts_clip_max.detach(), state["acts_clip_max"])
    assert int(fresh.calib_batches) == int(state["calib_batches"])


def test_state_dict_mid_calibration_resumes():
    cfg = {"retrain_data_config": {"batch_num": 3}}
    torch.manual_seed(0)
    xs = [torch.randn(8, 16) for _ in range(3)]
    ref = LinearQAT(16, 8, config=cfg)
    half = LinearQAT(16, 8, config=cfg)
    half.load_state_dict(ref.state_dict())
    for x in xs:
        ref(x)
    half(xs[0])
    resumed = LinearQAT(16, 8, config=cfg)
    resumed.load_state_dict(half.state_dict())
    resumed(xs[1])
    resumed(xs[2])
    assert resumed.is_calibrated
    assert torch.equal(resumed.acts_clip_max, ref.acts_clip_max)
    assert torch.equal(resumed.acts_clip_min, ref.acts_clip_min)


def test_offsets_are_integers_in_range():
    m = _calibrated(config={"retrain_data_config": {"fixed_min": True}})
    assert m.acts_offset.dtype == torch.int8 and int(m.acts_offset) == -128
    assert m.wts_offsets.dtype == torch.int8 and (m.wts_offsets == 0).all()


# ---- variants ---------------------------------------------------------------------------
def test_retrain_disabled_is_exactly_nn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    m = LinearQAT.from_float(lin, {"retrain_enable": False})
    x = torch.randn(4, 3, 16, requires_grad=True)
    y = m(x)
    y.sum().backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad = None
    lin.weight.grad = None
    y2 = F.linear(x, lin.weight, lin.bias)
    y2.sum().backward()
    assert torch.equal(y, y2) and torch.equal(gx, x.grad) and torch.equal(gw, lin.weight.grad)


@pytest.mark.parametrize("bits", [8, 4])
def test_channel_wise_weights_use_one_scale_per_row(bits):
    cfg = CLIPS | {"retrain_weight_config": {"channel_wise": True, "dst_type": f"INT{bits}"}}
    m = LinearQAT(16, 6, config=cfg)
    with torch.no_grad():
        m.weight[0] *= 100  # one large row must not coarsen the others
    m(torch.randn(4, 16))
    expected = arq_scale(m.weight.detach(), bits, True)
    assert m.wts_scales.shape == (6,)
    torch.testing.assert_close(m.wts_scales, expected, rtol=0, atol=0)
    codes = quantize_weight(m.weight.detach(), m.wts_scales, bits)
    qmin, qmax = int_range(bits)
    assert codes.min() >= qmin and codes.max() <= qmax
    assert (codes[1:].int().abs().amax(1) >= qmax).all()  # every row uses its full range


def test_int4_activations_use_sixteen_levels():
    m = _calibrated(config={"retrain_data_config": {"dst_type": "INT4"}, "retrain_weight_config": {"dst_type": "INT4"}})
    scale, offset = m.act_qparams()
    x = torch.linspace(-10, 10, 1000).reshape(-1, 1).expand(-1, 16).contiguous()
    codes = torch.round(x / scale + offset).clamp(-8, 7)
    assert codes.unique().numel() == 16
    assert torch.isfinite(m(x)).all()


def test_three_d_input_and_no_bias():
    m = LinearQAT(16, 8, bias=False)
    x = torch.randn(2, 5, 16)
    y = m(x)
    assert y.shape == (2, 5, 8)
    y.sum().backward()
    assert m.weight.grad.shape == (8, 16)
    # the same values flattened give the same result
    torch.testing.assert_close(m(x.reshape(10, 16)).reshape(2, 5, 8), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("x, error, match", [
    (torch.randn(4, 16).double(), TypeError, "float32"),
    (torch.randn(4, 15), ValueError, "in_features"),
    (torch.randn(0, 16), ValueError, "empty"),
    (torch.tensor([[float("nan")] * 16]), ValueError, "NaN"),
    (torch.tensor([[float("inf")] * 16]), ValueError, "infinite"),
    ([[1.0] * 16], TypeError, "Tensor"),
])
def test_bad_input_is_rejected_before_any_state_change(x, error, match):
    m = LinearQAT(16, 8, config={"retrain_data_config": {"batch_num": 2}})
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error, match=match):
        m(x)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_module_matches_cpu():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    cpu = LinearQAT.from_float(lin)
    gpu = LinearQAT.from_float(nn.Linear(64, 32).cuda())
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(16, 64)
    for _ in range(2):
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-5, atol=1e-5)
    assert all(t.device.type == "cuda" for t in gpu.state_dict().values())
