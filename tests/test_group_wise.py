"""Group-wise weight scales (extension): retrain_weight_config.group_size for LinearQAT.

One scale per output row and block of `group_size` consecutive input features, for ARQ and
ULQ weights, exact in the forward, the quant record and the deploy view.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

from amct_pytorch import Conv2dQAT, LinearQAT, deploy_view, load_quant_record, parse_config, save_quant_record, to_qat
from amct_pytorch.functional import fake_quant_act

W = "retrain_weight_config"


def _cfg(group=32, bits="INT4", algo="arq_retrain"):
    return {W: {"dst_type": bits, "channel_wise": True, "group_size": group, "weights_retrain_algo": algo}}


def _reference_wq(w, group, bits):
    qmax = 2 ** (bits - 1) - 1
    blocks = w.reshape(w.shape[0], -1, group)
    hi, lo = blocks.amax(-1, keepdim=True), blocks.amin(-1, keepdim=True)
    neg = lo.abs() > hi.abs()
    scale = torch.where(neg, lo.abs() / (qmax + 1), hi.abs() / qmax)
    return (torch.round(blocks / scale).clamp(-qmax - 1, qmax) * scale).reshape(w.shape), scale.reshape(-1)


@pytest.mark.parametrize("group, bits", [(16, 4), (32, 4), (64, 8)])
def test_arq_forward_uses_one_scale_per_row_and_group(group, bits):
    torch.manual_seed(0)
    m = LinearQAT(64, 8, config=_cfg(group, f"INT{bits}")).train()
    x = torch.randn(5, 64)
    m(x).sum().backward()  # calibration call
    wq, scale = _reference_wq(m.weight.detach(), group, bits)
    assert m.wts_scales.shape == (8 * 64 // group,)
    assert torch.equal(m.wts_scales, scale)
    m.eval()
    a_scale, a_offset = m.act_qparams()
    want = torch.nn.functional.linear(fake_quant_act(x, a_scale, a_offset, 8), wq, m.bias)
    torch.testing.assert_close(m(x), want, rtol=0, atol=1e-6)


def test_group_wise_is_finer_than_per_channel_on_outliers():
    torch.manual_seed(1)
    lin = nn.Linear(128, 16)
    with torch.no_grad():
        lin.weight[:, 3] *= 20  # one outlier column: per-channel scales follow it for the whole row
    errors = {}
    for name, cfg in {"channel": {W: {"dst_type": "INT4", "channel_wise": True}}, "group": _cfg(32)}.items():
        m = LinearQAT.from_float(lin, cfg)
        errors[name] = float((m._cached_weight()[1] - lin.weight).square().mean())
    assert errors["group"] < errors["channel"] / 2


def test_ulq_group_scales_learn():
    torch.manual_seed(2)
    m = LinearQAT(32, 4, config=_cfg(16, algo="ulq_quantize")).train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    x, target = torch.randn(16, 32), torch.randn(16, 4)
    m(x)
    start = m.wts_scales.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), target).backward()
        assert m.wts_scales.grad.shape == (8,) and torch.isfinite(m.wts_scales.grad).all()
        opt.step()
    assert not torch.equal(start, m.wts_scales.detach())


def test_record_and_deploy_view_are_exact(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(LinearQAT(64, 8, config=_cfg(16, algo="ulq_quantize")))
    model.train()
    model(torch.randn(4, 64)).sum().backward()
    model.eval()
    view = deploy_view(model)["0"]
    wq, _ = _reference_wq(model[0].weight.detach(), 16, 4)
    assert view.weight.shape == (8, 64) and int(view.weight.abs().max()) <= 8
    torch.testing.assert_close(view.dequantized_weight(), model[0]._cached_weight()[1], rtol=0, atol=0)
    record = save_quant_record(model, tmp_path / "q.json")
    assert record["layers"]["0"]["group_size"] == 16 and len(record["layers"]["0"]["scale_w"]) == 32
    fresh = nn.Sequential(LinearQAT(64, 8, config=_cfg(16, algo="ulq_quantize")))
    fresh[0].weight, fresh[0].bias = model[0].weight, model[0].bias
    load_quant_record(fresh, tmp_path / "q.json")
    fresh.eval()
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))
    other = nn.Sequential(LinearQAT(64, 8, config=_cfg(32, algo="ulq_quantize")))
    with pytest.raises(ValueError, match="group_size: the record has 16, but the model's layer has 32"):
        load_quant_record(other, tmp_path / "q.json")


def test_state_dict_round_trip():
    torch.manual_seed(4)
    m = LinearQAT(32, 4, config=_cfg(16)).train()
    m(torch.randn(4, 32))
    fresh = LinearQAT(32, 4, config=_cfg(16))
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(2, 32)
    m.eval(), fresh.eval()
    assert torch.equal(m(x), fresh(x))


@pytest.mark.parametrize("weight_cfg, error, match", [
    ({"group_size": 32}, ValueError, "need channel_wise=True"),
    ({"group_size": 24, "channel_wise": True}, ValueError, "power of two >= 16.*got 24"),
    ({"group_size": 8, "channel_wise": True}, ValueError, "got 8"),
    ({"group_size": 32.0, "channel_wise": True}, TypeError, "as an int, got 32.0"),
    ({"group_size": True, "channel_wise": True}, TypeError, "got True"),
])
def test_bad_group_size_is_a_config_error(weight_cfg, error, match):
    with pytest.raises(error, match=r"retrain_weight_config.group_size.*" + match):
        parse_config({W: weight_cfg})


def test_group_size_must_divide_in_features_and_is_refused_for_convs():
    with pytest.raises(ValueError, match="group_size=32 does not divide in_features=48"):
        LinearQAT(48, 4, config=_cfg(32))
    with pytest.raises(ValueError, match="group-wise weight scales are supported for LinearQAT only"):
        Conv2dQAT(64, 4, 3, config=_cfg(32))
    model = nn.Sequential(nn.Conv2d(3, 64, 1), nn.Flatten(), nn.Linear(64, 4))
    with pytest.raises(ValueError, match="LinearQAT only"):
        to_qat(model, _cfg(32))
    assert type(model[0]) is nn.Conv2d  # validated before anything was swapped
    to_qat(model, {W: {"channel_wise": True}}, overrides={"2": _cfg(32)})
    assert model[2].config.retrain_weight_config.group_size == 32


def test_config_round_trips_with_and_without_group_size():
    for cfg in ({}, _cfg(64)):
        parsed = parse_config(cfg)
        assert parse_config(parsed.to_dict()) == parsed
    assert "group_size" not in parse_config({}).to_dict()[W]


onnx = pytest.importorskip("onnx")


@pytest.mark.parametrize("bits, form", [("INT4", "matmulnbits"), ("INT4", "qdq"), ("INT8", "matmulnbits")])
def test_group_wise_export_runs_in_onnx_runtime_with_integer_blocked_weights(tmp_path, bits, form):
    """2-D inputs (the exporter's Gemm). INT4: MatMulNBits (default) or the blocked Q/DQ form; INT8
    group-wise weights keep the blocked Q/DQ form in either case."""
    import amct_pytorch as amct
    from amct_pytorch.export import matmulnbits_codes

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    to_qat(model, _cfg(16, bits, "ulq_quantize"))
    model.train()
    for _ in range(2):
        model(torch.randn(16, 64)).sum().backward()
    model.eval()
    result = amct.export_onnx(model, (torch.randn(5, 64),), tmp_path / "g.onnx",
                              check_inputs=[(torch.randn(9, 64),)], group_wise_int4=form)
    assert result.max_abs_diff <= 1e-5
    graph = onnx.load(tmp_path / "g.onnx").graph
    blocked = [n for n in graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 16 for a in n.attribute)]
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    fused = bits == "INT4" and form == "matmulnbits"
    assert (len(blocked), len(nbits)) == ((0, 2) if fused else (2, 0))
    inits = {i.name: i for i in graph.initializer}
    view = deploy_view(model)
    for f in result.folded_weights:
        stored = onnx.numpy_helper.to_array(inits[f.name])
        codes = matmulnbits_codes(stored) if fused else stored.astype("int8")
        assert f.format == ("matmulnbits" if fused else "qdq")
        want = view[f.source.rsplit(".", 1)[0]].weight.numpy()
        assert (codes == want).all()
        assert f.int_bytes * (8 // int(bits[3:])) <= f.float_bytes / 4 + 8


def _linear_bound(m, x):
    """Per output element: how far two float32 evaluations of the eval forward x̂ @ Ŵᵀ + b (x̂, Ŵ the
    quantized activation and weight, exactly representable) can differ: K products and the bias,
    summed in any order (tests/float_bounds.py)."""
    from float_bounds import linear_tolerance

    a_scale, a_offset = m.act_qparams()
    xq = fake_quant_act(x, a_scale, a_offset, 8)
    wq = deploy_view(nn.Sequential(m))["0"].dequantized_weight()
    return linear_tolerance(xq, wq, m.bias).numpy()


@pytest.mark.parametrize("group", [16, 32])
@pytest.mark.parametrize("bias", [True, False])
def test_matmulnbits_form_equals_the_eval_forward(tmp_path, group, bias):
    """Group-wise INT4 -> one MatMulNBits (float32 compute) behind the activation Q/DQ: ORT's output
    equals the PyTorch eval output up to float32 summation order, at several batch/sequence sizes;
    the weight is stored packed at 1/8 of its float bytes, no float copy left."""
    import amct_pytorch as amct
    from amct_pytorch.export import ort_session

    torch.manual_seed(7 + group + bias)
    k, n = 128, 24
    m = LinearQAT(k, n, bias=bias, config=_cfg(group, algo="ulq_quantize")).train()
    for _ in range(2):
        m(torch.randn(4, 9, k)).sum().backward()
    m.eval()
    path = tmp_path / "nbits.onnx"
    result = amct.export_onnx(m, (torch.randn(2, 5, k),), path)
    assert result.max_abs_diff <= 1e-5
    assert all(isinstance(d, str) for d in result.dynamic_dims[0][:2])  # batch and sequence dynamic
    session = ort_session(path)
    for shape in [(3, 7), (1, 1), (6, 33)]:
        x = torch.randn(*shape, k) * 2
        got = session.run(None, {"input_0": x.numpy()})[0]
        with torch.no_grad():
            want = m(x).numpy()
        assert got.shape == want.shape
        assert (np.abs(got - want) <= _linear_bound(m, x)).all(), (shape, np.abs(got - want).max())

    proto = onnx.load(path)
    nodes = [nd for nd in proto.graph.node if nd.op_type == "MatMulNBits"]
    assert len(nodes) == 1 and nodes[0].domain == "com.microsoft"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["accuracy_level"] <= 1 and (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]) == \
        (k, n, 4, group)
    # the activation's Q/DQ, the MatMulNBits, the bias Add: no weight DequantizeLinear, MatMul or Gemm
    ops = [nd.op_type for nd in proto.graph.node]
    assert ops == ["QuantizeLinear", "DequantizeLinear", "MatMulNBits"] + ["Add"] * bias, ops
    floats = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert max(int(np.prod(i.dims)) for i in floats) < k * n / 8  # scales, bias, activation factors only
    (f,) = result.folded_weights
    assert f.int_bytes * 8 == f.float_bytes == k * n * 4
    # the stored tensors: packed codes (1/8 of float) + one float32 scale per block + the bias + the
    # activation factors (the rest of the file is the graph: names, the exporter's node metadata)
    scale_bytes = n * (k // group) * 4
    stored = sum(i.ByteSize() for i in proto.graph.initializer)
    assert stored <= f.float_bytes / 8 + scale_bytes + n * 4 * bias + 64 * len(proto.graph.initializer)


def test_group_wise_int4_forms_and_errors(tmp_path):
    """"qdq" keeps the standard-ONNX form (no com.microsoft op), as does integer_weights=False; an
    unknown form is a ValueError."""
    import amct_pytorch as amct

    torch.manual_seed(8)
    m = LinearQAT(64, 8, config=_cfg(32)).train()
    m(torch.randn(4, 3, 64))
    m.eval()
    x = (torch.randn(2, 3, 64),)
    for kwargs in ({"group_wise_int4": "qdq"}, {"integer_weights": False}):
        amct.export_onnx(m, x, tmp_path / "q.onnx", **kwargs)
        proto = onnx.load(tmp_path / "q.onnx")
        assert "MatMulNBits" not in {nd.op_type for nd in proto.graph.node}
        assert all(o.domain in ("", "ai.onnx") for o in proto.opset_import)
    with pytest.raises(ValueError, match="group_wise_int4"):
        amct.export_onnx(m, x, tmp_path / "bad.onnx", group_wise_int4="int4")


def test_group_wise_export_of_a_token_encoder_at_other_lengths(tmp_path):
    import amct_pytorch as amct

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(50, 32), nn.Linear(32, 16)

        def forward(self, ids):
            return self.fc(self.emb(ids)).mean(1)

    torch.manual_seed(6)
    model = Encoder()
    to_qat(model, _cfg(16))
    amct.calibrate(model, [torch.randint(0, 50, (4, 9))], progress=False)
    model.eval()
    result = amct.export_onnx(model, (torch.randint(0, 50, (2, 6)),), tmp_path / "e.onnx",
                              check_inputs=[(torch.randint(0, 50, (3, 17)),)])
    assert result.max_abs_diff <= 1e-5


def test_plain_torch_onnx_export_refuses_group_wise_clearly(tmp_path):
    m = LinearQAT(32, 4, config=_cfg(16)).train()
    m(torch.randn(4, 32))
    m.eval()
    with pytest.raises(Exception, match="blocked"):
        torch.onnx.export(m, (torch.randn(2, 32),), str(tmp_path / "p.onnx"), dynamo=False)
