"""Hostile inputs and configs: each works (finitely) or raises a clear error before any state changes.

The README's "Reliability" table lists the same cases.
"""
import pytest
import torch

import amct_pytorch

from amct_pytorch import Conv1dQAT, LinearQAT, calibrating, strict_inputs
from amct_pytorch.functional import EPS
from float_bounds import assert_within, sum_tolerance
from state_helpers import _assert_unchanged, _snapshot

F32_MAX = torch.finfo(torch.float32).max
NAN, INF = float("nan"), float("inf")




def _module(phase, search="exact", weights="arq_retrain"):
    torch.manual_seed(0)
    cfg = {"retrain_data_config": {"batch_num": 2, "ifmr_search": search},
           "retrain_weight_config": {"weights_retrain_algo": weights}}
    m = LinearQAT(16, 8, config=cfg).train()
    for _ in range({"fresh": 0, "mid_calibration": 1, "calibrated": 2, "eval": 2}[phase]):
        m(torch.randn(4, 16))
    return m.train(phase != "eval")


def _with(value, shape=(4, 16)):
    x = torch.randn(shape)
    x[1, 3] = value
    return x


BAD_INPUTS = {
    "nan": (_with(NAN), ValueError, "NaN or infinite"),
    "+inf": (_with(INF), ValueError, "NaN or infinite"),
    "-inf": (_with(-INF), ValueError, "NaN or infinite"),
    "float64": (torch.randn(4, 16, dtype=torch.float64), TypeError, "dtype torch.float32 .*got torch.float64"),
    "int64": (torch.ones(4, 16, dtype=torch.int64), TypeError, "got torch.int64"),
    "bool": (torch.ones(4, 16, dtype=torch.bool), TypeError, "got torch.bool"),
    "list": ([[0.0] * 16] * 4, TypeError, "expected a torch.Tensor, got list"),
    "last dim 15": (torch.randn(4, 15), ValueError, r"expected shape \(\.\.\., 16\)"),
    "last dim 17, 3-d": (torch.randn(2, 4, 17), ValueError, r"got \(2, 4, 17\)"),
    "0-d": (torch.tensor(1.0), ValueError, r"got \(\)"),
    "empty batch": (torch.randn(0, 16), ValueError, "empty batch"),
    "empty 3-d": (torch.randn(3, 0, 16), ValueError, "empty batch"),
    "meta device": (torch.randn(4, 16, device="meta"), ValueError, "on meta"),
}


