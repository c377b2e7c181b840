"""Deployment form of export_onnx, run in ONNX Runtime with its DEFAULT session options: dynamic
shapes (token encoders, CNNs), integer weight initializers (int8, packed INT4), the graphs ONNX
Runtime fuses, the bias, every conv class, autocast."""
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, numpy_helper

import amct_pytorch as amct
from amct_pytorch import LinearQAT, deploy_view, export_onnx
from amct_pytorch.export import int32_bias, module_qparams, ort_max_abs_diff

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

# Parity tolerance: ORT and PyTorch compute the same integer codes and the same float ops, in
# a different summation order: float32 rounding, ~1e-7 relative, on outputs of size O(1).
# 1e-5 leaves room for that and would still catch one activation step (>= 1e-3 here).
ATOL = 1e-5
# Rounding ties: ONNX computes round(x/s) + z, the training grid round(x/s + z); they differ by one
# code where x/s sits (within float rounding) on a .5 tie (tests/test_export.py measures ~1e-5 of
# codes with an odd offset). On inputs with tens of thousands of activations one such flip is
# expected; `tie_bound` is what one flip can move an output by.
W8 = {"retrain_weight_config": {"channel_wise": True}}
W4 = {"retrain_weight_config": {"dst_type": "INT4", "channel_wise": True}}
A4W4 = {"retrain_data_config": {"dst_type": "INT4"},
        "retrain_weight_config": {"dst_type": "INT4", "channel_wise": True}}


def tie_bound(model):
    """Max output change from one activation code flip in a feed-forward stack of QAT layers:
    sum over layers of s_x * (max row L1 norm of the layer's quantized weight) * (the same norm of
    every later layer); ReLU and mean pooling do not increase it."""
    norms, scales = [], []
    for m in model.modules():
        if isinstance(m, amct.QATModuleMixin):
            w = deploy_view(nn.Sequential(m))["0"].dequantized_weight()
            per_out = w.abs().transpose(0, 1) if getattr(m, "transposed", False) else w.abs()
            norms.append(float(per_out.reshape(per_out.shape[0], -1).sum(1).max()))
            scales.append(float(m.act_qparams()[0]))
    return sum(s * float(np.prod(norms[i:])) for i, s in enumerate(scales))


def assert_parity(model, inputs, path):
    """ORT (default options) vs PyTorch: float noise (ATOL) everywhere but at most a few tie flips."""
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})[0]
    with torch.no_grad():
        want = model(*inputs).numpy()
    diff = np.abs(got - want)
    assert (diff > ATOL).mean() <= 0.01 and diff.max() <= tie_bound(model), diff.max()


def initializers(proto):
    return {i.name: i for i in proto.graph.initializer}


