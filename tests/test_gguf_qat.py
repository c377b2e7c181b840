"""The llama.cpp profile of the QAT modules (retrain_weight_config.gguf_type, retrain_data_config.dynamic_act):
config validation, forwards and gradients of LinearQAT / EmbeddingQAT against the blockwise maths, export_gguf
of a trained tiny BERT (read back with GGUFReader, run in llama.cpp), the refusals, and the ORT MatMulNBits
level-4 preset exported without activation Q/DQ."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amct_pytorch import blockwise as bw
from amct_pytorch.config import parse_config
from amct_pytorch.convert import QAT_CLASSES, to_qat
from amct_pytorch.export import LlamaGELU, export_gguf, export_onnx
from amct_pytorch.export.gguf import unpack_blocks
from amct_pytorch.export.llama import llama_run
from amct_pytorch.nn.module.quantization.embedding import EmbeddingQAT
from amct_pytorch.nn.module.quantization.linear import LinearQAT

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="the 'gguf' package is not installed (pip install gguf==0.19.0)")
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
U32 = 2.0**-24


def gguf_cfg(fmt="Q4_0", algo="ulq_quantize", act="llama.cpp-x86"):
    return {"retrain_weight_config": {"gguf_type": fmt, "weights_retrain_algo": algo},
            "retrain_data_config": {"dynamic_act": act}}


LEVEL4 = {"retrain_weight_config": {"dst_type": "INT4", "channel_wise": True, "group_size": 32},
          "retrain_data_config": {"dynamic_act": "ort-matmulnbits-level4"}}


# ---- config ----------------------------------------------------------------------------------------
def test_config_gguf_type_implies_the_block_grid_and_round_trips():
    cfg = parse_config(gguf_cfg("Q4_0"))
    w, d = cfg.retrain_weight_config, cfg.retrain_data_config
    assert (w.dst_type, w.channel_wise, w.group_size, w.block_format) == ("INT4", True, 32, "q4_0")
    assert d.dynamic_act == "llama.cpp-x86" and not d.needs_calibration
    assert parse_config(cfg.to_dict()) == cfg
    assert parse_config(gguf_cfg("Q8_0")).retrain_weight_config.dst_type == "INT8"
    level4 = parse_config(LEVEL4)
    assert parse_config(level4.to_dict()) == level4 and not level4.retrain_data_config.needs_calibration


@pytest.mark.parametrize("cfg, words", [
    ({"retrain_weight_config": {"gguf_type": "Q5_0"}}, ["gguf_type", "'Q5_0'", "Q4_0, Q8_0"]),
    ({"retrain_weight_config": {"gguf_type": "Q4_0", "dst_type": "INT8"}}, ["gguf_type='Q4_0'", "dst_type='INT8'"]),
    ({"retrain_weight_config": {"gguf_type": "Q8_0", "group_size": 64}}, ["group_size=64"]),
    ({"retrain_weight_config": {"gguf_type": "Q8_0", "channel_wise": False}}, ["channel_wise=False"]),
    ({"retrain_weight_config": {"gguf_type": "Q8_0", "weights_retrain_algo": "ulq_quantize", "scale_init": "mse"}},
     ["scale_init='mse'"]),
    ({"retrain_data_config": {"dynamic_act": "avx512"}}, ["dynamic_act", "'avx512'", "ort-matmulnbits-level4"]),
    ({"retrain_data_config": {"dynamic_act": "llama.cpp-x86", "clip_max": 3.0}, **{}}, ["clip_max"]),
    ({"retrain_data_config": {"dynamic_act": "llama.cpp-x86", "dst_type": "INT4"}}, ["dst_type='INT4'"]),
    ({"retrain_data_config": {"dynamic_act": "llama.cpp-x86"}}, ["gguf_type"]),
    ({"retrain_data_config": {"dynamic_act": "ort-matmulnbits-level4"}}, ["group_size", "INT4"]),
])
def test_config_refusals_name_key_value_and_rule(cfg, words):
    with pytest.raises(ValueError) as err:
        parse_config(cfg)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_gguf_weights_need_the_llama_cpp_activation_and_convs_refuse():
    with pytest.raises(ValueError, match="dynamic_act"):
        LinearQAT(64, 8, config={"retrain_weight_config": {"gguf_type": "Q8_0"}})
    with pytest.raises(ValueError, match="group_size"):
        to_qat(nn.Sequential(nn.Conv2d(32, 4, 1)), gguf_cfg("Q8_0"))


# ---- LinearQAT: forward and gradients against the blockwise maths -----------------------------------
def _reference(layer, x, fmt, spec):
    """ŷ with autograd through blockwise's own functions (STE / LSQ written as plain ops)."""
    xq = bw.fake_quant_act_blocks(x, spec)
    if layer.config.retrain_weight_config.learnable_scale:
        wq = bw.fake_quant_weight_learned(layer.weight, layer.wts_scales.reshape(layer.out_features, -1), fmt)
    else:
        wq = bw.fake_quant_weight_from_float(layer.weight, fmt)
    return F.linear(xq, wq, layer.bias)


