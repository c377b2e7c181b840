"""retrain_weight_config.kernel_grid (issue 19): the pair-capped and 7-bit INT8 weight grids in the QAT
layers (config rules, forward and gradients against pair_grid's reference, 1x1 conv == Linear) and in
the export (stored codes == trained codes, the pair rule on them, ORT and the u8s8 emulation)."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_pytorch as ap
from amct_pytorch.config import parse_config
from amct_pytorch.functional import act_qparams, fake_quant_act, ulq_weight_scale
from amct_pytorch.nn.module.quantization.conv import Conv2dQAT, ConvTranspose2dQAT
from amct_pytorch.nn.module.quantization.embedding import EmbeddingQAT
from amct_pytorch.nn.module.quantization.linear import LinearQAT
from amct_pytorch.pair_grid import arq_scale_int7, fake_quant_int7, fake_quant_pair, pair_codes
from amct_pytorch.saturation import matmul_integer_to_float, pair_violations

PAIR = {"retrain_weight_config": {"kernel_grid": "pair_cap"}}
INT7 = {"retrain_weight_config": {"kernel_grid": "int7"}}


def _ulq_pair(channel_wise=True, grad="identity"):
    return {"retrain_weight_config": {"kernel_grid": "pair_cap", "weights_retrain_algo": "ulq_quantize",
                                      "channel_wise": channel_wise, "scale_init": "pair_mse",
                                      "kernel_grid_grad": grad}}


# ---- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights, match", [
    ({"kernel_grid": "pair"}, r"kernel_grid: got 'pair'; allowed values: full, int7, pair_cap"),
    ({"kernel_grid": 7}, r"kernel_grid: expected one of"),
    ({"kernel_grid": "pair_cap", "dst_type": "INT4"}, r"kernel_grid='pair_cap'.*INT8.*dst_type='INT4'"),
    ({"kernel_grid": "int7", "channel_wise": True, "group_size": 32}, r"group_size=32"),
    ({"kernel_grid": "pair_cap", "channel_wise": True}, r"ARQ's per-channel max-abs step.*pair_mse"),
    ({"kernel_grid": "pair_cap", "channel_wise": True, "weights_retrain_algo": "ulq_quantize"},
     r"scale_init='pair_mse' \(got 'arq'\)"),
    ({"scale_init": "pair_mse", "weights_retrain_algo": "ulq_quantize"}, r"needs kernel_grid='pair_cap'"),
    ({"kernel_grid_grad": "projected"}, r"applies only to a kernel grid"),
    ({"kernel_grid": "int7", "kernel_grid_grad": "projected"}, r"pair_cap' only"),
    ({"kernel_grid": "pair_cap", "kernel_grid_grad": "none"}, r"kernel_grid_grad: got 'none'"),
])
def test_config_refuses(weights, match):
    with pytest.raises((ValueError, TypeError), match=match):
        parse_config({"retrain_weight_config": weights})


def test_config_accepts_and_round_trips():
    for weights in ({"kernel_grid": "pair_cap"}, {"kernel_grid": "int7", "channel_wise": True},
                    {"kernel_grid": "pair_cap", "kernel_grid_grad": "projected"},
                    _ulq_pair()["retrain_weight_config"]):
        cfg = parse_config({"retrain_weight_config": weights})
        assert parse_config(cfg.to_dict()) == cfg
        assert cfg.retrain_weight_config.grid_bits == (7 if weights["kernel_grid"] == "int7" else 8)
    # the default grid stays out of to_dict (AMCT's keys only)
    assert "kernel_grid" not in parse_config({}).to_dict()["retrain_weight_config"]


def test_layers_without_an_integer_kernel_refuse():
    with pytest.raises(ValueError, match="ConvTranspose2dQAT does not run an integer matmul or conv"):
        ConvTranspose2dQAT(4, 4, 3, config=PAIR)
    with pytest.raises(ValueError, match="EmbeddingQAT does not run"):
        EmbeddingQAT(10, 8, config={"retrain_data_config": None, **INT7})
    # a switched-off layer is a float layer: nothing to refuse
    ConvTranspose2dQAT(4, 4, 3, config={**PAIR, "retrain_enable": False})


# ---- forward and gradients ----------------------------------------------------------------------
def _calibrated(m, x):
    with ap.calibrating():
        m(x)
    return m


def _act(m, x):
    s, o = act_qparams(m.acts_clip_max.detach(), m.acts_clip_min.detach(), 8)
    return fake_quant_act(x, s, o, 8)


@pytest.mark.parametrize("cfg", [PAIR, _ulq_pair(False), _ulq_pair(True), _ulq_pair(True, "projected")])
def test_linear_pair_cap_matches_reference(cfg):
    torch.manual_seed(0)
    m = LinearQAT(38, 12, config=cfg)  # odd pair count per row: 19 pairs
    x = torch.randn(16, 38) * 2
    _calibrated(m, x)
    wcfg = m.config.retrain_weight_config
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    # reference: pair_grid's autograd function on the same weight and scale, x̂ fixed
    w = m.weight.detach().clone().requires_grad_(True)
    if wcfg.learnable_scale:
        raw = m.wts_scales.detach().clone().requires_grad_(True)
        s = ulq_weight_scale(raw)
    else:
        raw = None
        s = m.weight_qparams()
    wq = fake_quant_pair(w, s, "linear", weight_grad=wcfg.kernel_grid_grad)
    y_ref = F.linear(_act(m, x), wq, m.bias.detach())
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(m.weight.grad, w.grad, rtol=1e-5, atol=1e-6)
    if raw is not None:
        torch.testing.assert_close(m.wts_scales.grad, raw.grad, rtol=1e-5, atol=1e-7)
    # the codes the layer trains and exports satisfy the pair rule and equal the reference's
    codes = m.weight_codes()
    assert torch.equal(codes, pair_codes(m.weight, m.weight_qparams(), "linear"))
    assert len(pair_violations(codes.numpy(), "linear")) == 0
    # eval forward (cached ŵ) equals the training forward
    m.eval()
    torch.testing.assert_close(m(x), y.detach(), rtol=0, atol=0)


def test_pair_mse_init_is_the_capped_grid_search():
    torch.manual_seed(1)
    m = LinearQAT(64, 8, config=_ulq_pair())
    from amct_pytorch.functional import arq_scale
    from amct_pytorch.pair_grid import pair_mse_scale
    base = arq_scale(m.weight, 8, True)
    assert torch.equal(m.weight_scale_init(), pair_mse_scale(m.weight, base, "linear"))
    # nn.Linear's uniform init: ARQ's step would cap about a quarter of the pairs; pair_mse moves it
    assert (m.weight_scale_init() > base).all()


def test_int7_matches_reference():
    torch.manual_seed(2)
    for cfg, learn in ((INT7, False), ({"retrain_weight_config": {"kernel_grid": "int7", "channel_wise": True,
                                                                  "weights_retrain_algo": "ulq_quantize"}}, True)):
        m = LinearQAT(40, 6, config=cfg)
        x = torch.randn(8, 40)
        _calibrated(m, x)
        y = m(x)
        g = torch.randn_like(y)
        y.backward(g)
        w = m.weight.detach().clone().requires_grad_(True)
        if learn:
            raw = m.wts_scales.detach().clone().requires_grad_(True)
            s = ulq_weight_scale(raw)
        else:
            s = arq_scale_int7(m.weight.detach(), channel_wise=False)
            torch.testing.assert_close(m.weight_qparams(), s, rtol=0, atol=0)
        y_ref = F.linear(_act(m, x), fake_quant_int7(w, s), m.bias.detach())
        y_ref.backward(g)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(m.weight.grad, w.grad, rtol=1e-5, atol=1e-6)
        if learn:
            torch.testing.assert_close(m.wts_scales.grad, raw.grad, rtol=1e-5, atol=1e-7)
        codes = m.weight_codes()
        assert int(codes.min()) >= -64 and int(codes.max()) <= 63


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_pair_cap_matches_reference(groups):
    torch.manual_seed(3)
    m = Conv2dQAT(6, 4, 3, groups=groups, padding=1, config=_ulq_pair())
    x = torch.randn(2, 6, 5, 5) * 2
    _calibrated(m, x)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    w = m.weight.detach().clone().requires_grad_(True)
    raw = m.wts_scales.detach().clone().requires_grad_(True)
    wq = fake_quant_pair(w, ulq_weight_scale(raw), "conv", groups, weight_grad="identity")
    y_ref = F.conv2d(_act(m, x), wq, m.bias.detach(), padding=1, groups=groups)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(m.weight.grad, w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.wts_scales.grad, raw.grad, rtol=1e-5, atol=1e-6)
    assert len(pair_violations(m.weight_codes().numpy(), "conv", groups)) == 0


@pytest.mark.parametrize("cfg", [PAIR, _ulq_pair(True, "projected"), INT7])
def test_one_by_one_conv_equals_linear(cfg):
    torch.manual_seed(4)
    lin = LinearQAT(10, 6, config=cfg)
    conv = Conv2dQAT(10, 6, 1, config=cfg)
    with torch.no_grad():
        conv.weight.copy_(lin.weight[:, :, None, None])
        conv.bias.copy_(lin.bias)
    x = torch.randn(3, 10, 2, 2)
    xl = x.permute(0, 2, 3, 1).reshape(-1, 10)
    _calibrated(lin, xl)
    _calibrated(conv, x)
    yl, yc = lin(xl), conv(x)
    g = torch.randn_like(yl)
    yl.backward(g)
    yc.backward(g.reshape(3, 2, 2, 6).permute(0, 3, 1, 2))
    torch.testing.assert_close(yc.permute(0, 2, 3, 1).reshape(-1, 6), yl, rtol=0, atol=1e-5)
    assert torch.equal(conv.weight_codes()[:, :, 0, 0], lin.weight_codes())
    torch.testing.assert_close(conv.weight.grad[:, :, 0, 0], lin.weight.grad, rtol=1e-5, atol=1e-5)
    if lin.config.retrain_weight_config.learnable_scale:
        torch.testing.assert_close(conv.wts_scales.grad, lin.wts_scales.grad, rtol=1e-5, atol=1e-6)


def test_full_grid_spec_is_the_seed_path():
    m = LinearQAT(8, 4)
    assert m.pair_grid_spec() is None and m.config.retrain_weight_config.grid_bits == 8


# ---- export -------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.grouped(x))
        return self.fc(x.flatten(1))


def _trained(cfg, seed=5):
    torch.manual_seed(seed)
    model = _Net()
    # weights near full range in every pair: without the grid, a quarter of the pairs would break the rule
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    ap.to_qat(model, cfg)
    x = torch.randn(4, 4, 4, 4)
    with ap.calibrating():
        model(x)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model.eval(), x


@pytest.mark.parametrize("cfg", [PAIR, _ulq_pair(), INT7])
def test_export_stores_the_trained_codes(cfg, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, x = _trained(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = ap.export_onnx(model, x, tmp_path / "m.onnx")
    assert res.max_abs_diff is not None
    for k, v in model.state_dict().items():  # the export's weight swap is undone bit for bit
        assert torch.equal(v, before[k]), k
    proto = onnx.load(tmp_path / "m.onnx")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    layers = dict(model.named_modules())
    deployed = ap.deploy_view(model)
    assert {f.source for f in res.folded_weights} == {"conv.weight", "grouped.weight", "fc.weight"}
    for f in res.folded_weights:
        name = f.source[: -len(".weight")]
        m = layers[name]
        stored = inits[f.name]
        # the pair rule holds, so the export keeps int8 (the u8s8 kernel) instead of the uint8 fallback
        assert stored.dtype == np.int8 and f.storage == "int8", (name, f.storage, f.reason)
        trained = m.weight_codes().numpy()
        torch_layout = stored.transpose(np.argsort(f.perm)) if f.perm is not None else stored
        np.testing.assert_array_equal(torch_layout, trained)
        np.testing.assert_array_equal(deployed[name].weight.numpy(), trained)
        order, groups = m.kernel_order()
        assert len(pair_violations(trained, order, groups)) == 0, name
        if m.config.retrain_weight_config.kernel_grid == "int7":
            assert trained.min() >= -64 and trained.max() <= 63


def test_export_u8s8_emulation_equals_exact_on_trained_codes():
    """The Linear's stored codes on the pair grid: the emulated u8s8 kernel (no VNNI) equals the exact
    sum for the extreme activations that break the full grid."""
    model, _ = _trained(PAIR)
    fc = model.fc
    codes = fc.weight_codes().numpy().T  # the MatMul weight (K, N)
    x_codes = np.where(codes.sum(axis=1, keepdims=True).T >= 0, 127, -128).repeat(3, axis=0)
    x_codes[1] = 127
    x_codes[2] = -128
    scale = float(fc.weight_qparams())
    emulated = matmul_integer_to_float(x_codes, codes, 0.1, scale, kernel="u8s8_pairs")
    exact = matmul_integer_to_float(x_codes, codes, 0.1, scale, kernel="exact")
    np.testing.assert_array_equal(emulated, exact)
    # the same layer on the full grid: the emulation departs (the check is not vacuous)
    full, _ = _trained({})
    full_codes = full.fc.weight_codes().numpy().T
    assert len(pair_violations(full_codes, "matmul")) > 0
    assert not np.array_equal(matmul_integer_to_float(np.full((1, full_codes.shape[0]), 127), full_codes, 0.1, scale),
                              matmul_integer_to_float(np.full((1, full_codes.shape[0]), 127), full_codes, 0.1, scale,
                                                      kernel="exact"))


def test_plain_torch_onnx_export_refuses_kernel_grid(tmp_path):
    pytest.importorskip("onnx")
    m = LinearQAT(8, 4, config=PAIR)
    _calibrated(m, torch.randn(4, 8)).eval()
    with pytest.raises(RuntimeError, match="exports its trained codes only through"):
        torch.onnx.export(m, (torch.randn(2, 8),), tmp_path / "p.onnx", dynamo=False)


_QEMU_RUN = """
import sys, numpy as np, onnxruntime as ort
data = np.load(sys.argv[1])
outs = {}
for name in sys.argv[3:]:
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    sess = ort.InferenceSession(name, so, providers=["CPUExecutionProvider"])
    outs[name] = sess.run(None, {sess.get_inputs()[0].name: data["x"]})[0]
