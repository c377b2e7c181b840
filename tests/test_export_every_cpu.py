"""Deployed = trained on every CPU: INT8 layers whose codes could saturate ONNX Runtime's u8s8 kernel
(x86 without VNNI: adjacent products summed in saturating int16) are stored as uint8 + 128, and the
export check refuses, on any CPU, an artifact that holds such a pair in int8 or whose layers do not
compute their Q/DQ nodes (a quantized bias, a dropped Relu). Under `qemu-x86_64 -cpu Haswell`
(apt-get install qemu-user) the artifact runs on ORT's real AVX2 kernels."""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import amct_pytorch as amct  # noqa: E402
from amct_pytorch import LinearQAT, export_onnx  # noqa: E402
from amct_pytorch.export.check import ArtifactCheckError, check_artifact, check_layers, find_sites, instrumented  # noqa: E402
from amct_pytorch.saturation import pair_violations  # noqa: E402

HERE = Path(__file__).resolve().parent


def _calibrated(model, x, config):
    amct.to_qat(model, config)
    amct.calibrate(model, [x], progress=False)
    return model.eval()


def _one_saturating_pair():
    """Two per-tensor INT8 linears whose codes are small except, in the first, one same-sign pair
    (127, 2) at inputs 0 and 1 of output 0: |127| + |2| = 129 > 128."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight.copy_(torch.randint(-20, 21, lin.weight.shape).float() / 127)
        model[0].weight[0, 0], model[0].weight[0, 1] = 1.0, 2 / 127
        model[2].weight[0, 0] = 1.0  # a full-range code without a same-sign partner above 1
        model[2].weight[0, 1] = -0.5
    x = torch.randn(8, 16)
    return _calibrated(model, x, {}), x


def test_a_single_saturating_pair_is_refused_on_any_cpu(tmp_path):
    model, x = _one_saturating_pair()
    with pytest.raises(ArtifactCheckError, match=r"layer '0' \(MatMul\) stores int8 weight codes with 1 pair\(s\) "
                                                 r"that saturate .* positions 0, 1 of output 0"):
        export_onnx(model, (x,), tmp_path / "int8.onnx", int8_storage="int8")
    result = export_onnx(model, (x,), tmp_path / "auto.onnx")  # the default: that layer goes uint8 + 128
    storage = {f.source: f.storage for f in result.folded_weights}
    assert storage == {"0.weight": "uint8", "2.weight": "int8"}
    reason = next(f.reason for f in result.folded_weights if f.source == "0.weight")
    assert "1 of " in reason and "uint8 + 128" in reason
    assert all(c.ok for c in result.layer_checks) and [c.layer for c in result.layer_checks] == ["0", "2"]
    view = amct.deploy_view(model)
    assert view["0"].storage == "uint8" and view["0"].weight_zero_point == 128 and view["2"].storage == "int8"
    proto = onnx.load(result.path)
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    u8 = next(f.name for f in result.folded_weights if f.storage == "uint8")
    assert stored[u8].dtype == np.uint8
    np.testing.assert_array_equal(stored[u8].astype(np.int32) - 128, view["0"].codes().numpy().T)


def test_uint8_everywhere_and_int8_everywhere(tmp_path):
    model, x = _one_saturating_pair()
    result = export_onnx(model, (x,), tmp_path / "u8.onnx", int8_storage="uint8")
    assert {f.storage for f in result.folded_weights} == {"uint8"}
    with pytest.raises(ValueError, match=r"int8_storage: expected one of \('auto', 'int8', 'uint8'\), got 'u8'"):
        export_onnx(model, (x,), tmp_path / "bad.onnx", int8_storage="u8")


def _tiny_bert():
    transformers = pytest.importorskip("transformers")

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=128)
            self.bert = transformers.BertModel(config)

        def forward(self, ids):
            return self.bert(input_ids=ids).last_hidden_state

    return Encoder()


@pytest.mark.parametrize("kind", ["mlp", "cnn", "bert"])
def test_the_default_check_passes_on_right_artifacts_of_ordinary_models(tmp_path, kind):
    torch.manual_seed(1)
    per_channel = {"retrain_weight_config": {"channel_wise": True}}
    if kind == "mlp":
        model, x = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)), torch.randn(16, 32)
        others = [(torch.randn(1, 32),), (torch.randn(7, 32),)]
    elif kind == "cnn":
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                              nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False), nn.ConvTranspose2d(8, 8, 2, stride=2),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        x, others = torch.randn(4, 3, 16, 16), [(torch.randn(2, 3, 9, 11),)]
    else:
        model = _tiny_bert()
        x = torch.randint(0, 100, (4, 12))
        others = [(torch.randint(0, 100, (1, 30)),), (torch.randint(0, 100, (7, 5)),)]
        per_channel = {}
    _calibrated(model, x, per_channel)
    result = export_onnx(model, (x,), tmp_path / f"{kind}.onnx", check_inputs=others)
    assert result.layer_checks and all(c.ok for c in result.layer_checks)
    assert len(result.layer_checks) == len(result.folded_weights)  # every quantized layer the graph holds
    # whatever it stores as int8 keeps the pair rule: exact on every CPU
    proto = onnx.load(result.path)
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    for f in result.folded_weights:
        if f.storage == "int8" and stored[f.name].ndim == 2:
            assert len(pair_violations(stored[f.name], "matmul")) == 0


def test_a_quantized_bias_is_named(tmp_path):
    """ONNX Runtime's WeightBiasQuantization turns the float bias of a DequantizeLinear-fed Conv into int32
    codes at s_x*s_w (export_onnx keeps the bias as a separate Add to avoid it): put it back and check."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    _calibrated(model, x, {"retrain_weight_config": {"channel_wise": True}})
    with torch.no_grad():
        model[0].bias.mul_(50)  # biases far off the int32 grid
    result = export_onnx(model, (x,), tmp_path / "a.onnx")
    proto = onnx.load(result.path)
    inits = {i.name: i for i in proto.graph.initializer}
    for add in [n for n in proto.graph.node if n.op_type == "Add" and n.input[1] in inits]:
        conv = next(n for n in proto.graph.node if add.input[0] in n.output)
        bias = onnx.numpy_helper.to_array(inits[add.input[1]]).reshape(-1)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(bias, add.input[1] + "_flat"))
        conv.input.append(add.input[1] + "_flat")
        conv.output[0] = add.output[0]
        proto.graph.node.remove(add)
    onnx.save(proto, tmp_path / "b.onnx")
    with pytest.raises(ArtifactCheckError, match=r"layer '0' \(Conv\) computes wrong values in ONNX Runtime"):
        check_artifact(model, tmp_path / "b.onnx", result.folded_weights, [(x,)])