@pytest.mark.parametrize("fmt, algo", [("Q8_0", "ulq_quantize"), ("Q4_0", "ulq_quantize"), ("Q4_0", "arq_retrain")])
def test_linear_gguf_forward_and_gradients(fmt, algo):
    torch.manual_seed(0)
    layer = LinearQAT(96, 16, config=gguf_cfg(fmt, algo))
    x = torch.randn(5, 96) * 2
    layer.train()
    layer(x)  # the first training forward initialises a learnable d from llama-quantize's
    if algo == "ulq_quantize":
        with torch.no_grad():  # move d off the from-float value, as training does
            layer.wts_scales.mul_(torch.linspace(0.8, 1.2, layer.wts_scales.numel()))
    xa = x.clone().requires_grad_(True)
    y = layer(xa)
    g = torch.randn_like(y)
    y.backward(g)
    got = {"x": xa.grad, "w": layer.weight.grad, "b": layer.bias.grad}
    if algo == "ulq_quantize":
        got["d"] = layer.wts_scales.grad
    ref_layer_grads = {}
    params = [layer.weight, layer.bias] + ([layer.wts_scales] if algo == "ulq_quantize" else [])
    for p in params:
        p.grad = None
    xb = x.clone().requires_grad_(True)
    yr = _reference(layer, xb, fmt.lower(), bw.LLAMA_CPP_X86_Q8_0)
    # the same value: ŷ's operands are computed by the same functions
    assert torch.equal(y.detach(), yr.detach())
    yr.backward(g)
    ref_layer_grads = {"x": xb.grad, "w": layer.weight.grad, "b": layer.bias.grad}
    if algo == "ulq_quantize":
        ref_layer_grads["d"] = layer.wts_scales.grad
        assert got["d"].abs().sum() > 0
    for k, v in got.items():
        # the same sums in another order (one fused reduction vs autograd's): float32 rounding of sums of
        # up to 96 terms
        assert torch.allclose(v, ref_layer_grads[k], rtol=1e-5, atol=1e-6), k
    # the input gradient is straight through the dynamic quantizer: exactly gᵀŴ
    wq = layer.weight_fake_quant(layer.weight_qparams())
    assert torch.allclose(got["x"], g @ wq, rtol=1e-6, atol=1e-6)


def test_linear_gguf_eval_is_the_stored_blocks_and_llama_cpp_activations():
    torch.manual_seed(1)
    layer = LinearQAT(64, 8, config=gguf_cfg("Q4_0"))
    layer.train()
    layer(torch.randn(3, 64))
    with torch.no_grad():
        layer.wts_scales.mul_(1.1)
    layer.eval()
    assert layer.is_calibrated and float(layer.acts_clip_max.detach()) == 0.0  # AMCT's names kept, unused
    x = torch.randn(4, 64)
    codes, d = layer.gguf_blocks()
    y = F.linear(bw.fake_quant_act_blocks(x, bw.LLAMA_CPP_X86_Q8_0), bw.dequantize_weight_blocks(codes, d),
                 layer.bias)
    assert torch.equal(layer(x), y)
    # the learned scale is not what llama-quantize would store for these weights
    assert not torch.equal(d, bw.weight_codes_from_float(layer.weight, "q4_0")[1])
    assert set(layer.state_dict()) >= {"acts_clip_max", "acts_clip_min", "acts_scale", "acts_offset", "wts_scales"}


