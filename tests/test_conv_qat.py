"""The conv family: Conv1d/2d/3dQAT and ConvTranspose1d/2d/3dQAT.

They share LinearQAT's quantizers (base.QATModuleMixin); these tests check what each conv adds
(its float op, its channel axis, its arguments) and that LinearQAT's guarantees hold for it.
"""
import copy
import io
import itertools
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_pytorch
from amct_pytorch import (Conv1dQAT, Conv2dQAT, Conv3dQAT, ConvTranspose1dQAT, ConvTranspose2dQAT, ConvTranspose3dQAT,
                          LinearQAT, calibrate, calibrating, deploy_view, qat_layers, to_float, to_qat)
from amct_pytorch.functional import act_qparams, fake_quant_act, fake_quant_weight, ulq_act_grads

from state_helpers import _assert_unchanged, _snapshot

EPS32 = torch.finfo(torch.float32).eps
CLASSES = {
    Conv1dQAT: (nn.Conv1d, 1), Conv2dQAT: (nn.Conv2d, 2), Conv3dQAT: (nn.Conv3d, 3),
    ConvTranspose1dQAT: (nn.ConvTranspose1d, 1), ConvTranspose2dQAT: (nn.ConvTranspose2d, 2),
    ConvTranspose3dQAT: (nn.ConvTranspose3d, 3),
}
PER_CHANNEL = {"retrain_weight_config": {"channel_wise": True}}
ULQ = {"retrain_weight_config": {"channel_wise": True, "weights_retrain_algo": "ulq_quantize"}}


def _input(cls, n=2, c=4, size=6, seed=0):
    nd = CLASSES[cls][1]
    return torch.randn(n, c, *([size] * nd), generator=torch.Generator().manual_seed(seed))