np.savez(sys.argv[2], **{str(i): outs[n] for i, n in enumerate(sys.argv[3:])})
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64",
                    reason="needs qemu-user (apt-get install qemu-user) on x86-64")
def test_kernel_grid_artifacts_exact_under_qemu_haswell(tmp_path):
    """ORT under an emulated AVX2 CPU without VNNI: the full grid's codes stored int8 saturate (ORT equals
    the u8s8 emulation, far from the exact sum); the export's default stores them uint8 + 128 (exact);
    the pair_cap and int7 artifacts stay int8 and equal the exact integer sum."""
    pytest.importorskip("onnxruntime")

    torch.manual_seed(6)
    x = (torch.randint(0, 2, (8, 256)) * 2 - 1).float() * 3.0  # +-3: activation codes at the grid's ends
    paths, layers = [], []
    storages = []
    for cfg, storage in (({}, "int8"), ({}, "auto"), (PAIR, "auto"), (INT7, "auto")):
        torch.manual_seed(7)
        m = LinearQAT(256, 16, config=cfg)
        with torch.no_grad():
            m.weight.uniform_(-1, 1)
        _calibrated(m, x).eval()
        path = str(tmp_path / f"{len(paths)}.onnx")
        res = ap.export_onnx(m, x, path, check=False, int8_storage=storage)
        storages.append(res.folded_weights[0].storage)
        paths.append(path)
        layers.append(m)
    assert storages == ["int8", "uint8", "int8", "int8"]
    np.savez(tmp_path / "in.npz", x=x.numpy())
    script = tmp_path / "run.py"
    script.write_text(_QEMU_RUN)
    proc = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", os.path.realpath(sys.executable), str(script),
                           str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), *paths],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    for i, m in enumerate(layers):
        s_x, z_x = m.act_qparams()
        x_codes = (torch.round(x / s_x) + z_x).clamp(-128, 127).to(torch.int64).numpy()
        w_codes = m.weight_codes().numpy().T
        bias = m.bias.detach().numpy()
        exact = matmul_integer_to_float(x_codes, w_codes, float(s_x), float(m.weight_qparams()), int(z_x),
                                        kernel="exact") + bias
        pairs = matmul_integer_to_float(x_codes, w_codes, float(s_x), float(m.weight_qparams()), int(z_x)) + bias
        # ORT: float32(acc) * float32(s_x * s_w), then the bias Add: a few float32 roundings
        tol = 4 * np.finfo(np.float32).eps * (np.abs(exact) + np.abs(bias))
        if i != 1:  # int8 storage: ORT equals its emulated u8s8 kernel (uint8 storage runs the exact u8u8)
            np.testing.assert_array_less(np.abs(got[str(i)] - pairs), tol + 1e-30)
        if i == 0:
            assert np.abs(got[str(i)] - exact).max() > 1.0  # the full grid saturates here
        else:
            np.testing.assert_array_less(np.abs(got[str(i)] - exact), tol + 1e-30)
