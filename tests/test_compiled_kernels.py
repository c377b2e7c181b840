"""The opt-in torch.compile kernels give the eager numerics (slow: compiles once, ~10-30 s)."""
import copy

import pytest
import torch

from amct_pytorch import LinearQAT, calibrating, qat_function
from amct_pytorch.functional import fake_quant_weight, int_range
from float_bounds import assert_within, sum_tolerance

pytestmark = pytest.mark.slow


def _step(m, x, g, compiled):
    qat_function.use_compiled_kernels(compiled)
    try:
        m.zero_grad(set_to_none=True)
        x.grad = None
        y = m(x)
        y.backward(g)
    finally:
        qat_function.use_compiled_kernels(False)
    grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("weights", [{"channel_wise": True}, {"dst_type": "INT4", "weights_retrain_algo": "ulq_quantize"}])
def test_compiled_step_matches_eager(weights):
    torch.manual_seed(0)
    m = LinearQAT(48, 24, config={"retrain_weight_config": weights}).train()
    x = (torch.randn(3, 5, 48) * 2).requires_grad_()
    g = torch.randn(3, 5, 24)
    with torch.no_grad(), calibrating():
        m(x)
    twin = copy.deepcopy(m)
    y0, gx0, grads0 = _step(m, x, g, compiled=False)
    y1, gx1, grads1 = _step(twin, x, g, compiled=True)
    assert torch.equal(y0, y1)  # identical fake-quantized operands, identical matmul
    assert torch.equal(gx0, gx1)
    assert torch.equal(grads0["weight"], grads1["weight"]) and torch.equal(grads0["bias"], grads1["bias"])
    # the ULQ / LSQ gradients are sums over every element, added in another order: equal
    # within the rounding bound of those sums (n * eps32 * sum of the terms' magnitudes)
    terms = _summands(m, x, g, grads0["weight"])
    assert set(grads0) == {"weight", "bias"} | set(terms)
    for k, t in terms.items():
        tol = torch.tensor([sum_tolerance(row) for row in t]) if k == "wts_scales" else sum_tolerance(t)
        assert_within(grads1[k].reshape(-1), grads0[k].reshape(-1), tol, k)


def _summands(m, x, g, grad_w):
    """The terms whose sums are the clip-bound (and ULQ weight-scale) gradients (spec section 4)."""
    qmin, qmax = int_range(m.config.retrain_data_config.num_bits)
    w_bits = m.config.retrain_weight_config.num_bits
    scale, offset = m.act_qparams()
    w, w_scale = m.weight.detach(), m.weight_qparams()
    gx = g.reshape(-1, g.shape[-1]) @ fake_quant_weight(w, w_scale, w_bits)
    xd = x.detach().reshape(gx.shape)
    up, dn = xd > scale * (qmax - offset), xd < scale * (qmin - offset)
    v = torch.where(up, m.acts_clip_max.detach(), torch.where(dn, m.acts_clip_min.detach(), xd)) / scale
    e = (torch.round(v) - v) / (qmax - qmin)
    terms = {"acts_clip_max": gx * (e + up), "acts_clip_min": gx * (dn.float() - e)}
    if m.config.retrain_weight_config.learnable_scale:  # LSQ: grad_ŵ * dŵ/ds / sqrt(n * qmax), one sum per scale
        wq_min, wq_max = int_range(w_bits)
        vw = w / (w_scale.reshape(-1, 1) if w_scale.numel() > 1 else w_scale)
        dv = torch.where((vw >= wq_min) & (vw <= wq_max), torch.round(vw) - vw, vw.clamp(wq_min, wq_max))
        per_scale = w.numel() // w_scale.numel()
        terms["wts_scales"] = (grad_w * dv).reshape(w_scale.numel(), -1) / (per_scale * wq_max) ** 0.5
    return terms


def test_flag_is_checked_and_unchanged_by_bad_input():
    before = qat_function.compiled_kernels_enabled()
    with pytest.raises(TypeError, match="enabled"):
        qat_function.use_compiled_kernels("yes")
    assert qat_function.compiled_kernels_enabled() is before
