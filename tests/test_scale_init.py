"""retrain_weight_config.scale_init (extension): the first value of a learnable (ULQ) weight scale,
ARQ's max-abs step (default, the spec) or the MSE-optimal clipped step."""
import io

import pytest
import torch
import torch.nn as nn

from amct_pytorch import EmbeddingQAT, LinearQAT, parse_config
from amct_pytorch.functional import (MSE_RATIOS, arq_scale, fake_quant_weight, initial_weight_scale, int_range,
                                     mse_scale, quantize_weight, rows_layout)

W = "retrain_weight_config"


def _cfg(init="mse", group=32, bits="INT4", channel_wise=True, algo="ulq_quantize"):
    w = {"dst_type": bits, "channel_wise": channel_wise, "weights_retrain_algo": algo, "scale_init": init}
    if group is not None:
        w["group_size"] = group
    return {W: w}


def _per_scale_error(w, scale, bits, layout):
    wq = fake_quant_weight(w, scale, bits, layout)
    err = (wq - w).square()
    if layout is None:
        return err.sum().reshape(1)
    return err.reshape(layout.view).sum(dim=layout.reduce).reshape(-1)


def _weights(kind, shape=(48, 128)):
    g = torch.Generator().manual_seed(1)
    if kind == "normal":
        return torch.randn(shape, generator=g) * 0.05
    # heavy tails: Student-t with 2 degrees of freedom, and a few planted outliers
    normal = torch.randn(shape, generator=g)
    chi2 = torch.randn((2, *shape), generator=g).square().sum(0)
    w = normal / (chi2 / 2).sqrt() * 0.02
    w.view(-1)[torch.randperm(w.numel(), generator=g)[:20]] *= 25
    return w


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("granularity", ["group", "channel", "tensor"])
def test_mse_scale_error_never_exceeds_arq(kind, bits, granularity):
    w = _weights(kind)
    if granularity == "group":
        layout = LinearQAT(128, 48, config=_cfg(group=32)).weight_layout()
    elif granularity == "channel":
        layout = rows_layout(w.shape)
    else:
        layout = None
    channel_wise = layout is not None
    arq = arq_scale(w, bits, channel_wise, layout)
    mse = mse_scale(w, bits, channel_wise, layout)
    assert mse.shape == arq.shape
    err_arq = _per_scale_error(w, arq, bits, layout)
    err_mse = _per_scale_error(w, mse, bits, layout)
    assert (err_mse <= err_arq).all()  # per scale, not only in total
    if bits == 4:  # INT4: clipping pays (less where one planted outlier dominates a group's error)
        assert err_mse.sum() < (0.9 if kind == "normal" else 1.0) * err_arq.sum()


def test_mse_scale_is_a_ratio_of_arq_on_the_exact_grid():
    w = _weights("heavy")
    layout = rows_layout(w.shape)
    arq = arq_scale(w, 4, True, layout)
    mse = mse_scale(w, 4, True, layout)
    ratio = mse / arq
    allowed = torch.tensor(MSE_RATIOS)
    assert ((ratio[:, None] - allowed[None]).abs() < 1e-6).any(dim=1).all()
    assert (mse <= arq).all() and (mse >= 0.5 * arq * (1 - 1e-6)).all()
    wq = fake_quant_weight(w, mse, 4, layout)
    codes = quantize_weight(w, mse, 4, layout)  # the integers export writes
    qmin, qmax = int_range(4)
    assert codes.min() >= qmin and codes.max() <= qmax
    assert torch.equal(codes.float() * mse[:, None], wq)  # every value exactly on its grid


def test_mse_scale_all_zero_rows_and_arq_default():
    w = torch.zeros(3, 32)
    w[1] = torch.linspace(-1, 1, 32)
    mse = mse_scale(w, 4, True)
    assert torch.equal(mse[[0, 2]], torch.ones(2))  # ARQ's convention for an all-zero channel
    assert torch.equal(initial_weight_scale(w, 4, True), arq_scale(w, 4, True))


def test_linear_ulq_starts_from_the_mse_scale_and_round_trips():
    torch.manual_seed(0)
    m = LinearQAT(128, 48, config=_cfg()).train()
    with torch.no_grad():
        m.weight.copy_(_weights("heavy"))
    want = mse_scale(m.weight, 4, True, m.weight_layout())
    assert torch.equal(m.weight_qparams(), want)  # before the first forward too
    x = torch.randn(6, 128)
    m(x).sum().backward()  # calibration: stores the initial scale
    assert bool(m.wts_scale_ready)
    assert torch.equal(m.wts_scales.detach(), want)
    with torch.no_grad():
        m.wts_scales.mul_(1.01)  # as after a training step
    m.eval()
    y = m(x)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    fresh = LinearQAT(128, 48, config=_cfg())
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    fresh.eval()
    assert torch.equal(fresh.wts_scales, m.wts_scales)
    assert torch.equal(fresh(x), y)  # the learned scale, not a new initialisation


def test_arq_init_is_unchanged_by_the_extension():
    torch.manual_seed(0)
    a = LinearQAT(64, 8, config=_cfg("arq", group=16)).train()
    b = LinearQAT(64, 8, config={W: {k: v for k, v in _cfg(group=16)[W].items() if k != "scale_init"}}).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 64)
    a(x), b(x)
    assert torch.equal(a.wts_scales, arq_scale(a.weight, 4, True, a.weight_layout()))
    assert torch.equal(a.wts_scales, b.wts_scales)


def test_mse_init_lowers_the_linear_output_error():
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    out = {}
    for init in ("arq", "mse"):
        m = LinearQAT(128, 48, config=_cfg(init)).train()
        with torch.no_grad():
            m.weight.copy_(_weights("normal"))
            m.bias.zero_()
        m(x)
        m.eval()
        out[init] = (m(x) - nn.functional.linear(x, m.weight)).square().mean()
    assert out["mse"] < out["arq"]


def test_embedding_ulq_mse_init():
    e = EmbeddingQAT(20, 32, config=_cfg(group=None, bits="INT8")).train()
    e(torch.arange(20))
    assert torch.equal(e.wts_scales.detach(), mse_scale(e.weight, 8, True, rows_layout(e.weight.shape)))


def test_config_scale_init():
    cfg = parse_config(_cfg())
    assert cfg.retrain_weight_config.scale_init == "mse"
    assert parse_config(cfg.to_dict()) == cfg
    assert parse_config({}).retrain_weight_config.scale_init == "arq"
    assert "scale_init" not in parse_config({}).to_dict()[W]  # AMCT's keys only by default
    assert parse_config(_cfg("arq")) == parse_config({W: {k: v for k, v in _cfg()[W].items() if k != "scale_init"}})
    with pytest.raises(ValueError, match=r"retrain_weight_config.scale_init: got 'minmax'; allowed values: arq, mse"):
        parse_config(_cfg("minmax"))
    with pytest.raises(TypeError, match=r"retrain_weight_config.scale_init: expected one of"):
        parse_config(_cfg(None))
    with pytest.raises(ValueError, match=r"scale_init='mse': only a learnable \(ULQ\) weight scale"):
        parse_config(_cfg(algo="arq_retrain"))
    with pytest.raises(ValueError, match="Did you mean 'scale_init'"):
        parse_config({W: {"scale_int": "mse"}})
