"""Group-wise weight scales (extension): retrain_weight_config.group_size for LinearQAT.

One scale per output row and block of `group_size` consecutive input features, for ARQ and
ULQ weights, exact in the forward, the quant record and the deploy view.
"""
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


@pytest.mark.parametrize("bits", ["INT4", "INT8"])
def test_group_wise_export_runs_in_onnx_runtime_with_integer_blocked_weights(tmp_path, bits):
    import amct_pytorch as amct

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    to_qat(model, _cfg(16, bits, "ulq_quantize"))
    model.train()
    for _ in range(2):
        model(torch.randn(16, 64)).sum().backward()
    model.eval()
    result = amct.export_onnx(model, (torch.randn(5, 64),), tmp_path / "g.onnx",
                              check_inputs=[(torch.randn(9, 64),)])
    assert result.max_abs_diff <= 1e-5
    graph = onnx.load(tmp_path / "g.onnx").graph
    blocked = [n for n in graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 16 for a in n.attribute)]
    assert len(blocked) == 2
    inits = {i.name: i for i in graph.initializer}
    view = deploy_view(model)
    for f in result.folded_weights:
        codes = onnx.numpy_helper.to_array(inits[f.name]).astype("int8")
        want = view[f.source.rsplit(".", 1)[0]].weight.numpy()
        assert (codes == want).all()
        assert f.int_bytes * (8 // int(bits[3:])) <= f.float_bytes / 4 + 8


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