def _calibrated(cls, config=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("padding", 1)
    m = cls(4, 6, 3, config=config, **kwargs)
    m.train()
    m(_input(cls, seed=seed + 1)).sum().backward()
    assert m.is_calibrated
    return m


def _fq_bound(y_ref_abs, terms):
    """|ŷ - y| bound for two float32 evaluations of the same sums in different orders:
    each of `terms` products is accumulated with error <= terms * eps * sum|products|."""
    return 2 * terms * EPS32 * y_ref_abs + 1e-30


# ---- the AMCT import paths and constructors ---------------------------------------------
def test_amct_import_paths():
    from amct_pytorch.nn.module.quantization.conv2d import Conv2dQAT as A
    from amct_pytorch.nn.module.quantization.conv3d import Conv3dQAT as B
    from amct_pytorch.nn.module.quantization.conv_transpose_2d import ConvTranspose2dQAT as C
    from amct_pytorch.nn.module.quantization.conv1d import Conv1dQAT as D
    from amct_pytorch.nn.module.quantization.conv_transpose_1d import ConvTranspose1dQAT as E
    from amct_pytorch.nn.module.quantization.conv_transpose_3d import ConvTranspose3dQAT as G
    assert (A, B, C, D, E, G) == (Conv2dQAT, Conv3dQAT, ConvTranspose2dQAT, Conv1dQAT, ConvTranspose1dQAT,
                                  ConvTranspose3dQAT)
    assert all(name in amct_pytorch.__all__ for name in ("Conv2dQAT", "Conv3dQAT", "ConvTranspose2dQAT",
                                                         "Conv1dQAT", "ConvTranspose1dQAT", "ConvTranspose3dQAT"))


@pytest.mark.parametrize("cls", [Conv2dQAT, Conv3dQAT, ConvTranspose2dQAT])
def test_positional_arguments_follow_amct_order(cls):
    cfg = {"retrain_data_config": {"batch_num": 2}}
    # (in, out, kernel, stride, padding, dilation, groups, bias, padding_mode, device, dtype, config)
    m = cls(4, 6, 3, 2, 1, 2, 2, False, "zeros", "cpu", torch.float32, cfg)
    assert (m.in_channels, m.out_channels, m.stride[0], m.padding[0], m.dilation[0], m.groups) == (4, 6, 2, 1, 2, 2)
    assert m.bias is None and m.padding_mode == "zeros" and m.config.retrain_data_config.batch_num == 2


def test_transposed_output_padding_is_keyword_only():
    m = ConvTranspose2dQAT(4, 6, 3, 2, 1, output_padding=1)
    assert m.output_padding == (1, 1)
    with pytest.raises(TypeError):
        ConvTranspose2dQAT(4, 6, 3, 2, 1, 1, 1, True, "zeros", None, None, None, 1)  # 13th positional


@pytest.mark.parametrize("bias, has_bias", [(True, True), (False, False), (1, True), (0, False), ("", False)])
def test_bias_follows_python_truthiness(bias, has_bias):
    assert (Conv2dQAT(2, 3, 1, bias=bias).bias is not None) == has_bias


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(in_channels=0), ValueError, "in_channels: expected a positive int, got 0"),
    (dict(out_channels=2.0), TypeError, "out_channels: expected a positive int"),
    (dict(dtype=torch.float16), TypeError, "dtype: only torch.float32"),
    (dict(device="nowhere"), ValueError, "device: 'nowhere' is not a valid torch device"),
    (dict(config={"retrain_weight_config": {"channel_wize": True}}), ValueError, "Did you mean 'channel_wise'"),
    (dict(padding_mode="mirror"), ValueError, "padding_mode"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    args = dict(in_channels=4, out_channels=6, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        Conv2dQAT(**args)


def test_transposed_refuses_non_zero_padding_mode():
    with pytest.raises(ValueError, match="padding_mode: ConvTranspose2dQAT supports only 'zeros'.*'reflect'"):
        ConvTranspose2dQAT(4, 6, 3, padding_mode="reflect")


@pytest.mark.parametrize("cls", list(CLASSES))
def test_from_float_shares_parameters_and_to_float_restores(cls):
    float_cls, nd = CLASSES[cls]
    kw = dict(output_padding=1, stride=2) if "Transpose" in cls.__name__ else dict(padding=1, dilation=2)
    flt = float_cls(4, 6, 3, groups=2, **kw)
    qat = cls.from_float(flt, PER_CHANNEL)
    assert qat.weight is flt.weight and qat.bias is flt.bias and qat.wts_scales.shape == (6,)
    back = qat.to_float()
    assert type(back) is float_cls and back.weight is flt.weight and back.bias is flt.bias
    assert back.extra_repr() == flt.extra_repr()
    with pytest.raises(TypeError, match=f"from_float: expected a torch.nn.{float_cls.__name__}"):
        cls.from_float(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="not already a"):
        cls.from_float(qat)


# ---- shapes and float behaviour, every argument ---------------------------------------------
CONV_ARGS = [
    dict(),
    dict(stride=2, padding=1),
    dict(padding="same", dilation=2),
    dict(padding="same", kernel_size=4),  # even kernel: torch pads one more on the right
    dict(padding="valid"),
    dict(groups=2, padding=1),
    dict(groups=4, out_channels=8, padding=1),  # depthwise
    dict(padding=1, padding_mode="reflect"),
    dict(padding=2, padding_mode="replicate"),
    dict(padding=1, padding_mode="circular", stride=2),
    dict(bias=False, dilation=2),
]
TRANSPOSED_ARGS = [
    dict(),
    dict(stride=2, padding=1, output_padding=1),
    dict(groups=2, stride=2),
    dict(dilation=2, padding=2),
    dict(bias=False, groups=4, out_channels=8),
]


def _cases():
    for cls, (_, nd) in CLASSES.items():
        for kw in (TRANSPOSED_ARGS if "Transpose" in cls.__name__ else CONV_ARGS):
            yield cls, kw


@pytest.mark.parametrize("cls, kwargs", list(_cases()), ids=lambda v: getattr(v, "__name__", None) or repr(v))
def test_disabled_module_is_exactly_the_float_layer_and_enabled_keeps_its_shapes(cls, kwargs):
    float_cls, nd = CLASSES[cls]
    args = dict(in_channels=4, out_channels=6, kernel_size=3)
    args.update(kwargs)
    torch.manual_seed(0)
    flt = float_cls(**args)
    x = _input(cls, size=7)
    off = cls.from_float(flt, {"retrain_enable": False})
    assert torch.equal(off(x), flt(x))
    qat = cls.from_float(copy.deepcopy(flt), PER_CHANNEL).train()
    y = qat(x)  # calibration: activations pass through, weights are quantized
    y.sum().backward()
    assert y.shape == flt(x).shape and qat.is_calibrated
    y2 = qat(x)
    assert y2.shape == y.shape and torch.isfinite(y2).all()
    # unbatched input, as the float layer allows it
    assert qat(x[0]).shape == flt(x[0]).shape


def test_transposed_output_size_argument():
    m = _calibrated(ConvTranspose2dQAT, stride=2)
    flt = m.to_float()
    x = _input(ConvTranspose2dQAT, size=5)
    for size in ([9, 9], [10, 10]):
        assert m(x, output_size=size).shape == flt(x, output_size=size).shape == (2, 6, *size)


# ---- numerics: the forward is op(x̂, ŵ, b), the gradients are the spec's -------------------------
def _reference(m, x, g):
    """x̂ and ŵ by the pure functions, then the float op through autograd (straight-through)."""
    a_scale, a_offset = m.act_qparams()
    bits = m.config.retrain_data_config.num_bits
    xq = fake_quant_act(x, a_scale, a_offset, bits).requires_grad_()
    scale = m.weight_qparams()
    wq = fake_quant_weight(m.weight.detach(), scale, m.config.retrain_weight_config.num_bits,
                           m.weight_layout()).requires_grad_()
    y = m.float_forward(xq, wq)
    y.backward(g)
    grad_x, grad_max, grad_min = ulq_act_grads(x, xq.grad, a_scale, a_offset, m.acts_clip_max.detach(),
                                               m.acts_clip_min.detach(), bits)
    return y.detach(), grad_x, wq.grad, grad_max, grad_min


@pytest.mark.parametrize("cls, kwargs", [(Conv2dQAT, dict(padding=1, groups=2)),
                                         (Conv1dQAT, dict(padding="same", padding_mode="reflect")),
                                         (Conv3dQAT, dict(stride=2)),
                                         (ConvTranspose2dQAT, dict(stride=2, groups=2, output_padding=1)),
                                         (ConvTranspose1dQAT, dict(dilation=2))])
@pytest.mark.parametrize("config", [{}, PER_CHANNEL])
def test_forward_and_gradients_match_the_float_op_on_quantized_operands(cls, kwargs, config):
    m = _calibrated(cls, config, **kwargs)
    x = _input(cls, seed=5) * 1.5  # some values fall outside the clip range
    m.zero_grad()
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    y_ref, gx_ref, gw_ref, gmax_ref, gmin_ref = _reference(m, x, g)
    # same products, possibly summed in another order: bounded by the float32 accumulation error
    terms = m.weight.numel() // m.out_channels
    bound = 4 * terms * EPS32 * (y_ref.abs().max() + 1)
    torch.testing.assert_close(y, y_ref, atol=float(bound), rtol=0)
    torch.testing.assert_close(grads["weight"], gw_ref, atol=float(4 * x.numel() * EPS32 * gw_ref.abs().max() + 1e-6),
                               rtol=1e-5)
    torch.testing.assert_close(grads["acts_clip_max"], gmax_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads["acts_clip_min"], gmin_ref, atol=1e-4, rtol=1e-4)
    if m.bias is not None:
        torch.testing.assert_close(grads["bias"], g.sum(dim=[d for d in range(g.dim()) if d != 1]), atol=1e-4,
                                   rtol=1e-5)


def test_input_gradient_matches_the_reference():
    m = _calibrated(Conv2dQAT, PER_CHANNEL, groups=2)
    x = (_input(Conv2dQAT, seed=9) * 2).requires_grad_()
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    _, gx_ref, *_ = _reference(m, x.detach(), g)
    torch.testing.assert_close(x.grad, gx_ref, atol=1e-5, rtol=1e-5)
    assert (x.grad == 0).any()  # clipped inputs get no gradient


@pytest.mark.parametrize("config", [{}, PER_CHANNEL, {"retrain_data_config": {"batch_num": 2, "fixed_min": True}},
                                    {"retrain_data_config": {"dst_type": "INT4"},
                                     "retrain_weight_config": {"dst_type": "INT4"}}])
def test_1x1_conv_equals_linear_step_by_step(config):
    """The issue's defining check: Conv2dQAT(k=1) on (N, C, 1, 1) = LinearQAT on (N, C) through
    calibration and SGD steps, within float rounding (a 1x1 conv and F.linear sum in other orders)."""
    torch.manual_seed(0)
    lin, conv = nn.Linear(64, 32), nn.Conv2d(64, 32, 1)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.reshape(32, 64, 1, 1))
        conv.bias.copy_(lin.bias)
    a, b = LinearQAT.from_float(lin, config), Conv2dQAT.from_float(conv, config)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.05), torch.optim.SGD(b.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        x, target = torch.randn(8, 64, generator=gen), torch.randn(8, 32, generator=gen)
        ya, yb = a(x), b(x.reshape(8, 64, 1, 1)).reshape(8, 32)
        # 64 products per output: reordered float32 sums differ by <= 64 eps * sum|x w|; a rounding
        # flip of x̂ or ŵ (a value at a .5 tie in one order only) would show as a full grid step
        bound = 64 * EPS32 * (x.abs() @ a.weight.detach().abs().t()).max() * 4
        torch.testing.assert_close(yb, ya, atol=float(bound) + 1e-6, rtol=0)
        for y, opt in ((ya, opt_a), (yb, opt_b)):
            opt.zero_grad()
            F.mse_loss(y, target).backward()
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            if pa.grad is not None:
                torch.testing.assert_close(pb.grad.reshape(pa.grad.shape), pa.grad, atol=1e-5, rtol=1e-4,
                                           msg=lambda s: f"step {step} {name}: {s}")
        opt_a.step()
        opt_b.step()
        assert a.is_calibrated == b.is_calibrated
    for key in ("acts_clip_max", "acts_clip_min", "acts_scale", "acts_offset", "wts_scales"):
        torch.testing.assert_close(getattr(b, key), getattr(a, key), atol=1e-5, rtol=1e-5)


# ---- the per-channel axis ----------------------------------------------------------------------
def test_per_channel_scales_are_per_output_channel():
    conv = _calibrated(Conv2dQAT, PER_CHANNEL, groups=2)
    w = conv.weight.detach()
    want = w.abs().reshape(6, -1).amax(1) / 127  # ARQ: max|w|/127 unless the negative side wins
    neg = w.reshape(6, -1).amin(1).abs() > w.reshape(6, -1).amax(1).abs()
    want = torch.where(neg, w.reshape(6, -1).amin(1).abs() / 128, want)
    torch.testing.assert_close(conv.wts_scales, want, rtol=0, atol=0)


def test_transposed_per_channel_scales_follow_weight_dim_1_per_group():
    m = _calibrated(ConvTranspose2dQAT, PER_CHANNEL, groups=2)  # weight (4, 3, 3, 3): 2 groups of 3 channels
    w = m.weight.detach()
    assert w.shape == (4, 3, 3, 3)
    for o in range(6):
        g, j = divmod(o, 3)
        block = w[2 * g:2 * g + 2, j]
        amax, amin = block.max().abs(), block.min().abs()
        want = amin / 128 if amin > amax else amax / 127
        assert float(m.wts_scales[o]) == float(want), o
    # ŵ uses each output channel's own scale
    wq = fake_quant_weight(w, m.wts_scales, 8, m.weight_layout())
    for o in range(6):
        g, j = divmod(o, 3)
        codes = wq[2 * g:2 * g + 2, j] / m.wts_scales[o]
        torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)