def test_a_dropped_relu_is_named(tmp_path):
    """ONNX Runtime's ReluQuantRewrite drops a Relu in front of an INT4 QuantizeLinear even when its zero
    point is above qmin (export_onnx writes it as Max(x, 0)): put the Relu back and check."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(16, 16)
    _calibrated(model, x, {"retrain_data_config": {"dst_type": "INT4"}})
    assert int(model[2].act_qparams()[1]) > -8
    result = export_onnx(model, (x,), tmp_path / "a.onnx")
    proto = onnx.load(result.path)
    maxes = [n for n in proto.graph.node if n.op_type == "Max"]
    assert len(maxes) == 1
    maxes[0].op_type = "Relu"
    del maxes[0].input[1:]
    onnx.save(proto, tmp_path / "b.onnx")
    with pytest.raises(ArtifactCheckError, match="optimizer rewrote the plain graph"):
        check_artifact(model, tmp_path / "b.onnx", result.folded_weights, [(x,)])


# ---- real kernels of a CPU without VNNI ---------------------------------------------------------
def _haswell_verdicts(model, x, path, **export_kwargs):
    """Export `model`, run its instrumented graph on ORT's kernels of an AVX2 CPU without VNNI
    (qemu-x86_64 -cpu Haswell) and return check_layers' verdict per layer."""
    result = export_onnx(model, (x,), path, check=False, **export_kwargs)
    proto = onnx.load(result.path)
    sites = find_sites(proto, result.folded_weights)
    probe, inputs, outputs = (path.with_name(path.stem + tail) for tail in ("_probe.onnx", "_in.npz", "_out.npz"))
    onnx.save(instrumented(proto, sites), probe)
    np.savez(inputs, input_0=x.numpy())
    proc = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", os.path.realpath(sys.executable),
                           str(HERE / "ort_outputs.py"), str(probe), str(inputs), str(outputs)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [c.ok for c in check_layers(proto, sites, dict(np.load(outputs)))]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64",
                    reason="needs qemu-user (apt-get install qemu-user) on x86-64; .ci/run installs it")
def test_under_an_avx2_cpu_without_vnni_auto_is_exact_and_int8_saturates(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
    x = torch.randn(16, 64)
    _calibrated(model, x, {"retrain_weight_config": {"channel_wise": True}})
    verdicts = {storage: _haswell_verdicts(model, x, tmp_path / f"{storage}.onnx", int8_storage=storage)
                for storage in ("auto", "int8")}
    assert verdicts["auto"] == [True, True]  # uint8 + 128: ORT's u8u8 kernel, exact
    assert verdicts["int8"] == [False, False]  # the same codes as int8: the u8s8 pair sums saturate


# ---- layers whose activation path is not Q -> DQ -> op -------------------------------------------
def _padded_cnn_and_level4_mlp():
    torch.manual_seed(2)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=2, padding_mode="replicate"), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, padding=1, padding_mode="circular"))
    x_cnn = torch.randn(2, 3, 10, 9)
    _calibrated(cnn, x_cnn, {"retrain_weight_config": {"channel_wise": True}})
    mlp = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    x_mlp = torch.randn(6, 64) * 3
    level4 = {"retrain_weight_config": {"dst_type": "INT4", "channel_wise": True, "group_size": 32,
                                        "weights_retrain_algo": "ulq_quantize"},
              "retrain_data_config": {"dynamic_act": "ort-matmulnbits-level4"}}
    amct.to_qat(mlp, level4)
    mlp.train()(x_mlp)
    return (cnn.eval(), x_cnn), (mlp.eval(), x_mlp)