def optimized_ops(path, tmp_path):
    """The op types of the graph ONNX Runtime runs with its default options."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = os.fspath(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


# ---- a token encoder: transformers BertModel, 2 layers, random weights --------------------------
class TokenEncoder(nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def tokens(batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, max(1, seq // 2):] = 0  # one padded row
    return ids, mask


# The encoder has no simple flip bound (LayerNorm, softmax): float noise is ~1e-6 on its O(1)
# outputs, a tie flip moves them by up to ~1e-4 (measured 8e-5 at sequence 64); one full INT4
# activation step through a 32-wide layer would be >= 1e-2.
ENCODER_ATOL = 1e-3


@pytest.fixture(scope="module")
def encoder():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128)
    model = TokenEncoder(transformers.BertModel(cfg, add_pooling_layer=False)).eval()
    amct.to_qat(model, W4)
    amct.calibrate(model, [tokens(8, 12, seed) for seed in range(1)], progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def encoder_export(encoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "encoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx(encoder, tokens(4, 10, 1), path, atol=ENCODER_ATOL,
                           check_inputs=[tokens(2, 3, 2), tokens(5, 17, 3), tokens(3, 40, 4)])


def test_token_encoder_runs_at_other_lengths(encoder, encoder_export):
    """Exported at (4, 10); batch and sequence are dynamic (one symbol shared by ids and mask)."""
    ids_dims, mask_dims = encoder_export.dynamic_dims
    assert all(isinstance(d, str) for d in ids_dims) and ids_dims[1] == mask_dims[1]
    assert encoder_export.max_abs_diff <= ENCODER_ATOL
    for batch, seq, seed in ((1, 7, 5), (6, 33, 6), (2, 64, 7)):
        assert ort_max_abs_diff(encoder, tokens(batch, seq, seed), encoder_export.path) <= ENCODER_ATOL


def test_token_encoder_int4_fuses_to_matmul_integer(encoder_export, tmp_path):
    """Per-channel INT4 weights (packed on disk, Cast to int8) run as MatMulIntegerToFloat."""
    ops = optimized_ops(encoder_export.path, tmp_path)
    assert ops.count("MatMulIntegerToFloat") == 12 and "DequantizeLinear" not in ops
    proto = onnx.load(encoder_export.path)
    inits = initializers(proto)
    for f in encoder_export.folded_weights:
        assert inits[f.name].data_type == TensorProto.INT4 and f.source not in inits
        assert f.int_bytes * 8 <= f.float_bytes  # 4 bits of 32


def test_static_dims_and_dynamic_shapes_passthrough(encoder, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pinned = export_onnx(encoder, tokens(4, 10, 1), tmp_path / "pinned.onnx", static_dims={0: [0], 1: [0]})
        assert [d[0] for d in pinned.dynamic_dims] == [4, 4] and isinstance(pinned.dynamic_dims[0][1], str)
        seq = torch.export.Dim("seq", min=2, max=64)
        bounded = export_onnx(encoder, tokens(4, 10, 1), tmp_path / "bounded.onnx",
                              dynamic_shapes=({1: seq}, {1: seq}), check_inputs=[tokens(4, 64, 8)],
                              atol=ENCODER_ATOL)
    (ids_batch, ids_seq), (_, mask_seq) = bounded.dynamic_dims
    assert ids_batch == 4 and isinstance(ids_seq, str) and ids_seq == mask_seq
    with pytest.raises(ValueError, match="static_dims"):
        export_onnx(encoder, tokens(4, 10, 1), tmp_path / "x.onnx", static_dims={0: [2]})
    with pytest.raises(ValueError, match="dynamic_shapes.*dynamo=True"):
        export_onnx(encoder, tokens(4, 10, 1), tmp_path / "x.onnx", dynamo=False, dynamic_shapes=({},))


# ---- a CNN ----------------------------------------------------------------------------------------
class CNN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c1 = amct.Conv2dQAT(3, 8, 3, padding=1, config=config)
        self.c2 = amct.Conv2dQAT(8, 8, 3, stride=2, config=config)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.c2(self.act(self.c1(x))).mean(dim=(2, 3))


def calibrated(model, *shape):
    torch.manual_seed(0)
    model.train()
    model(torch.randn(*shape))
    return model.eval()


@pytest.mark.parametrize("config", [{}, W8, W4], ids=["per_tensor", "per_channel", "w4"])
def test_cnn_runs_at_other_sizes(tmp_path, config):
    torch.manual_seed(0)
    model = calibrated(CNN(config), 4, 3, 16, 16)
    x = torch.randn(2, 3, 16, 16)
    result = export_onnx(model, x, tmp_path / "cnn.onnx", check=False)
    dims = result.dynamic_dims[0]
    assert dims[1] == 3 and all(isinstance(dims[d], str) for d in (0, 2, 3))
    for inputs in ((x,), (torch.randn(5, 3, 23, 31),), (torch.randn(1, 3, 9, 12),)):
        assert_parity(model, inputs, result.path)


CONV_CLASSES = [(amct.Conv1dQAT, 1, {}), (amct.Conv2dQAT, 2, {"padding": 1, "groups": 2}),
                (amct.Conv3dQAT, 3, {"dilation": 2, "padding": 2}), (amct.ConvTranspose1dQAT, 1, {"stride": 2}),
                (amct.ConvTranspose2dQAT, 2, {"stride": 2, "output_padding": 1}),
                (amct.ConvTranspose3dQAT, 3, {})]


@pytest.mark.parametrize("config", [{}, W8, W4, A4W4], ids=["per_tensor", "per_channel", "w4", "a4w4"])
@pytest.mark.parametrize("cls,nd,kwargs", CONV_CLASSES, ids=[c[0].__name__ for c in CONV_CLASSES])
def test_every_conv_class(tmp_path, cls, nd, kwargs, config):
    """Parity under ORT defaults at two sizes, integer weights whose codes equal deploy_view's."""
    torch.manual_seed(0)
    model = nn.Sequential(cls(4, 6, 3, config=config, **kwargs), nn.ReLU(), cls(6, 4, 3, config=config, **kwargs))
    calibrated(model, 2, 4, *[10] * nd)
    x = torch.randn(2, 4, *[8] * nd)
    result = export_onnx(model, x, tmp_path / "conv.onnx", check=False)
    for inputs in ((x,), (torch.randn(3, 4, *[11] * nd),)):
        assert_parity(model, inputs, result.path)
    assert all(isinstance(d, str) for i, d in enumerate(result.dynamic_dims[0]) if i != 1)
    onnx.checker.check_model(onnx.load(result.path), full_check=True)
    view = deploy_view(model)
    inits = initializers(onnx.load(result.path))
    assert [f.source for f in result.folded_weights] == ["0.weight", "2.weight"]
    for f, name in zip(result.folded_weights, ("0", "2")):
        codes = numpy_helper.to_array(inits[f.name]).astype(np.int32)
        assert f.perm is None and np.array_equal(codes, view[name].weight.numpy().astype(np.int32))
        bits = model.get_submodule(name).config.retrain_weight_config.num_bits
        assert f.bits == bits and f.int_bytes <= f.float_bytes * bits // 32 + 1


