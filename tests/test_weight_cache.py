"""The eval-mode ŵ cache never serves a stale weight and never travels with the module."""
import copy
import io
import pickle

import pytest
import torch

from amct_pytorch import LinearQAT
from amct_pytorch.functional import arq_scale, fake_quant_weight

CLIPS = {"retrain_data_config": {"clip_max": 2.0, "clip_min": -2.0}}


def _fresh_eval_output(m, x):
    """Eval output computed with the cache emptied first."""
    m.clear_weight_cache()
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("algo", ["arq_retrain", "ulq_quantize"])
def test_cache_follows_every_kind_of_weight_change(algo):
    torch.manual_seed(0)
    m = LinearQAT(16, 8, config={**CLIPS, "retrain_weight_config": {"weights_retrain_algo": algo}}).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        first = m(x)
        assert torch.equal(m(x), first)  # served from the cache
        m.weight.mul_(3.0)  # in-place under no_grad bumps the version counter
        assert torch.equal(m(x), _fresh_eval_output(m, x))
        assert not torch.equal(m(x), first)
    m.weight = torch.nn.Parameter(torch.randn(8, 16))  # a new Parameter
    with torch.no_grad():
        assert torch.equal(m(x), _fresh_eval_output(m, x))
    m.load_state_dict({k: v * 2 if k == "weight" else v for k, v in m.state_dict().items()})
    with torch.no_grad():
        assert torch.equal(m(x), _fresh_eval_output(m, x))
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(x).square().sum().backward()
    opt.step()  # training step changes the weight (and the ULQ scale)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), _fresh_eval_output(m, x))


def test_cached_weight_equals_fake_quant_of_current_weight():
    m = LinearQAT(16, 8, config=CLIPS).eval()
    with torch.no_grad():
        m(torch.randn(2, 16))
        m.weight.add_(0.25)
        m(torch.randn(2, 16))
    scale, wq = m._wq_cache.lookup((m.weight,))
    assert torch.equal(wq, fake_quant_weight(m.weight.detach(), arq_scale(m.weight, 8, False), 8))


def test_data_edits_need_an_explicit_clear():
    m = LinearQAT(16, 8, config=CLIPS).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        m(x)
    m.weight.data.mul_(2.0)  # bypasses the version counter (documented)
    m.clear_weight_cache()
    with torch.no_grad():
        wq = fake_quant_weight(m.weight, arq_scale(m.weight, 8, False), 8)
        expected = torch.nn.functional.linear(_manual_xq(m, x), wq, m.bias)
        assert torch.equal(m(x), expected)


def _manual_xq(m, x):
    scale, offset = m.act_qparams()
    return (torch.round(x / scale + offset).clamp(-128, 127) - offset) * scale


def test_cache_is_not_state_and_is_not_copied_or_pickled():
    m = LinearQAT(16, 8, config=CLIPS).eval()
    keys = set(m.state_dict())
    with torch.no_grad():
        m(torch.randn(2, 16))
    assert m._wq_cache.wq is not None
    assert set(m.state_dict()) == keys
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert clone._wq_cache is None or clone._wq_cache.wq is None
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded._wq_cache is None or loaded._wq_cache.wq is None


def test_training_forward_does_not_use_or_keep_the_cache():
    m = LinearQAT(16, 8, config=CLIPS).eval()
    with torch.no_grad():
        m(torch.randn(2, 16))
    m.train()
    m(torch.randn(2, 16)).sum().backward()
    assert m._wq_cache is None