# ---- state: the state rule, resume, hostile inputs -----------------------------------------------
@pytest.mark.parametrize("cls", [Conv2dQAT, ConvTranspose2dQAT])
def test_eval_and_no_grad_change_nothing(cls):
    m = cls(4, 6, 3, padding=1, config={"retrain_data_config": {"batch_num": 2}})
    x = _input(cls)
    before = _snapshot(m)
    m.eval()
    m(x)
    m.train()
    with torch.no_grad():
        m(x)
    _assert_unchanged(m, before)
    with calibrating(), torch.no_grad():
        m(x)
    assert int(m.calib_batches) == 1


@pytest.mark.parametrize("cls", [Conv2dQAT, ConvTranspose3dQAT])
@pytest.mark.parametrize("config", [{"retrain_data_config": {"batch_num": 3}}, dict(ULQ, retrain_data_config={
    "batch_num": 3, "ifmr_search": "histogram"})])
def test_resume_is_bit_identical(cls, config):
    def make():
        torch.manual_seed(3)
        return nn.Sequential(cls(4, 6, 3, padding=1, config=config), nn.ReLU(),
                             cls(6, 2, 3, padding=1, config=config)).train()

    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(2, 4, *([5] * CLASSES[cls][1]), generator=gen) * (1 + i) for i in range(6)]

    def train(model, opt, data):
        out = []
        for x in data:
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            out.append(loss.detach())
        return out

    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, batches[:2])  # interrupted during calibration
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    want = train(model, opt, batches[2:])
    buf.seek(0)
    saved = torch.load(buf)
    fresh = make()
    fresh.load_state_dict(saved["model"])
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    got = train(fresh, opt2, batches[2:])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("bad, error, match", [
    (lambda x: x.double(), TypeError, "expected dtype torch.float32"),
    (lambda x: x[:, :3], ValueError, r"expected shape \(N, 4, \*, \*\).*got \(2, 3, 6, 6\)"),
    (lambda x: x[0, 0], ValueError, "dim -3 = in_channels"),
    (lambda x: torch.where(x > 1, float("nan"), x), ValueError, "NaN or infinite"),
    (lambda x: x[:0], ValueError, "empty batch"),
])
def test_hostile_inputs_are_refused_and_change_nothing(bad, error, match):
    m = Conv2dQAT(4, 6, 3, config={"retrain_data_config": {"batch_num": 2}}).train()
    m(_input(Conv2dQAT))
    before = _snapshot(m)
    with pytest.raises(error, match=match):
        m(bad(_input(Conv2dQAT, seed=2)))
    _assert_unchanged(m, before)