def test_grouped_transposed_per_channel_is_refused(tmp_path):
    torch.manual_seed(0)
    model = calibrated(nn.Sequential(amct.ConvTranspose2dQAT(4, 6, 3, groups=2, config=W8)), 2, 4, 6, 6)
    with pytest.raises(RuntimeError, match="grouped transposed conv.*channel_wise=False"):
        export_onnx(model, torch.randn(2, 4, 6, 6), tmp_path / "x.onnx")
    per_tensor = calibrated(nn.Sequential(amct.ConvTranspose2dQAT(4, 6, 3, groups=2)), 2, 4, 6, 6)
    x = torch.randn(2, 4, 6, 6)
    assert_parity(per_tensor, (x,), export_onnx(per_tensor, x, tmp_path / "y.onnx", check=False).path)


# ---- integer weights, file sizes, MatMulIntegerToFloat ----------------------------------------------
def mlp(config, width=256, depth=3):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [LinearQAT(width, width, config=config), nn.ReLU()]
    return calibrated(nn.Sequential(*layers), 32, width)


@pytest.mark.parametrize("config,bits", [({}, 8), (W8, 8), (W4, 4)], ids=["per_tensor", "per_channel", "w4"])
def test_integer_weights_sizes_codes_and_fusion(tmp_path, config, bits):
    model = mlp(config)
    x = torch.randn(16, 256)
    packed = export_onnx(model, x, tmp_path / "int.onnx")
    plain = export_onnx(model, x, tmp_path / "float.onnx", integer_weights=False)
    assert packed.max_abs_diff <= ATOL and plain.max_abs_diff <= ATOL
    weight_bytes = 3 * 256 * 256 * 4
    # the weights dominate both files: int8 = 1/4, INT4 = 1/8 of their float bytes
    saved = os.path.getsize(plain.path) - os.path.getsize(packed.path)
    assert saved >= weight_bytes * (1 - bits / 32) * 0.99
    onnx.checker.check_model(onnx.load(packed.path), full_check=True)
    onnx.checker.check_model(onnx.load(plain.path), full_check=True)
    view = deploy_view(model)
    inits = initializers(onnx.load(packed.path))
    for f in packed.folded_weights:
        assert f.int_bytes == 256 * 256 * bits // 8
        codes = numpy_helper.to_array(inits[f.name]).astype(np.int32).transpose(np.argsort(f.perm))
        assert np.array_equal(codes, view[f.source.rsplit(".", 1)[0]].weight.numpy().astype(np.int32))
    ops = optimized_ops(packed.path, tmp_path)
    assert ops.count("MatMulIntegerToFloat") == 3 and "Gemm" not in ops and "FusedGemm" not in ops