def test_level4_preset_uses_the_group_size_block():
    layer = LinearQAT(64, 8, config=LEVEL4)
    assert layer.act_block_spec() == bw.ort_matmulnbits_level4(32)
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


# ---- EmbeddingQAT --------------------------------------------------------------------------------------
def test_embedding_gguf_rows_and_gradients():
    torch.manual_seed(2)
    emb = EmbeddingQAT(20, 64, config={"retrain_weight_config": {"gguf_type": "Q4_0",
                                                                 "weights_retrain_algo": "ulq_quantize"}})
    ids = torch.tensor([[1, 2, 3], [3, 3, 7]])
    emb.eval()
    assert torch.equal(emb(ids), bw.fake_quant_weight_from_float(emb.weight, "q4_0")[ids])  # before training: PTQ
    emb.train()
    out = emb(ids)
    g = torch.randn_like(out)
    out.backward(g)
    d = emb.wts_scales.detach().reshape(20, -1)
    table = bw.fake_quant_weight_learned(emb.weight.detach(), d, "q4_0")
    assert torch.equal(out.detach(), table[ids])
    # the table's gradient: straight through, summed over repeated ids; d's: LSQ of the rows looked up
    expect_w = torch.zeros(20, 64).index_add_(0, ids.reshape(-1), g.reshape(-1, 64))
    assert torch.allclose(emb.weight.grad, expect_w)
    expect_d = bw.learned_scale_grad(emb.weight.detach(), expect_w, d, "q4_0").reshape(-1)
    assert torch.allclose(emb.wts_scales.grad, expect_d, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="export_gguf"):
        emb.quantized_table()


# ---- export_gguf of a trained tiny BERT ---------------------------------------------------------------
transformers = pytest.importorskip("transformers")
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat", "run",
         "##s", "##ning", "big", "red", "blue", "tree", "under", "and", "is", "quick", "fox", ".", "!"]
SENTENCES = ["the cat sat on the mat.", "a big dog runs under the tree!", "the quick fox is red and blue",
             "is the cat running?", "a red mat", "the big blue tree and a quick dog sat on a cat."]


def _tiny_qat_bert(fmt, seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=32,
                                     type_vocab_size=2, hidden_act="gelu")
    model = transformers.BertModel(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    for layer in model.encoder.layer:
        layer.intermediate.intermediate_act_fn = LlamaGELU()
    cfg = gguf_cfg(fmt)
    to_qat(model, cfg, skip=["pooler.dense", "embeddings.position_embeddings", "embeddings.token_type_embeddings"],
           layer_types=[*QAT_CLASSES, nn.Embedding],
           overrides={"embeddings.word_embeddings": {"retrain_weight_config": cfg["retrain_weight_config"]}})
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    # a few training steps, so that the block scales are learned ones
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if n.endswith("wts_scales")], lr=2e-3)
    model.train()
    enc = tok(SENTENCES, return_tensors="pt", padding=True)
    for _ in range(3):
        loss = model(**enc).last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


@torch.no_grad()
def _embed(model, tok):
    out = []
    for s in SENTENCES:
        enc = tok(s, return_tensors="pt")
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[0]
        out.append(F.normalize(h.mean(0), dim=0))
    return torch.stack(out).numpy()