def test_calibration_refuses_inputs_that_would_overflow_the_conv():
    m = Conv2dQAT(4, 6, 3).train()
    before = _snapshot(m)
    with pytest.raises(ValueError, match="would overflow float32"):
        m(_input(Conv2dQAT) * 3e37)
    _assert_unchanged(m, before)


def test_training_saves_no_activation_sized_tensor_beyond_x_and_the_quantized_weight():
    m = _calibrated(Conv2dQAT)
    x = torch.randn(8, 4, 32, 32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x).sum().backward()
    assert sum(saved) <= x.numel() + 2 * m.weight.numel() + 64, saved


# ---- model-wide: to_qat, calibrate, export, record, deploy view -------------------------------------
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.up(x)
        return self.head(x.mean(dim=(2, 3)))


def test_to_qat_converts_convs_and_linears_and_back():
    model = SmallCNN()
    summary = to_qat(model, PER_CHANNEL, overrides={"up": {}})
    assert set(summary.converted) == {"conv1", "conv2", "up", "head"}
    assert type(model.conv1) is Conv2dQAT and type(model.up) is ConvTranspose2dQAT and type(model.head) is LinearQAT
    assert not model.up.config.retrain_weight_config.channel_wise
    calibrate(model, [torch.randn(2, 3, 8, 8)], progress=False)
    assert all(m.is_calibrated for m in qat_layers(model).values())
    assert to_float(model) == ["conv1", "conv2", "up", "head"]
    assert type(model.conv2) is nn.Conv2d and type(model.up) is nn.ConvTranspose2d
    only = SmallCNN()
    to_qat(only, layer_types=[nn.Linear])
    assert type(only.conv1) is nn.Conv2d and type(only.head) is LinearQAT
    with pytest.raises(ValueError, match="layer_types"):
        to_qat(SmallCNN(), layer_types=[nn.BatchNorm2d])


