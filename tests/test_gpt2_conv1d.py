"""transformers' Conv1D (GPT-2's projections, weight stored (in, out)) is a first-class QAT layer
(issue 21, finding 1): converted by default, trained, exported with a dynamic sequence as a MatMul
on its stored layout, run in ONNX Runtime, saved and reloaded through Hugging Face."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import amct_pytorch as amct  # noqa: E402
import amct_pytorch.hf  # noqa: E402,F401  (registers the quantizer: from_pretrained gives back QAT layers)
from amct_pytorch import Conv1DQAT, LinearQAT, calibrate, export_onnx, qat_layers, to_qat  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PROJECTIONS = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                    "mlp.c_proj")]
# GPT-2's logits are O(0.1-1) here: float32 summation-order noise is ~1e-6; a rounding-tie flip of
# one activation code (ONNX's round(x/s)+z vs the training grid's round(x/s+z), see
# tests/test_export_deploy.py) moves them by ~1e-4 at most through a 32-wide model; a whole
# activation step on a 16-token input would be >= 1e-2.
ATOL = 1e-3


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def ids(n=2, length=8, seed=0):
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


class Logits(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


def test_every_projection_is_a_qat_layer_with_its_layout_and_keys():
    model = tiny_gpt2().eval()
    keys = set(model.state_dict())
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, Conv1D)}
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    summary = to_qat(model, {})
    layers = qat_layers(model)
    assert set(PROJECTIONS) <= set(summary.converted) and "lm_head" in summary.converted
    for name in PROJECTIONS:
        m = layers[name]
        assert type(m) is Conv1DQAT and m.weight is weights[name]  # shared, (in, out) kept
        assert m.weight.shape == (m.nx, m.nf)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied weights stay tied
    # the float keys are unchanged; only AMCT's QAT state is added
    assert keys <= set(model.state_dict())
    added = {k.rsplit(".", 1)[1] for k in model.state_dict()
             if k.startswith("transformer.h.0.attn.c_attn.") and k not in keys}
    assert added == set(LinearQAT(32, 96).state_dict()) - {"weight", "bias"}  # AMCT's QAT names, as LinearQAT's
    # disabled: exactly the float model
    amct.disable_quantization(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)


def test_conv1d_qat_has_linear_numerics_per_channel_on_dim_1():
    torch.manual_seed(0)
    conv = Conv1D(12, 8)  # nf=12 out, nx=8 in: weight (8, 12)
    lin = nn.Linear(8, 12)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(torch.randn(12))
        conv.bias.copy_(lin.bias)
    cfg = {"retrain_weight_config": {"channel_wise": True}}
    cq, lq = Conv1DQAT.from_float(conv, config=cfg), LinearQAT.from_float(lin, config=cfg)
    x = torch.randn(3, 5, 8)
    for m in (cq, lq):
        with amct.calibrating():
            m(x)
    torch.testing.assert_close(cq.weight_qparams(), lq.weight_qparams(), rtol=0, atol=0)
    assert cq.weight_qparams().shape == (12,)  # one scale per output channel (dim 1 of the stored weight)
    cq.eval(), lq.eval()
    torch.testing.assert_close(cq(x), lq(x), rtol=1e-6, atol=1e-6)
    # gradients of the weight land in the stored layout; clip bounds get the same gradients
    cq.train(), lq.train()
    cq(x).square().sum().backward()
    lq(x).square().sum().backward()
    torch.testing.assert_close(cq.weight.grad, lq.weight.grad.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cq.acts_clip_max.grad, lq.acts_clip_max.grad, rtol=1e-5, atol=1e-5)
    back = cq.to_float()
    assert type(back) is Conv1D and back.weight is conv.weight


def test_layer_types_and_overrides_reach_conv1d():
    model = tiny_gpt2()
    summary = to_qat(model, {}, layer_types=[Conv1D], overrides={"*.c_attn": {"retrain_weight_config": {
        "channel_wise": True}}})
    assert set(summary.converted) == set(PROJECTIONS)
    assert summary.overridden["transformer.h.0.attn.c_attn"] == "'*.c_attn'"
    assert type(model.lm_head) is nn.Linear
    assert Conv1D in amct.QAT_CLASSES and amct.ALL_QAT_CLASSES[Conv1D] is Conv1DQAT


def test_import_amct_pytorch_still_does_not_import_transformers():
    code = ("import sys, amct_pytorch; assert 'transformers' not in sys.modules; "
            "assert amct_pytorch.Conv1DQAT.__name__ == 'Conv1DQAT'; assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_gpt2_trains_exports_with_dynamic_sequence_and_round_trips_through_hf(tmp_path):
    model = tiny_gpt2()
    to_qat(model, {"retrain_data_config": {"batch_num": 2}})
    calibrate(model, [ids(seed=s) for s in range(2)], progress=False)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    clip = model.transformer.h[0].attn.c_attn.acts_clip_max
    before = clip.detach().clone()
    for step in range(4):
        x = ids(seed=10 + step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(clip.detach(), before)  # the clip bound learned
    model.eval()
    wrapped = Logits(model).eval()
    result = export_onnx(wrapped, (ids(2, 8, seed=3),), tmp_path / "gpt2.onnx", atol=ATOL,
                         check_inputs=[(ids(3, 13, seed=4),)])
    assert result.max_abs_diff <= ATOL
    assert result.dynamic_axes == ((0, 1),)  # batch and sequence both dynamic
    proto = onnx.load(tmp_path / "gpt2.onnx")
    # each projection is a MatMul on the stored (in, out) weight: integer codes, DequantizeLinear axis 1
    inits = {i.name: i for i in proto.graph.initializer}
    conv1d_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and ".transformer.h." in n.input[0]]
    assert len(conv1d_dq) == 8
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in conv1d_dq)
    consumers = {i: n.op_type for n in proto.graph.node for i in n.input}
    assert all(consumers[n.output[0]] == "MatMul" for n in conv1d_dq)
    assert not any(n.op_type == "Gemm" for n in proto.graph.node)
    # ONNX Runtime's default CPU session fuses each (Conv1D projections and lm_head) into an integer MatMul
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "gpt2.onnx"), options, providers=["CPUExecutionProvider"])
    fused = [n for n in onnx.load(tmp_path / "optimized.onnx").graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 9

    amct.save_pretrained(model, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    layers = qat_layers(loaded)
    assert all(type(layers[n]) is Conv1DQAT for n in PROJECTIONS)
    saved, got = model.state_dict(), loaded.state_dict()
    assert set(saved) == set(got)
    for k in saved:
        torch.testing.assert_close(got[k], saved[k], rtol=0, atol=0, msg=k)
    x = ids(2, 9, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
