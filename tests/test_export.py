"""ONNX QDQ export run for real in ONNX Runtime's CPU provider: parity, graph shape, state, errors."""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from amct_pytorch import LinearQAT, deploy_view, export_onnx
from amct_pytorch.export import ORT_DISABLED_OPTIMIZERS, module_qparams, ort_max_abs_diff
from amct_pytorch.functional import fake_quant_weight, int_range, quantize_act

CONFIGS = {
    "per_tensor": {},
    "per_channel": {"retrain_weight_config": {"channel_wise": True}},
    "int4": {"retrain_data_config": {"dst_type": "INT4"},
             "retrain_weight_config": {"dst_type": "INT4", "channel_wise": True}},
    "int4_per_tensor": {"retrain_data_config": {"dst_type": "INT4"}, "retrain_weight_config": {"dst_type": "INT4"}},
    "int8_act_int4_weight": {"retrain_weight_config": {"dst_type": "INT4", "channel_wise": True}},
    "fixed_min": {"retrain_data_config": {"fixed_min": True}},
    "ulq": {"retrain_weight_config": {"weights_retrain_algo": "ulq_quantize"}},
}
ATOL = 1e-5
# the TorchScript exporter is deprecated and its tracer warns about the Python-side shape checks
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1, self.act, self.fc2 = LinearQAT(16, 32, config=config), nn.ReLU(), LinearQAT(32, 8, config=config)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Token-wise MLP with a residual on (batch, seq, features) input."""

    def __init__(self, config):
        super().__init__()
        self.up, self.act, self.down = LinearQAT(12, 24, config=config), nn.GELU(), LinearQAT(24, 12, config=config)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


def example(kind, batch=4, seq=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, generator=g) if kind == "mlp" else torch.randn(batch, seq, 12, generator=g)


def trained(config, kind, seed=0):
    """Calibrate, take a few SGD steps, then one training forward so the stored buffers are current."""
    torch.manual_seed(seed)
    model = (MLP if kind == "mlp" else Block)(config).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(4):
        out = model(example(kind, batch=16, seed=100 + step))
        if step < 3:
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
    return model.eval()


def state_bytes(model):
    return {k: (v.dtype, tuple(v.shape), v.detach().cpu().numpy().tobytes()) for k, v in model.state_dict().items()}


CASES = [(c, k, e) for c in CONFIGS for k in ("mlp", "3d") for e in ("dynamo", "torchscript")
         if not ("int4" in c and e == "torchscript")]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def exported(request, tmp_path_factory):
    config, kind, exporter = request.param
    model = trained(CONFIGS[config], kind)
    before = state_bytes(model)
    path = tmp_path_factory.mktemp("onnx") / f"{config}_{kind}_{exporter}.onnx"
    result = export_onnx(model, (example(kind),), path, dynamo=exporter == "dynamo")
    return dict(config=config, kind=kind, exporter=exporter, model=model, before=before, result=result,
                proto=onnx.load(result.path))


# ---- graph inspection helpers ------------------------------------------------------------
def constants(proto):
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def qdq_pairs(proto):
    """[(QuantizeLinear, DequantizeLinear)] in graph order; each Q must feed exactly one DQ."""
    consumers = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pairs = []
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            users = consumers.get(node.output[0], [])
            assert [u.op_type for u in users] == ["DequantizeLinear"], users
            pairs.append((node, users[0]))
    return pairs


def layers(model):
    return [m for m in model.modules() if isinstance(m, LinearQAT)]


def ort_codes(proto, x):
    """Run the graph with every QuantizeLinear output exposed (cast to int32): the integer codes."""
    proto = copy.deepcopy(proto)
    names = []
    for q, _ in qdq_pairs(proto):
        names.append(q.output[0] + "_codes")
        proto.graph.node.append(helper.make_node("Cast", [q.output[0]], [names[-1]], to=TensorProto.INT32))
        proto.graph.output.append(helper.make_tensor_value_info(names[-1], TensorProto.INT32, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS))
    outs = session.run(names, {session.get_inputs()[0].name: x.numpy()})
    return outs


def layer_inputs(model, x):
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach())) for m in layers(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


# ---- parity ---------------------------------------------------------------------------------
def test_ort_matches_pytorch_eval(exported):
    model, kind = exported["model"], exported["kind"]
    assert exported["result"].max_abs_diff <= ATOL
    # dynamic batch / sequence: other sizes than the example run in the same file
    other = example(kind, batch=9, seq=3, seed=7)
    assert ort_max_abs_diff(model, (other,), exported["result"].path) <= ATOL
    dims = [d.dim_param or d.dim_value for d in exported["proto"].graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims[:-1]) and dims[-1] == (16 if kind == "mlp" else 12)


def test_integer_codes_identical(exported):
    """Activation codes ORT computes, and the integer weight initializers, equal PyTorch's / deploy_view's."""
    model, proto = exported["model"], exported["proto"]
    x = example(exported["kind"], batch=64, seq=8, seed=3)
    codes = ort_codes(proto, x)
    inputs = layer_inputs(model, x)
    values = constants(proto)
    folded = exported["result"].folded_weights  # in graph order: one per layer
    view = deploy_view(model)
    for i, (name, m) in enumerate(named_layers(model)):
        q = module_qparams(m)
        want_act = quantize_act(inputs[i], q.act_scale, q.act_offset.float(), q.act_bits)
        # a 2-D input goes through the quantizer as (1, M, K) (see fold_weight_quantizers)
        assert np.array_equal(codes[i].reshape(want_act.shape), want_act.numpy().astype(np.int32))
        f = folded[i]
        if exported["exporter"] == "dynamo":
            assert f.source == f"{name}.weight"
        stored = values[f.name].astype(np.int32)
        if f.perm is not None:
            stored = stored.transpose(np.argsort(f.perm))
        assert np.array_equal(stored, view[name].weight.numpy().astype(np.int32))


def named_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LinearQAT)]


def test_one_qdq_pair_per_activation_and_integer_weights(exported):
    """Each layer: a Q/DQ pair on its input; its weight is an integer initializer feeding a DequantizeLinear
    (INT4: through Cast to int8). The scales and zero points are the eval forward's factors."""
    model, proto = exported["model"], exported["proto"]
    values = constants(proto)
    pairs = qdq_pairs(proto)
    qat = layers(model)
    assert len(pairs) == len(qat)  # activations only: the weights are stored as codes
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) == 2 * len(qat)
    producers = {o: n for n in proto.graph.node for o in n.output}
    weight_dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                  and (n.input[0] in values or producers.get(n.input[0]) is not None
                       and producers[n.input[0]].op_type == "Cast")]
    assert len(weight_dqs) == len(qat)
    folded = exported["result"].folded_weights
    assert len(folded) == len(qat)
    for i, m in enumerate(qat):
        qa, dqa = pairs[i]
        dqw = weight_dqs[i]
        assert list(qa.input[1:]) == list(dqa.input[1:])  # the pair shares scale and zero point
        scale_a, zp_a = m.act_qparams()
        assert values[qa.input[1]].shape == () and values[qa.input[1]] == scale_a.item() == m.acts_scale.item()
        assert int(values[qa.input[2]]) == int(zp_a) == int(m.acts_offset)
        w_scale, w_zp = values[dqw.input[1]], values[dqw.input[2]]
        np.testing.assert_array_equal(w_scale.reshape(-1), m.wts_scales.detach().numpy())
        f = folded[i]
        # int8 codes with zero point 0, or uint8 codes + 128 with zero point 128 where a pair of the codes
        # could saturate ORT's u8s8 kernel on CPUs without VNNI (export/storage.py)
        shift = 128 if f.storage == "uint8" else 0
        np.testing.assert_array_equal(w_zp.reshape(-1).astype(np.int32) - shift, m.wts_offsets.numpy())
        axis = {a.name: a.i for a in dqw.attribute}.get("axis")
        if m.config.retrain_weight_config.channel_wise:
            assert axis == f.axis and w_scale.shape == (m.out_features,)
            assert values[f.name].shape[axis] == m.out_features
        else:
            assert w_scale.shape == () and f.axis is None
        zp_type = {4: TensorProto.INT4, 8: TensorProto.INT8}
        assert proto_type(proto, qa.input[2]) == zp_type[m.config.retrain_data_config.num_bits]
        stored = TensorProto.UINT8 if f.storage == "uint8" else zp_type[m.config.retrain_weight_config.num_bits]
        assert proto_type(proto, f.name) == stored
        # INT4 codes reach it through Cast(to=INT8)
        assert proto_type(proto, dqw.input[2]) == (TensorProto.UINT8 if f.storage == "uint8" else TensorProto.INT8)
        assert f.int_bytes * (32 // f.bits) <= f.float_bytes + 32 // f.bits


def proto_type(proto, name):
    for init in proto.graph.initializer:
        if init.name == name:
            return init.data_type
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return node.attribute[0].t.data_type
    raise KeyError(name)


def test_export_leaves_state_untouched(exported):
    assert state_bytes(exported["model"]) == exported["before"]
    assert all(not m.training for m in exported["model"].modules())


# ---- plain torch.onnx.export -----------------------------------------------------------------
@pytest.mark.parametrize("dynamo", [False, True])
def test_plain_torch_onnx_export(tmp_path, dynamo):
    model = trained(CONFIGS["per_channel"], "3d")
    before = state_bytes(model)
    x = example("3d")
    path = tmp_path / "plain.onnx"
    kwargs = {"input_names": ["x"], "dynamic_axes": {"x": {0: "batch", 1: "seq"}}} if not dynamo else {}
    torch.onnx.export(model, (x,), path, dynamo=dynamo, **kwargs)
    proto = onnx.load(path)
    assert len(qdq_pairs(proto)) == 4
    assert ort_max_abs_diff(model, (x,), path) <= ATOL
    if not dynamo:
        assert ort_max_abs_diff(model, (example("3d", batch=2, seq=11),), path) <= ATOL
    assert state_bytes(model) == before


def test_plain_dynamo_dynamic_shapes_is_a_clear_error(tmp_path):
    model = trained({}, "mlp")
    batch = torch.export.Dim("batch")
    with pytest.raises(Exception, match="dynamic shapes is not supported.*export_onnx"):
        torch.onnx.export(model, (example("mlp"),), tmp_path / "x.onnx", dynamo=True,
                          dynamic_shapes=({0: batch},))


@pytest.mark.parametrize("dynamo", [False, True])
def test_plain_export_of_int4_is_a_clear_error(tmp_path, dynamo):
    model = trained(CONFIGS["int4"], "mlp")
    with pytest.raises(Exception, match="INT4 needs opset-21.*export_onnx"):
        torch.onnx.export(model, (example("mlp"),), tmp_path / "x.onnx", dynamo=dynamo)


# ---- errors ------------------------------------------------------------------------------------
def uncalibrated():
    torch.manual_seed(0)
    model = MLP({"retrain_data_config": {"batch_num": 2}}).train()
    model(example("mlp"))  # one of two calibration batches
    return model.eval()


@pytest.mark.parametrize("how", ["helper", "torchscript", "dynamo"])
def test_uncalibrated_export_is_an_error(tmp_path, how):
    model = uncalibrated()
    before = state_bytes(model)
    with pytest.raises(Exception, match=r"calibration has not finished \(it needs batch_num=2"):
        if how == "helper":
            export_onnx(model, example("mlp"), tmp_path / "x.onnx")
        else:
            torch.onnx.export(model, (example("mlp"),), tmp_path / "x.onnx", dynamo=how == "dynamo")
    assert state_bytes(model) == before and not model.fc1.is_calibrated


def test_training_mode(tmp_path):
    model = trained({}, "mlp").train()
    before = state_bytes(model)
    with pytest.raises(RuntimeError, match=r"training mode; call model.eval\(\)"):
        export_onnx(model, example("mlp"), tmp_path / "x.onnx")
    with pytest.raises(Exception, match=r"training mode; call model.eval\(\)"):
        torch.onnx.export(model, (example("mlp"),), tmp_path / "x.onnx", dynamo=True)
    # the TorchScript exporter switches to eval for the export itself (training=EVAL) and back
    torch.onnx.export(model, (example("mlp"),), tmp_path / "ts.onnx", dynamo=False)
    assert model.training and model.fc1.training and state_bytes(model) == before
    assert len(qdq_pairs(onnx.load(tmp_path / "ts.onnx"))) == 4


def test_helper_argument_errors(tmp_path):
    model = trained({}, "mlp")
    with pytest.raises(TypeError, match="example_inputs"):
        export_onnx(model, [1.0], tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="atol"):
        export_onnx(model, example("mlp"), tmp_path / "x.onnx", atol=-1.0)
    with pytest.raises(TypeError, match="path"):
        export_onnx(model, example("mlp"), 3)
    with pytest.raises(ValueError, match="dynamo=False.*INT4"):
        export_onnx(trained(CONFIGS["int4"], "mlp"), example("mlp"), tmp_path / "x.onnx", dynamo=False)


class ExportsDifferently(nn.Module):
    """Adds 1e-3 in eager mode only, so the exported graph differs from the PyTorch output."""

    def __init__(self):
        super().__init__()
        self.fc = trained({}, "mlp")

    def forward(self, x):
        return self.fc(x) + (0.0 if torch.onnx.is_in_onnx_export() else 1e-3)


def test_helper_raises_when_ort_differs(tmp_path):
    model = ExportsDifferently().eval()
    # the float op after the last quantized layer differs (+1e-3 in eager mode only): named as such
    with pytest.raises(RuntimeError, match=r"float ops after the last quantized layer\) differs between ONNX Runtime "
                                           r"and PyTorch by 0\.001"):
        export_onnx(model, example("mlp"), tmp_path / "x.onnx", dynamo=False)
    assert export_onnx(model, example("mlp"), tmp_path / "y.onnx", dynamo=False, check=False).max_abs_diff is None


def test_retrain_disabled_layer_exports_as_plain_linear(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(LinearQAT(16, 8, config={"retrain_enable": False})).eval()
    result = export_onnx(model, example("mlp"), tmp_path / "x.onnx", dynamo=False)
    assert result.max_abs_diff <= ATOL and not qdq_pairs(onnx.load(result.path))


# ---- rounding ties: where ONNX and the PyTorch grid can disagree -------------------------------
def test_codes_differ_only_at_rounding_ties(tmp_path):
    """ONNX QuantizeLinear rounds x/s and then adds the offset; the training grid rounds x/s + offset.

    They agree except where x/s sits on (or, after float rounding of the addition, next to) a .5
    tie. Measure that on a large input: every disagreement is one step and at a tie.
    """
    torch.manual_seed(0)
    m = LinearQAT(64, 4, config={"retrain_data_config": {"clip_max": 2.0, "clip_min": -1.0}}).eval()
    q = module_qparams(m)
    assert int(q.act_offset) % 2 != 0  # an odd offset makes exact ties disagree as well
    path = export_onnx(m, torch.randn(2, 64), tmp_path / "ties.onnx", dynamo=False).path
    x = (torch.rand(4096, 64) * 3.4 - 1.2)
    tie = (0.5 * q.act_scale).reshape(1, 1).expand(1, 64)  # x/s == 0.5 exactly
    x = torch.cat([x, tie])
    onnx_codes = torch.from_numpy(ort_codes(onnx.load(path), x)[0]).float().reshape(x.shape)
    ours = quantize_act(x, q.act_scale, q.act_offset.float(), q.act_bits)
    diff = onnx_codes - ours
    v = x / q.act_scale
    near_tie = (v - v.floor() - 0.5).abs() <= 2.0 ** -15
    assert set(diff.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert bool(near_tie[diff != 0].all())
    assert bool((diff[-1] != 0).all())  # the exact ties: round-half-even lands on different sides
    assert int((diff[:-1] != 0).sum()) <= 1e-4 * x[:-1].numel()


# ---- deploy view --------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["per_tensor", "per_channel", "int4"])
def test_deploy_view(config):
    model = trained(CONFIGS[config], "mlp")
    view = deploy_view(model)
    assert set(view) == {"fc1", "fc2"}
    for name, m in (("fc1", model.fc1), ("fc2", model.fc2)):
        d = view[name]
        qmin, qmax = int_range(d.weight_bits)
        assert d.weight.dtype == (torch.uint8 if d.storage == "uint8" else torch.int8)
        assert d.weight.shape == m.weight.shape and d.weight_zero_point == (128 if d.storage == "uint8" else 0)
        codes = d.codes()
        assert codes.dtype == torch.int8 and qmin <= int(codes.min()) and int(codes.max()) <= qmax
        torch.testing.assert_close(d.dequantized_weight(),
                                   fake_quant_weight(m.weight.detach(), m.weight_qparams(), d.weight_bits),
                                   rtol=0, atol=0)
        scale, offset = m.act_qparams()
        assert (d.act_scale, d.act_offset) == (scale.item(), int(offset))
        assert d.weight_scale.shape == ((m.out_features,) if config != "per_tensor" else (1,))
    with pytest.raises(RuntimeError, match="calibration has not finished"):
        deploy_view(uncalibrated())


def test_state_bytes_sees_a_one_ulp_change():
    model = trained({}, "mlp")
    before = state_bytes(model)
    with torch.no_grad():
        model.fc1.acts_clip_max.copy_(torch.nextafter(model.fc1.acts_clip_max, torch.tensor(10.0)))
    assert state_bytes(model) != before