def _trained_cnn(config=PER_CHANNEL):
    torch.manual_seed(0)
    model = SmallCNN()
    to_qat(model, config, overrides={"up": {}})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step()
    return model.eval()


def test_quant_record_round_trip_for_convs(tmp_path):
    model = _trained_cnn()
    record = amct_pytorch.save_quant_record(model, tmp_path / "q.json")
    assert record["layers"]["conv2"]["layer_type"] == "Conv2dQAT" and record["layers"]["conv2"]["groups"] == 8
    assert len(record["layers"]["conv1"]["scale_w"]) == 8
    fresh = SmallCNN()
    to_qat(fresh, PER_CHANNEL, overrides={"up": {}})
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k.endswith(("weight", "bias"))},
                          strict=False)
    amct_pytorch.load_quant_record(fresh, tmp_path / "q.json")
    fresh.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh(x), model(x))
    record["layers"]["conv1"]["kernel_size"] = [5, 5]
    (tmp_path / "bad.json").write_text(__import__("json").dumps(record))
    with pytest.raises(ValueError, match=r"conv1'.kernel_size: the record has \[5, 5\]"):
        amct_pytorch.load_quant_record(fresh, tmp_path / "bad.json")


def test_deploy_view_codes_reproduce_the_quantized_weight():
    model = _trained_cnn()
    view = deploy_view(model)
    for name, m in qat_layers(model).items():
        wq = fake_quant_weight(m.weight.detach(), m.weight_qparams(), 8, m.weight_layout())
        assert view[name].weight.shape == m.weight.shape and view[name].codes().dtype == torch.int8
        assert view[name].weight.dtype == {"int8": torch.int8, "uint8": torch.uint8}[view[name].storage]
        torch.testing.assert_close(view[name].dequantized_weight(), wq, rtol=0, atol=0)