def test_relu_before_int4_quantizer_is_kept(tmp_path):
    """ONNX Runtime drops a Relu in front of an INT4 QuantizeLinear; export writes it as Max(x, 0)."""
    model = mlp(A4W4, width=32)
    assert any(int(m.act_qparams()[1]) > -8 for m in model.modules() if isinstance(m, LinearQAT))
    result = export_onnx(model, torch.randn(8, 32), tmp_path / "a4.onnx", check_inputs=[(torch.randn(40, 32) * 3,)])
    assert result.max_abs_diff <= ATOL
    ops = [n.op_type for n in onnx.load(result.path).graph.node]
    assert "Max" in ops


# ---- the bias --------------------------------------------------------------------------------------
FIXED_MIN = {"retrain_data_config": {"fixed_min": True}}


def test_float_bias_is_kept_under_ort_defaults(tmp_path):
    """Gemm/Conv biases after DequantizeLinear would be rounded to int32 by ORT's defaults; the export
    form (MatMul + Add, Conv + Add) keeps the trained float bias."""
    model = mlp(FIXED_MIN, width=64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearQAT):
                m.bias.normal_(0, 0.5)
    x = torch.randn(64, 64) * 2
    assert export_onnx(model, x, tmp_path / "b.onnx").max_abs_diff <= ATOL


def test_int32_bias_option(tmp_path):
    model = mlp(FIXED_MIN, width=64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearQAT):
                m.bias.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m0 = model[0]
    b32 = int32_bias(m0)
    q = module_qparams(m0)
    step = (q.act_scale * q.weight_scale).double()
    codes = b32.double() / step
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert float((b32 - m0.bias).abs().max()) <= float(step.max()) / 2 * 1.001
    x = torch.randn(64, 64) * 2
    result = export_onnx(model, x, tmp_path / "b32.onnx", bias="int32")
    assert result.max_abs_diff <= ATOL  # checked against the model with the int32-grid bias
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored bit for bit
    float_out = model(x).detach().numpy()
    got = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"]).run(None, {"input_0": x.numpy()})[0]
    assert np.abs(got - float_out).max() > ATOL  # the int32 bias does move the outputs
    with pytest.raises(ValueError, match="bias"):
        export_onnx(model, x, tmp_path / "x.onnx", bias="int16")


# ---- options ---------------------------------------------------------------------------------------
def test_autocast_is_off_during_export(tmp_path):
    model = mlp(W8, width=32)
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = export_onnx(model, x, tmp_path / "ac.onnx")
    assert result.max_abs_diff <= ATOL
    proto = onnx.load(result.path)
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_session_options_and_legacy_form(tmp_path):
    model = mlp(W8, width=32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    result = export_onnx(model, torch.randn(8, 32), tmp_path / "so.onnx", session_options=so)
    assert result.max_abs_diff <= ATOL
    legacy = export_onnx(model, torch.randn(8, 32), tmp_path / "legacy.onnx", integer_weights=False)
    proto = onnx.load(legacy.path)
    assert not legacy.folded_weights
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) == 6  # activations and weights


def test_simulated_int32_bias_passes_gradient_to_the_float_bias():
    from amct_pytorch.export import simulated_int32_bias

    m = mlp(FIXED_MIN, width=16)[0]
    b = simulated_int32_bias(m)
    assert torch.equal(b.detach(), int32_bias(m))
    b.sum().backward()
    assert torch.equal(m.bias.grad, torch.ones_like(m.bias))
    fresh = LinearQAT(4, 4)
    assert simulated_int32_bias(fresh) is fresh.bias  # not calibrated: the float bias


def test_size_one_example_dim_warns_and_is_fixed(tmp_path):
    model = mlp(W8, width=32)
    with pytest.warns(UserWarning, match="input_0 dim 0 has size 1"):
        result = export_onnx(model, torch.randn(1, 32), tmp_path / "one.onnx")
    assert result.dynamic_dims == ((1, 32),)