@pytest.mark.parametrize("search", ["exact", "histogram"])
@pytest.mark.parametrize("phase", ["fresh", "mid_calibration", "calibrated", "eval"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_before_any_state_change(case, phase, search):
    x, error, match = BAD_INPUTS[case]
    m = _module(phase, search, "ulq_quantize")
    before = _snapshot(m)
    # after calibration NaN/inf are checked only in strict mode (see the next test)
    with strict_inputs(True), pytest.raises(error, match=match):
        m(x)
    _assert_unchanged(m, before)
    assert int(m.calib_batches) == {"fresh": 0, "mid_calibration": 1}.get(phase, 2)


@pytest.mark.parametrize("search", ["exact", "histogram"])
@pytest.mark.parametrize("phase", ["fresh", "mid_calibration"])
@pytest.mark.parametrize("case", ["nan", "+inf", "-inf"])
def test_non_finite_input_is_always_refused_while_calibrating(case, phase, search):
    x, error, match = BAD_INPUTS[case]
    for mode in ("train", "calibrating", "eval"):  # eval: the pass-through range check needs finite x too
        m = _module(phase, search, "ulq_quantize").train(mode != "eval")
        before = _snapshot(m)
        with strict_inputs(False), pytest.raises(error, match=match):
            if mode == "calibrating":
                with calibrating():
                    m(x)
            else:
                m(x)
        _assert_unchanged(m, before)


@pytest.mark.parametrize("phase", ["calibrated", "eval"])
@pytest.mark.parametrize("case", ["nan", "+inf", "-inf"])
def test_non_finite_input_after_calibration_propagates_as_in_nn_linear(case, phase):
    """No per-step host sync after calibration: NaN gives NaN outputs (as nn.Linear), +-inf is clipped
    onto the activation grid; the quantization state stays as it was (finite)."""
    x, _, _ = BAD_INPUTS[case]
    m = _module(phase, "exact", "ulq_quantize")
    before = _snapshot(m)
    y = m(x)
    rows_ok = torch.isfinite(x).all(dim=1)
    assert torch.isfinite(y[rows_ok]).all()
    if case == "nan":
        assert torch.isnan(y[1]).all()
    else:  # clipped to the grid's end
        assert torch.isfinite(y).all()
        assert torch.equal(y, m(x.clamp(-1e30, 1e30)))
    if phase == "calibrated":  # a training step's state updates (weight scale, act grid) are finite
        y.sum().backward()
    for k, v in m.state_dict().items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
    if phase == "eval":
        _assert_unchanged(m, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("phase", ["fresh", "calibrated", "eval"])
def test_low_precision_input_is_computed_in_float32_and_returned_in_its_dtype(dtype, phase):
    m = _module(phase)
    ref = _module(phase)
    x = torch.randn(4, 16).to(dtype)
    y = m(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref(x.float()).to(dtype), rtol=0, atol=0)
    assert m.weight.dtype == torch.float32 and m.acts_clip_max.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_to_a_disabled_layer_is_computed_in_float32_too(dtype):
    from amct_pytorch import disable_quantization
    torch.manual_seed(0)
    model = torch.nn.Sequential(LinearQAT(16, 8), torch.nn.ReLU(), Conv1dQAT(8, 4, 1))
    disable_quantization(model)
    x = torch.randn(3, 16).to(dtype)
    y = model[0](x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, torch.nn.functional.linear(x.float(), model[0].weight, model[0].bias).to(dtype),
                               rtol=0, atol=0)
    z = model[2](torch.randn(2, 8, 5).to(dtype))
    assert z.dtype == dtype


@pytest.mark.parametrize("search", ["exact", "histogram"])
@pytest.mark.parametrize("value", [0.0, 5.0, -5.0, 1e-30, 1e-40, -3e-7])
def test_constant_calibration_batch_gives_a_sane_finite_grid(value, search):
    torch.manual_seed(0)
    m = LinearQAT(16, 8, config={"retrain_data_config": {"ifmr_search": search}}).train()
    m(torch.full((4, 16), value))
    scale, offset = m.act_qparams()
    hi, lo = float(m.acts_clip_max.detach()), float(m.acts_clip_min.detach())
    assert torch.isfinite(scale) and scale >= EPS and -128 <= offset <= 127
    assert lo < 0 < hi  # a zero-width (degenerate) grid would be scale 1 at offset -128
    if abs(value) < 1e-5:  # too small to resolve: treated as all-zero data, a grid of about [-0.7, 0.7]
        assert 0.6 < hi < 1.4 and -1.4 < lo < -0.6
    else:  # the grid reaches the value, without being much wider than it
        assert max(hi, -lo) >= 0.99 * abs(value) and max(hi, -lo) <= 1.31 * abs(value)
    y = m(torch.randn(4, 16))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(m.acts_clip_max.grad) and torch.isfinite(m.acts_clip_min.grad)


def test_all_zero_batch_under_fixed_min_keeps_a_positive_upper_bound():
    m = LinearQAT(16, 8, config={"retrain_data_config": {"fixed_min": True}}).train()
    m(torch.zeros(4, 16))
    assert float(m.acts_clip_min.detach()) == 0.0 and float(m.acts_clip_max.detach()) > 0.5
    assert m.act_qparams()[0] > EPS


def _small_weights(m):
    with torch.no_grad():
        m.weight.mul_(1e-3)
        m.bias.zero_()
    return m


@pytest.mark.parametrize("value", [3e38, -3e38, F32_MAX])
def test_calibration_values_near_float32_limits_work_when_the_matmul_cannot_overflow(value):
    torch.manual_seed(0)
    m = _small_weights(LinearQAT(16, 8).train())
    y = m(_with(value))
    assert m.is_calibrated and torch.isfinite(y).all()
    hi, lo = float(m.acts_clip_max.detach()), float(m.acts_clip_min.detach())
    assert 0 < hi <= 1e38 and -1e38 <= lo < 0  # capped so that hi - lo stays finite
    scale, _ = m.act_qparams()
    assert torch.isfinite(scale) and torch.isfinite(m(torch.randn(4, 16))).all()


@pytest.mark.parametrize("search", ["exact", "histogram"])
@pytest.mark.parametrize("phase", ["fresh", "mid_calibration"])
def test_calibration_values_that_would_overflow_the_matmul_are_refused(search, phase):
    m = _module(phase, search)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="would overflow float32"):
        m(torch.full((4, 16), 3e38))
    _assert_unchanged(m, before)
    with pytest.raises(ValueError, match="would overflow float32"):
        m.eval()(torch.full((4, 16), 3e38))  # eval before calibration passes x through as well
    _assert_unchanged(m, before)


@pytest.mark.parametrize("phase", ["fresh", "mid_calibration"])
def test_histogram_calibration_beyond_its_range_is_refused(phase):
    m = _small_weights(_module(phase, "histogram"))
    before = _snapshot(m)
    with pytest.raises(ValueError, match="histogram IFMR's range.*ifmr_search='exact'"):
        m(_with(1e38))
    _assert_unchanged(m, before)


def test_histogram_calibration_below_its_range_limit_works():
    m = _small_weights(_module("fresh", "histogram"))
    m(_with(5e37))
    assert torch.isfinite(m.acts_clip_max.detach()) and float(m.calib_range) > 0


def test_histogram_range_can_grow_by_a_huge_factor_between_batches():
    m = _small_weights(_module("mid_calibration", "histogram"))  # range ~4 after one randn batch
    x = _with(5e37)
    m(x)
    assert m.is_calibrated and torch.isfinite(m.acts_clip_max.detach())
    assert float(m.acts_clip_max.detach()) >= 0.99 * 5e37 / 1.3  # the new extreme sets the grid


def test_hist_update_growth_beyond_the_bin_count_merges_everything_into_the_first_bins():
    from amct_pytorch.ifmr import HIST_BINS, empty_histogram, hist_update

    hist, rng = hist_update(empty_histogram(), torch.zeros(()), torch.randn(1000))
    hist, rng = hist_update(hist, rng, torch.tensor([5e37, -1.0]))  # grows by a factor of about 2**124
    assert float(rng) == 2.0**126 and float(hist[0].sum()) == 1002
    neg, pos = hist[0].reshape(2, HIST_BINS)
    assert float(neg[0] + pos[0]) == 1001 and float(pos[HIST_BINS // 2 :].sum()) == 1  # 5e37 >= R / 2


@pytest.mark.parametrize("search, step", [("exact", "ifmr_exact"), ("histogram", "ifmr_histogram"),
                                          ("histogram", "hist_update")])
def test_an_error_inside_a_calibration_step_changes_nothing(monkeypatch, search, step):
    """Statistics are computed first and stored last: whatever fails midway leaves no trace."""
    import amct_pytorch.nn.module.quantization.base as linear

    def broken(*args, **kwargs):
        raise RuntimeError("broken step")

    m = _module("mid_calibration", search)
    before = _snapshot(m)
    monkeypatch.setattr(linear, step, broken)
    with pytest.raises(RuntimeError, match="broken step"):
        m(torch.randn(4, 16))
    _assert_unchanged(m, before)
    assert not m.is_calibrated


@pytest.mark.parametrize("value", [3e38, -3e38, 1e37])
def test_values_near_float32_limits_after_calibration_are_clipped_finitely(value):
    m = _module("calibrated")
    x = _with(value)
    y = m(x)
    assert torch.isfinite(y).all()
    with torch.no_grad():
        m.eval()
        assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("value", [3e38, -3e38, F32_MAX])
def test_clip_gradients_stay_finite_for_values_near_float32_limits(value):
    # x/scale of such a value overflows to inf; a clipped element must still add exactly 0 to the e sum
    m = _module("calibrated")
    x = _with(value)
    m(x).sum().backward()
    grads = m.acts_clip_max.grad.clone(), m.acts_clip_min.grad.clone()
    assert torch.isfinite(grads[0]) and torch.isfinite(grads[1])
    # same gradients as with a merely large value that is clipped on the same side
    x[1, 3] = 1e3 if value > 0 else -1e3
    m.zero_grad()
    m(x).sum().backward()
    assert torch.equal(m.acts_clip_max.grad, grads[0]) and torch.equal(m.acts_clip_min.grad, grads[1])


@pytest.mark.parametrize("value", [3e38, -3e38])
def test_ulq_act_grads_eager_and_plain_agree_near_float32_limits(value):
    from amct_pytorch.functional import act_qparams, int_range, ulq_act_grads, ulq_act_grads_plain

    x, g = _with(value), torch.randn(4, 16)
    clip_max, clip_min = torch.tensor(2.0), torch.tensor(-1.5)
    scale, offset = act_qparams(clip_max, clip_min, 8)
    gx, gmax, gmin = ulq_act_grads(x, g, scale, offset, clip_max, clip_min, 8)
    plain_g = g.clone()
    pmax, pmin = ulq_act_grads_plain(x, plain_g, scale, offset, clip_max, clip_min, *int_range(8))
    assert torch.isfinite(gmax) and torch.isfinite(gmin) and gx[1, 3] == 0
    assert torch.equal(plain_g, gx)  # elementwise: the same bits
    # the bound gradients: the same terms g * (e + clipped) summed in another order
    qmin, qmax = int_range(8)
    clipped = (x > scale * (qmax - offset)) | (x < scale * (qmin - offset))
    terms = g * (0.5 / (qmax - qmin) + clipped.float())  # |e| <= 1 / (2L)
    for plain, eager in ((pmax, gmax), (pmin, gmin)):
        assert_within(plain, eager, sum_tolerance(terms, extra_roundings=4), "bound gradient")


@pytest.mark.parametrize("key, value, error, match", [
    ("clip_max", NAN, ValueError, "clip_max: expected a real number in"),
    ("clip_max", INF, ValueError, "clip_max: expected a real number in"),
    ("clip_min", -INF, ValueError, "clip_min: expected a real number in"),
    ("clip_min", NAN, ValueError, "clip_min: expected a real number in"),
    ("clip_max", 3e38, ValueError, r"clip_max: expected a real number in \(0, 1e\+38\]"),
    ("clip_min", -3e38, ValueError, r"clip_min: expected a real number in \[-1e\+38, 0\)"),
    ("clip_max", 10**400, ValueError, "clip_max: expected a real number in"),  # int beyond float range
    ("clip_max", "1.0", TypeError, "clip_max"),
    ("clip_max", torch.tensor(1.0), TypeError, "clip_max"),
])
def test_configs_with_non_finite_or_huge_clip_bounds_are_refused(key, value, error, match):
    with pytest.raises(error, match=match):
        LinearQAT(4, 2, config={"retrain_data_config": {key: value}})


def test_config_bounds_that_give_a_degenerate_grid_are_refused():
    with pytest.raises(ValueError, match="clip_max/clip_min.*degenerate"):
        LinearQAT(4, 2, config={"retrain_data_config": {"clip_max": 1e-6, "clip_min": -1e-6}})
    with pytest.raises(ValueError, match="clip_max/clip_min.*degenerate"):
        LinearQAT(4, 2, config={"retrain_data_config": {"clip_max": 1e-6, "fixed_min": True}})
    m = LinearQAT(4, 2, config={"retrain_data_config": {"clip_max": 1e38, "clip_min": -1e38}})
    scale, _ = m.act_qparams()
    assert torch.isfinite(scale) and torch.isfinite(m(torch.randn(3, 4))).all()


def test_a_failed_call_inside_calibrating_changes_nothing():
    m = _module("mid_calibration").eval()
    before = _snapshot(m)
    with calibrating(), pytest.raises(ValueError):
        m(_with(NAN))
    _assert_unchanged(m, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("search", ["exact", "histogram"])
@pytest.mark.parametrize("value", [0.0, 1e-30, 5.0, None])
def test_calibration_on_cuda_gives_the_cpu_grid(search, value):
    cfg = {"retrain_data_config": {"batch_num": 2, "ifmr_search": search}}
    torch.manual_seed(0)
    cpu = LinearQAT(16, 8, config=cfg).train()
    gpu = LinearQAT(16, 8, config=cfg, device="cuda").train()
    gpu.load_state_dict(cpu.state_dict())
    for i in range(2):
        x = torch.randn(64, 16) * (i + 1) if value is None else torch.full((64, 16), value)
        cpu(x), gpu(x.cuda())
    assert gpu.is_calibrated and gpu.acts_clip_max.device.type == "cuda"
    for name in ("acts_clip_max", "acts_clip_min", "acts_scale", "acts_offset"):
        torch.testing.assert_close(getattr(gpu, name).detach().cpu(), getattr(cpu, name).detach(), rtol=1e-6, atol=0)
    before = _snapshot(gpu)
    with amct_pytorch.strict_inputs(), pytest.raises(ValueError, match="NaN"):
        gpu(torch.full((4, 16), NAN, device="cuda"))
    _assert_unchanged(gpu, before)
    # calibrated, not strict: a non-finite input propagates as in nn.Linear, no host sync, no state change
    assert torch.isnan(gpu(torch.full((4, 16), NAN, device="cuda"))).all()
    _assert_unchanged(gpu, before)


@pytest.mark.parametrize("cast", ["double", "half", "bfloat16"])
def test_a_module_cast_to_another_dtype_is_refused_before_any_state_change(cast):
    m = getattr(_module("mid_calibration"), cast)()
    before = _snapshot(m)
    with pytest.raises(TypeError, match=r"module: LinearQAT supports only torch.float32.*\.float\(\)"):
        m(torch.randn(4, 16))
    _assert_unchanged(m, before)
    m.float()(torch.randn(4, 16))  # cast back, it calibrates on
    assert m.is_calibrated


def _ulq_pair(channel_wise):
    """A calibrated ULQ-weights module and a copy whose learnable scale is negated (every other row)."""
    import copy

    cfg = {"retrain_weight_config": {"weights_retrain_algo": "ulq_quantize", "channel_wise": channel_wise}}
    torch.manual_seed(0)
    pos = LinearQAT(16, 8, config=cfg).train()
    pos(torch.randn(32, 16))  # calibrates the activations and initialises the weight scale
    neg = copy.deepcopy(pos)
    flip = torch.ones_like(neg.wts_scales)
    flip[::2] = -1.0
    with torch.no_grad():
        neg.wts_scales.mul_(flip)
    return pos, neg, flip


@pytest.mark.parametrize("channel_wise", [False, True])
def test_negative_learnable_weight_scale_uses_the_grid_of_its_magnitude(channel_wise):
    from amct_pytorch.functional import fake_quant_act, fake_quant_weight

    pos, neg, flip = _ulq_pair(channel_wise)
    assert (neg.wts_scales < 0).any()
    x = torch.randn(32, 16)
    y_pos, y_neg = pos(x), neg(x)
    scale, offset = neg.act_qparams()
    grid = fake_quant_weight(neg.weight.detach(), neg.wts_scales.detach().abs(), 8)
    expected = torch.nn.functional.linear(fake_quant_act(x, scale, offset, 8), grid, neg.bias.detach())
    assert torch.equal(y_neg.detach(), expected) and torch.equal(y_neg, y_pos)
    y_pos.square().sum().backward()
    y_neg.square().sum().backward()
    assert torch.isfinite(neg.wts_scales.grad).all() and (neg.wts_scales.grad != 0).any()
    # d|s|/ds = sign(s): a negated scale gets the negated gradient
    assert torch.equal(neg.wts_scales.grad, pos.wts_scales.grad * flip)
    assert torch.equal(neg.weight.grad, pos.weight.grad)
    assert torch.equal(neg.weight_qparams(), neg.wts_scales.detach().abs())
    with torch.no_grad():  # eval reuses a cached grid: the same one
        assert torch.equal(neg.eval()(x), pos.eval()(x))


def test_a_zero_learnable_weight_scale_gives_a_finite_grid_that_can_grow_back():
    _, m, _ = _ulq_pair(False)
    with torch.no_grad():
        m.wts_scales.zero_()
    x = torch.randn(32, 16)
    y = m(x)
    assert torch.isfinite(y).all() and torch.equal(m.weight_qparams(), torch.tensor([EPS]))
    y.sum().backward()
    assert torch.isfinite(m.wts_scales.grad).all() and float(m.wts_scales.grad) != 0.0


def test_training_the_weight_scale_with_a_huge_learning_rate_keeps_a_positive_grid():
    _, m, _ = _ulq_pair(True)
    with torch.no_grad():
        m.wts_scales.abs_()
    opt = torch.optim.SGD([m.wts_scales], lr=1e3)
    x, target = torch.randn(32, 16), torch.randn(32, 8)
    went_negative = False
    for _ in range(10):
        opt.zero_grad()
        loss = (m(x) - target).square().mean()
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(m.wts_scales.grad).all()
        opt.step()
        went_negative |= bool((m.wts_scales < 0).any())
    assert went_negative  # the case under test did happen
    assert (m.weight_qparams() >= EPS).all()


def test_export_and_quant_record_use_the_magnitude_of_a_negative_weight_scale(tmp_path):
    from amct_pytorch import export_onnx, load_quant_record, save_quant_record
    from amct_pytorch.export import module_qparams

    pos, neg, _ = _ulq_pair(True)
    neg.eval()
    x = torch.randn(5, 16)
    assert torch.equal(module_qparams(neg).weight_scale, module_qparams(pos.eval()).weight_scale)
    export_onnx(neg, (x,), tmp_path / "neg.onnx", dynamo=False)  # raises if ONNX Runtime differs from eval
    record = save_quant_record(neg, tmp_path / "neg.json")
    assert record["layers"][""]["scale_w"] == neg.wts_scales.detach().abs().tolist()
    fresh = LinearQAT(16, 8, config={"retrain_weight_config": {"weights_retrain_algo": "ulq_quantize",
                                                               "channel_wise": True}}).eval()
    with torch.no_grad():
        fresh.weight.copy_(neg.weight)
        fresh.bias.copy_(neg.bias)
    load_quant_record(fresh, tmp_path / "neg.json")
    with torch.no_grad():
        assert torch.equal(fresh(x), neg(x))
