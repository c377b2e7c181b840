"""EmbeddingQAT (extension): weight-only quantization of embedding tables."""
import io

import pytest
import torch
import torch.nn as nn

from amct_pytorch import EmbeddingQAT, LinearQAT, disable_quantization, enable_quantization, qat_layers, to_float, to_qat
from amct_pytorch.functional import lsq_scale_grad, rows_layout

W = "retrain_weight_config"
PER_ROW = {W: {"channel_wise": True}}
ULQ = {W: {"channel_wise": True, "weights_retrain_algo": "ulq_quantize", "dst_type": "INT4"}}


def _ids(seed=0, vocab=50):
    return torch.randint(0, vocab, (4, 9), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [{}, PER_ROW, ULQ])
def test_lookup_equals_the_fake_quantized_table(config):
    torch.manual_seed(0)
    m = EmbeddingQAT(50, 16, config=config).train()
    ids = _ids()
    y = m(ids)
    assert torch.equal(y, m.fake_quantized_weight()[ids])
    m.eval()
    assert torch.equal(m(ids), m.fake_quantized_weight()[ids])


def test_gradients_are_straight_through_and_lsq_like_every_qat_weight():
    torch.manual_seed(1)
    m = EmbeddingQAT(30, 8, config=ULQ).train()
    ids = torch.tensor([[1, 2, 2, 7], [7, 0, 3, 1]])
    m(ids)  # initialises the scales
    g = torch.randn(2, 4, 8)
    m.zero_grad()
    m(ids).backward(g)
    # reference: the table's gradient (rows scattered) through LinearQAT's LSQ formula
    grad_table = torch.zeros(30, 8).index_add_(0, ids.reshape(-1), g.reshape(-1, 8))
    assert torch.equal(m.weight.grad, grad_table)  # straight-through
    want = lsq_scale_grad(m.weight.detach(), grad_table, m.wts_scales.detach().abs(), 4, rows_layout((30, 8)))
    torch.testing.assert_close(m.wts_scales.grad, want, rtol=1e-5, atol=1e-7)


def test_padding_idx_row_gets_no_gradient():
    m = EmbeddingQAT(10, 4, padding_idx=0, config=PER_ROW).train()
    m(torch.tensor([0, 0, 3])).sum().backward()
    assert m.weight.grad[0].abs().sum() == 0 and m.weight.grad[3].abs().sum() > 0


def test_from_float_shares_the_table_and_state_round_trips():
    emb = nn.Embedding(20, 6)
    m = EmbeddingQAT.from_float(emb, ULQ).train()
    assert m.weight is emb.weight and type(m.to_float()) is nn.Embedding and m.to_float().weight is emb.weight
    m(_ids(vocab=20)).sum().backward()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = EmbeddingQAT(20, 6, config=ULQ)
    fresh.load_state_dict(torch.load(buf))
    m.eval(), fresh.eval()
    assert torch.equal(fresh(_ids(3, 20)), m(_ids(3, 20)))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(config={"retrain_data_config": {"batch_num": 2}}), ValueError, "quantizes its table only"),
    (dict(config={W: {"channel_wise": True, "group_size": 16}}), ValueError, "not group-wise"),
    (dict(max_norm=1.0), ValueError, "max_norm"),
    (dict(sparse=True), ValueError, "sparse"),
    (dict(dtype=torch.float16), TypeError, "only torch.float32"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        EmbeddingQAT(10, 4, **kwargs)


def test_bad_ids():
    m = EmbeddingQAT(10, 4)
    with pytest.raises(TypeError, match="int64 or int32 token ids"):
        m(torch.zeros(3))


def test_to_qat_converts_embeddings_only_when_asked():
    model = nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 4))
    to_qat(model)
    assert type(model[0]) is nn.Embedding and type(model[1]) is LinearQAT
    model = nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 4))
    to_qat(model, layer_types=[nn.Linear, nn.Embedding], overrides={"0": PER_ROW})
    assert type(model[0]) is EmbeddingQAT and set(qat_layers(model)) == {"0", "1"}
    assert disable_quantization(model) == 2 and enable_quantization(model) == 2
    assert to_float(model) == ["0", "1"] and type(model[0]) is nn.Embedding


def test_export_gathers_int8_rows_and_scales(tmp_path):
    onnx = pytest.importorskip("onnx")
    import amct_pytorch as amct

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(500, 32), nn.Linear(32, 8)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    torch.manual_seed(7)
    model = Encoder()
    to_qat(model, layer_types=[nn.Linear, nn.Embedding], overrides={"emb": PER_ROW})
    amct.calibrate(model, [torch.randint(0, 500, (4, 9))], progress=False)
    model.eval()
    result = amct.export_onnx(model, (torch.randint(0, 500, (2, 5)),), tmp_path / "e.onnx",
                              check_inputs=[(torch.randint(0, 500, (3, 13)),)])
    # the same x̂ and ŵ; only the final matmul may sum in another order
    assert result.max_abs_diff <= 1e-5
    graph = onnx.load(tmp_path / "e.onnx").graph
    ops = [n.op_type for n in graph.node]
    assert ops[:2] == ["Gather", "Cast"] and "Mul" in ops  # rows first, then dequantized
    tables = [i for i in graph.initializer if list(i.dims) == [500, 32]]
    assert len(tables) == 1 and tables[0].data_type == onnx.TensorProto.INT8
    codes, scale = model.emb.quantized_table()
    assert (onnx.numpy_helper.to_array(tables[0]) == codes.numpy()).all()


class _HostSyncCounter:
    """Counts the tensor-to-Python conversions (each a device sync on an accelerator)."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("__bool__", "item", "__int__", "__float__", "tolist", "__index__"):
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(t, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("channel_wise", [False, True])
def test_learnable_scale_forward_makes_no_host_sync_after_its_first_step(monkeypatch, channel_wise):
    # the scale's readiness has a host mirror (QATLayer's weight quantizer), as every QAT layer's
    emb = EmbeddingQAT(50, 16, config={"retrain_weight_config": {"weights_retrain_algo": "ulq_quantize",
                                                                  "channel_wise": channel_wise}})
    ids = torch.randint(0, 50, (4, 7))
    emb(ids).sum().backward()  # the first training forward initialises the scale
    counter = _HostSyncCounter(monkeypatch)
    for _ in range(3):
        emb(ids).sum().backward()  # training
    emb.eval()
    with torch.no_grad():
        emb(ids)  # eval
    assert counter.calls == [], counter.calls
    monkeypatch.undo()
    # the counter sees a conversion where there is one
    counter = _HostSyncCounter(monkeypatch)
    bool(emb.wts_scale_ready)
    assert counter.calls == ["__bool__"]