@needs_gguf
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0"])
def test_export_gguf_stores_the_trained_codes_and_llama_cpp_agrees(tmp_path, fmt):
    import gguf

    model, tok = _tiny_qat_bert(fmt)
    res = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    kind = fmt.lower()
    assert res.tensor_types["blk.1.ffn_down.weight"] == kind and res.tensor_types["token_embd.weight"] == kind
    assert res.tensor_types["position_embd.weight"] == "f32" and res.tensor_types["token_types.weight"] == "f32"
    tensors = {t.name: t for t in gguf.GGUFReader(res.path).tensors}
    for gname, module in (("blk.0.attn_q.weight", model.encoder.layer[0].attention.self.query),
                          ("blk.1.ffn_down.weight", model.encoder.layer[1].output.dense),
                          ("token_embd.weight", model.embeddings.word_embeddings)):
        codes, d = module.gguf_blocks()
        back = unpack_blocks(np.asarray(tensors[gname].data), kind, tuple(codes.shape))
        assert torch.equal(back.codes, codes) and torch.equal(back.scales.view(torch.int16), d.view(torch.int16))
    # the learned scales are no scales llama-quantize would store for these weights
    w = model.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(model.encoder.layer[0].attention.self.query.gguf_blocks()[1],
                           bw.weight_codes_from_float(w, kind)[1])
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    run = llama_run(res.path, SENTENCES, n_ctx=32)
    cos = np.sum(run.embeddings * _embed(model, tok), axis=1)
    # the PyTorch QAT model computes llama.cpp's codes, scales, activation codes and GELU table: what
    # remains is float32 summation order (relative e ~ 1e-6, so 1 - cos ~ e^2 / 2 ~ 1e-12: most sentences) and
    # the rare activation code that this noise moves across a .5: one step of 1/127 of its block's max on
    # one element, a relative change e <~ 1e-2 of the layer's output in this 64-wide model (1 - cos <= 5e-5)
    assert 1 - cos.min() < 5e-5, cos
    assert np.sum(1 - cos < 1e-6) >= len(SENTENCES) // 2, cos


def test_export_gguf_refusals(tmp_path):
    model, tok = _tiny_qat_bert("Q8_0")
    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        export_gguf(model, tmp_path / "a.gguf", tokenizer=tok)
    model.eval()
    with pytest.raises(ValueError, match="float_type"):
        export_gguf(model, tmp_path / "a.gguf", tokenizer=tok, float_type="q4_0")
    int8 = transformers.BertModel(transformers.BertConfig(vocab_size=len(WORDS), hidden_size=64, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=128))
    to_qat(int8, None, skip=["pooler.dense"])
    int8.eval()
    with pytest.raises(ValueError, match=r"encoder.layer.0.attention.self.query.*INT8.*gguf_type"):
        export_gguf(int8, tmp_path / "b.gguf", tokenizer=tok)
    with pytest.raises(RuntimeError, match="export_gguf"):  # no ONNX form
        export_onnx(nn.Sequential(model.encoder.layer[0].attention.self.query).eval(), torch.randn(2, 64),
                    tmp_path / "c.onnx")


# ---- ORT MatMulNBits accuracy_level 4 ------------------------------------------------------------------
def _mlp(k, layers, seed=0):
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(k, k), nn.ReLU()]
    model = nn.Sequential(*mods)
    to_qat(model, LEVEL4)
    return model.eval()


@pytest.mark.parametrize("k, layers, rows", [(64, 1, 3), (1024, 4, 8)])
def test_level4_exports_as_matmulnbits_level4_and_matches_pytorch(tmp_path, k, layers, rows):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import helper

    model = _mlp(k, layers)
    x = torch.randn(rows, k)
    path = tmp_path / "m.onnx"
    export_onnx(model, x, path, check=False)
    proto = onnx.load(path)
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == layers
    assert all(next(a.i for a in n.attribute if a.name == "accuracy_level") == 4 for n in nodes)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
                   for n in proto.graph.node)
    # each layer against PyTorch's on ORT's own input: the same int8 activation codes and int4 weight codes
    # (test_blockwise), so only float32 rounding differs: both sum K products of x̂ ŵ (ORT per block in int32,
    # then the block scales; torch in float32), |Δ| <= (K + 4) u Σ|x̂||ŵ| + u |b|
    relu_out = [n.output[0] for n in proto.graph.node if n.op_type == "Relu"]
    for name in relu_out:
        proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    values = dict(zip([o.name for o in sess.get_outputs()], outs))
    inputs = [x] + [torch.from_numpy(values[n]) for n in relu_out[:-1]]
    linears = [m for m in model if isinstance(m, LinearQAT)]
    for layer, xin, name in zip(linears, inputs, relu_out):
        with torch.no_grad():
            want = torch.relu(layer(xin)).double()
            xq = bw.fake_quant_act_blocks(xin, layer.act_block_spec()).double()
            wq = layer.fake_quantized_weight().double()
            mag = xq.abs() @ wq.abs().T + layer.bias.double().abs()
        bound = (k + 4) * U32 * mag + 1e-30
        got = torch.from_numpy(values[name]).double()
        assert bool(((got - want).abs() <= bound).all()), float(((got - want).abs() / bound).max())