def test_padded_convs_and_level4_linears_are_checked_layer_by_layer(tmp_path):
    """A conv with padding_mode != zeros reads its quantized input through a Pad, and a MatMulNBits at
    accuracy_level 4 quantizes its float input itself: both are checked like every other layer."""
    for kind, (model, x) in zip(("cnn", "mlp"), _padded_cnn_and_level4_mlp()):
        result = export_onnx(model, (x,), tmp_path / f"{kind}.onnx")
        assert [c.layer for c in result.layer_checks] == [n for n, _ in amct.quantized_layers(model).items()]
        assert all(c.ok for c in result.layer_checks)
        ops = {c.op for c in result.layer_checks}
        assert ops == ({"Conv"} if kind == "cnn" else {"MatMulNBits"})
        if kind == "cnn":
            proto = onnx.load(result.path)
            assert sum(n.op_type == "Pad" for n in proto.graph.node) == 3


def _verdicts(proto, ran, folded, x):
    """check_layers of `proto` on the values ONNX Runtime computed running `ran` (a graph whose kernels
    compute something else than `proto` says, as a wrong kernel would)."""
    from amct_pytorch.export.check import ort_session_from_proto

    sites = find_sites(proto, folded)
    sess = ort_session_from_proto(instrumented(ran, sites))
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x.numpy()})))
    return [c.ok for c in check_layers(proto, sites, values)]


def test_a_layer_that_pads_or_quantizes_its_input_otherwise_is_caught(tmp_path):
    import copy

    (cnn, x_cnn), (mlp, x_mlp) = _padded_cnn_and_level4_mlp()
    result = export_onnx(cnn, (x_cnn,), tmp_path / "cnn.onnx")
    proto = onnx.load(result.path)
    assert _verdicts(proto, proto, result.folded_weights, x_cnn) == [True, True, True]
    ran = copy.deepcopy(proto)
    pad = [n for n in ran.graph.node if n.op_type == "Pad"][0]
    next(a for a in pad.attribute if a.name == "mode").s = b"constant"  # zeros where the layer reflects
    assert _verdicts(proto, ran, result.folded_weights, x_cnn) == [False, True, True]

    result = export_onnx(mlp, (x_mlp,), tmp_path / "mlp.onnx")
    proto = onnx.load(result.path)
    assert _verdicts(proto, proto, result.folded_weights, x_mlp) == [True, True]
    ran = copy.deepcopy(proto)
    node = [n for n in ran.graph.node if n.op_type == "MatMulNBits"][1]
    next(a for a in node.attribute if a.name == "accuracy_level").i = 1  # float input, no int8 quantization
    assert _verdicts(proto, ran, result.folded_weights, x_mlp) == [True, False]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64",
                    reason="needs qemu-user (apt-get install qemu-user) on x86-64; .ci/run installs it")
def test_under_an_avx2_cpu_without_vnni_padded_convs_and_level4_are_exact(tmp_path):
    """MatMulNBits accuracy_level 4 quantizes its input with the AVX2 kernels there: the same codes."""
    for kind, (model, x) in zip(("cnn", "mlp"), _padded_cnn_and_level4_mlp()):
        assert _haswell_verdicts(model, x, tmp_path / f"{kind}.onnx") == [True] * (3 if kind == "cnn" else 2)


def test_asymmetric_padding_is_checked_and_an_unemulated_form_is_said(tmp_path):
    from onnx import helper

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 4, padding="same"), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    _calibrated(model, x, {})
    result = export_onnx(model, (x,), tmp_path / "same.onnx")  # pads [1, 1, 2, 2]
    assert [(c.layer, c.ok) for c in result.layer_checks] == [("0", True), ("2", True)]
    # the same conv written with auto_pad (ORT computes the same): the check cannot emulate it and says so
    proto = onnx.load(result.path)
    conv = [n for n in proto.graph.node if n.op_type == "Conv"][0]
    kept = [a for a in conv.attribute if a.name not in ("pads", "auto_pad")]
    del conv.attribute[:]
    conv.attribute.extend(kept + [helper.make_attribute("auto_pad", "SAME_UPPER")])
    onnx.save(proto, tmp_path / "auto.onnx")
    with pytest.warns(UserWarning, match=r"1 quantized layer\(s\) not checked layer by layer.*\['0'\]"):
        diff, checks = check_artifact(model, tmp_path / "auto.onnx", result.folded_weights, [(x,)])
    # layer 2 was still checked on ORT's own input; the final difference is reported, not bounded (a rounding
    # tie at layer 2's input, which float order decides, would move one code: no fixed bound holds on every CPU)
    assert [(c.layer, c.ok) for c in checks] == [("2", True)] and np.isfinite(diff)