onnxruntime = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("dynamo", [True, False])
def test_export_every_conv_class_matches_onnx_runtime(tmp_path, dynamo):
    for i, (cls, kwargs) in enumerate([(Conv1dQAT, dict(padding=1, padding_mode="reflect")),
                                       (Conv2dQAT, dict(padding="same", groups=2)),
                                       (Conv3dQAT, dict(stride=2)),
                                       (ConvTranspose1dQAT, dict(stride=2, output_padding=1)),
                                       (ConvTranspose2dQAT, dict(padding=1)),
                                       (ConvTranspose3dQAT, dict(groups=2))]):
        m = _calibrated(cls, PER_CHANNEL if "Transpose" not in cls.__name__ or kwargs.get("groups", 1) == 1 else {},
                        **kwargs).eval()
        x = _input(cls, seed=11)
        # the graph computes the same x̂, ŵ; the convolution kernels may sum in another order
        result = amct_pytorch.export_onnx(m, (x,), tmp_path / f"m{i}.onnx", dynamo=dynamo, dynamic=False,
                                          atol=1e-4)
        assert result.max_abs_diff <= 1e-4


def test_export_refuses_per_channel_grouped_transposed_conv(tmp_path):
    m = _calibrated(ConvTranspose2dQAT, PER_CHANNEL, groups=2).eval()
    with pytest.raises(RuntimeError, match="grouped transposed conv.*channel_wise=False"):
        amct_pytorch.export_onnx(m, (_input(ConvTranspose2dQAT),), tmp_path / "m.onnx")
    assert not os.path.exists(tmp_path / "m.onnx")


def test_export_a_small_cnn_matches_onnx_runtime(tmp_path):
    model = _trained_cnn()
    result = amct_pytorch.export_onnx(model, (torch.randn(2, 3, 8, 8),), tmp_path / "cnn.onnx", dynamic=False,
                                      atol=1e-4)
    assert result.max_abs_diff <= 1e-4