@pytest.mark.parametrize("spec", [bw.LLAMA_CPP_X86_Q8_0, bw.LLAMA_CPP_REFERENCE_Q8_0, bw.ort_matmulnbits_level4(16)])
def test_fake_quant_is_the_dequantized_codes(spec):
    torch.manual_seed(3)
    x = torch.randn(3, 5, 71) * torch.logspace(-3, 2, 71)  # a partial last block, wide magnitudes
    x[0, 0, :40] = 0.0  # an all-zero block
    codes, d = bw.quantize_act_blocks(x, spec)
    assert torch.equal(bw.fake_quant_act_blocks(x, spec), bw.dequantize_act_blocks(codes, d, spec.block))


def test_embedding_gguf_arq_rows_and_their_stored_scales():
    torch.manual_seed(4)
    emb = EmbeddingQAT(12, 64, config={"retrain_weight_config": {"gguf_type": "Q8_0"}})
    ids = torch.tensor([[5, 1, 5]])
    out = emb(ids)  # train mode, grad enabled: a state-updating forward
    full_codes, full_d = bw.weight_codes_from_float(emb.weight, "q8_0")
    assert torch.equal(out, bw.dequantize_weight_blocks(full_codes, full_d)[ids])
    stored = emb.wts_scales.detach().reshape(12, -1)
    assert torch.equal(stored[[1, 5]], full_d[[1, 5]].float()) and bool((stored[0] == 1).all())
    out.sum().backward()
    assert torch.equal(emb.weight.grad[5], torch.full((64,), 2.0))  # straight through, twice looked up


def test_demo_gguf_settings_and_table():
    from amct_pytorch.demo.minilm.report import gguf_table
    from amct_pytorch.demo.minilm.settings import DEFAULT_SETTINGS, is_gguf, parse_settings

    picked = parse_settings("q8_0,q4_0")
    assert [s.name for s in picked] == ["q8_0", "q4_0"] and all(is_gguf(s) for s in picked)
    assert not any(is_gguf(s) for s in parse_settings(DEFAULT_SETTINGS))  # the default run is unchanged
    for s in picked:
        cfg = parse_config(s.config)
        assert cfg.retrain_data_config.dynamic_act == "llama.cpp-x86"
        assert cfg.retrain_weight_config.gguf_type == s.name.upper()
    # Q8_0 trains its weights at its own, smaller learning rate (its PTQ error is ~4e-4); the others keep the demo's
    from amct_pytorch.demo.common.settings import setting_options
    from amct_pytorch.demo.minilm.settings import Options

    base = Options()
    assert setting_options(base, picked[0]).lr_weights == 5e-6 < base.lr_weights
    assert setting_options(base, picked[1]) is base
    assert all(setting_options(base, s) is base for s in parse_settings(DEFAULT_SETTINGS))
    files = {
        "float_f32": {"size_mb": 90.9, "token_embd_share": 0.516, "llama": {"mean_cos": 1.0, "min_cos": 0.99999,
                                                                             "sentences": 3},
                      "latency_ms": 10.0, "x_f32": 1.0, "x_f16": 1.2},
        "qat_q4_0": {"size_mb": 14.1, "token_embd_share": 0.467,
                     "llama": {"mean_cos": 0.991, "min_cos": 0.98, "vs_torch_mean_cos": 0.99995,
                               "vs_torch_min_cos": 0.9998, "sentences": 3},
                     "latency_ms": 6.5, "x_f32": 0.65, "x_f16": 0.78}}
    text = gguf_table({"deployment": {"gguf": {"files": files, "llama_cpp_python": "0.3.36",
                                               "latency": {"threads": 1, "sentences": 3, "reps": 2}}}})
    lines = text.splitlines()
    assert lines[2].split()[0] == "float_f32" and lines[2].split()[5] == "-"
    assert lines[3].split()[:8] == ["qat_q4_0", "14.1", "46.7%", "0.9910", "0.9800", "0.999950", "0.999800", "6.50"]
