"""The opt-in torch.compile kernels give the eager numerics (slow: compiles once, ~10-30 s)."""
import copy

import pytest
import torch

from amct_pytorch import LinearQAT, calibrating, qat_function

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
    for k in grads0:  # the ULQ / LSQ sums may be summed in another order
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-5, atol=1e-6, msg=k)


def test_flag_is_checked_and_unchanged_by_bad_input():
    before = qat_function.compiled_kernels_enabled()
    with pytest.raises(TypeError, match="enabled"):
        qat_function.use_compiled_kernels("yes")
    assert qat_function.compiled_kernels_enabled() is before
