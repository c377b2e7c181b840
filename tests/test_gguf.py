"""GGUF export of a tiny random BERT, run by llama.cpp (llama-cpp-python) in a child process, and
the exporter's refusals."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from amct_pytorch import blockwise as bw
from amct_pytorch.export.gguf import QuantBlocks, export_bert_gguf, pack_blocks, unpack_blocks
from amct_pytorch.export.llama import llama_emulation, llama_gelu, llama_run

transformers = pytest.importorskip("transformers")
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="the 'gguf' package is not installed (pip install gguf==0.19.0)")
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat", "run",
         "##s", "##ning", "##ed", "big", "small", "red", "blue", "house", "tree", "under", "and", "is", "was",
         "quick", "brown", "fox", "jump", "over", "lazy", ".", ",", "!", "?"]
SENTENCES = ["the cat sat on the mat.", "a big dog runs under the tree!", "the quick brown fox jumped over the lazy dog",
             "small red houses and blue trees", "is the cat running?", "dogs, cats and foxes.", "the mat was red",
             "a lazy brown dog sat under a big blue tree, and the quick cat jumped over the house."]


def _tiny_bert(hidden=64, layers=2, heads=4, ffn=128, seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=64,
                                     type_vocab_size=2, hidden_act="gelu")
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # weights larger than the 0.02 init, so that the layers do something
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    return model, tokenizer


@torch.no_grad()
def _torch_embed(model, tokenizer, sentences):
    out = []
    for s in sentences:
        enc = tokenizer(s, return_tensors="pt")
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[0]
        out.append(torch.nn.functional.normalize(h.mean(0), dim=0))
    return torch.stack(out).numpy()


def _cos(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("pooler")]


@needs_gguf
@needs_llama
def test_tiny_bert_f32_in_llama_cpp_matches_pytorch(tmp_path):
    model, tok = _tiny_bert()
    res = export_bert_gguf(model, tok, tmp_path / "f32.gguf", linear_type="f32")
    assert set(res.tensor_types.values()) == {"f32"}
    assert res.tensor_types["token_types.weight"] == "f32" and "blk.1.ffn_down.weight" in res.tensor_types
    run = llama_run(res.path, SENTENCES, with_tokens=True, n_ctx=64)
    for s, ids in zip(SENTENCES, run.tokens):  # phantom-space WordPiece = the HF tokenizer
        assert ids == tok(s)["input_ids"], s
    # 1 - cos is second order in a relative error e (about e^2 / 2). llama.cpp's GELU is the fp16-table
    # tanh approximation: with it emulated, what remains is float32 accumulation order (e ~ 1e-6) and
    # rare one-ulp flips of an fp16 table entry (e ~ 1e-3 on one element of many)
    emu = _torch_embed(llama_emulation(model, gelu="llama"), tok, SENTENCES)
    cos = _cos(run.embeddings, emu)
    assert cos.min() > 1 - 1e-5, cos
    # with BERT's erf GELU the FFN differs by up to ~1e-3 relative (tanh approximation and fp16 table)
    assert _cos(run.embeddings, _torch_embed(model, tok, SENTENCES)).min() > 1 - 1e-4


@needs_gguf
@needs_llama
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_tiny_bert_quantized_in_llama_cpp_matches_the_emulation(tmp_path, fmt):
    """Weights as trained codes (a learned scale from-float would not give), activations through the
    x86 Q8_0 emulation: llama.cpp agrees with the PyTorch emulation up to float order, and much
    better than with float activations."""
    model, tok = _tiny_bert(seed=1)
    weights = {}
    for name in _linear_names(model):
        w = model.get_submodule(name).weight.detach()
        d = bw.initial_block_scale(w, fmt) * 0.9
        weights[name] = QuantBlocks(*bw.weight_codes_learned(w, d, fmt), fmt)
    emb_w = model.embeddings.word_embeddings.weight.detach()
    token_embd = QuantBlocks.from_float(emb_w, fmt)
    res = export_bert_gguf(model, tok, tmp_path / f"{fmt}.gguf", linear_weights=weights, token_embd=token_embd)
    assert res.tensor_types["blk.0.attn_q.weight"] == fmt and res.tensor_types["token_embd.weight"] == fmt
    assert res.tensor_types["position_embd.weight"] == "f32" and res.tensor_types["blk.0.attn_q.bias"] == "f32"
    run = llama_run(res.path, SENTENCES, n_ctx=64)
    emu = _torch_embed(llama_emulation(model, weights, gelu="llama", token_embd=token_embd), tok, SENTENCES)
    no_a8 = _torch_embed(llama_emulation(model, weights, act_spec=None, gelu="llama", token_embd=token_embd), tok,
                         SENTENCES)
    err_emu = 1 - _cos(run.embeddings, emu)
    err_float_act = 1 - _cos(run.embeddings, no_a8)
    # with llama.cpp's GELU emulated, an activation code flips only where x * 127/amax lands within float
    # noise of a .5 (rare; one step, at most 1/127 of the block's amax, when it happens); 1 - cos is
    # second order in the resulting relative error
    assert err_emu.max() < 1e-5, err_emu
    assert err_emu.mean() < 0.2 * err_float_act.mean(), (err_emu, err_float_act)


@needs_gguf
def test_stored_blocks_read_back_equal_the_trained_codes(tmp_path):
    import gguf

    model, tok = _tiny_bert(seed=2)
    name = "encoder.layer.0.attention.self.query"
    w = model.get_submodule(name).weight.detach()
    d = bw.initial_block_scale(w, "q4_0") * 1.3  # a step no block's max-magnitude rule gives
    trained = QuantBlocks(*bw.weight_codes_learned(w, d, "q4_0"), "q4_0")
    # re-quantizing from float (the trained value or the original weight) gives other blocks in every
    # block: the writer must store the trained ones
    for source in (trained.dequantize(), w):
        requant = QuantBlocks.from_float(source, "q4_0")
        assert bool((requant.scales != trained.scales).all())
    res = export_bert_gguf(model, tok, tmp_path / "m.gguf", linear_weights={name: trained}, linear_type="f32",
                           token_embd_type="q8_0")
    reader = gguf.GGUFReader(res.path)
    tensors = {t.name: t for t in reader.tensors}
    t = tensors["blk.0.attn_q.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
    back = unpack_blocks(np.asarray(t.data), "q4_0", tuple(w.shape))
    assert torch.equal(back.codes, trained.codes)
    assert torch.equal(back.scales.view(torch.int16), trained.scales.view(torch.int16))
    assert tensors["blk.0.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["token_types.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "pooler.dense.weight" not in tensors and not any(n.startswith("cls") for n in tensors)
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "bert"
    assert int(fields["bert.pooling_type"].parts[-1][0]) == int(gguf.PoolingType.MEAN)
    assert bool(fields["bert.attention.causal"].parts[-1][0]) is False
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "bert"
    toks = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    assert toks[:3] == ["[PAD]", "[UNK]", "[CLS]"] and toks[WORDS.index("cat")] == "\u2581cat"
    assert toks[WORDS.index("##s")] == "s"


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(3)
    for fmt, (lo, hi) in bw.FORMATS.items():
        codes = torch.randint(lo, hi + 1, (5, 96), generator=g, dtype=torch.int8)
        scales = torch.randn(5, 3, generator=g).to(torch.float16)
        blocks = QuantBlocks(codes, scales, fmt)
        packed = pack_blocks(blocks)
        assert packed.shape == (5, 3 * (34 if fmt == "q8_0" else 18))
        back = unpack_blocks(packed, fmt, (5, 96))
        assert torch.equal(back.codes, codes) and torch.equal(back.scales, scales)


def test_llama_gelu_table():
    x = torch.tensor([-20.0, -10.0, -1.0, 0.0, 0.5, 3.0, 9.99, 10.0, 30.0])
    y = llama_gelu(x)
    assert float(y[0]) == 0.0 and float(y[1]) == 0.0 and float(y[-1]) == 30.0 and float(y[-2]) == 10.0
    inner = y[2:7]
    assert torch.equal(inner, inner.to(torch.float16).to(torch.float32))  # table values are fp16
    assert torch.allclose(inner, torch.nn.functional.gelu(x[2:7], approximate="tanh"), rtol=2e-3, atol=1e-3)


# ----------------------------------------------------------------------------- refusals

@needs_gguf
def test_refuses_k_not_multiple_of_32(tmp_path):
    model, tok = _tiny_bert(hidden=48, heads=4, ffn=96)
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.self\.query\.weight: Q4_0 needs K .* 32"):
        export_bert_gguf(model, tok, tmp_path / "x.gguf", linear_type="q4_0", token_embd_type="f32")
    with pytest.raises(ValueError, match="K = 48 is not a multiple of 32"):
        w = model.encoder.layer[0].attention.self.query.weight
        QuantBlocks(torch.zeros(w.shape, dtype=torch.int8), torch.ones(48, 1, dtype=torch.float16), "q8_0").check()
    export_bert_gguf(model, tok, tmp_path / "ok.gguf", linear_type="f16")  # float types have no block constraint


@needs_gguf
def test_refuses_layers_llama_cpp_cannot_hold(tmp_path):
    model, tok = _tiny_bert()
    model.encoder.layer[0].attention.self.extra = nn.Conv1d(4, 4, 3)
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.self\.extra \(Conv1d\)"):
        export_bert_gguf(model, tok, tmp_path / "x.gguf")
    model, tok = _tiny_bert()
    model.encoder.layer[1].adapter = nn.Linear(64, 64)
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.adapter \(Linear\): not a Linear of llama.cpp's BERT"):
        export_bert_gguf(model, tok, tmp_path / "x.gguf")
    model, tok = _tiny_bert()
    model.config.position_embedding_type = "relative_key"
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        export_bert_gguf(model, tok, tmp_path / "x.gguf")


@needs_gguf
def test_refuses_bad_arguments(tmp_path):
    model, tok = _tiny_bert()
    with pytest.raises(ValueError, match="linear_type='q5_0'"):
        export_bert_gguf(model, tok, tmp_path / "x.gguf", linear_type="q5_0")
    with pytest.raises(ValueError, match=r"\['encoder.layer.0.nope'\] are not Linear modules"):
        export_bert_gguf(model, tok, tmp_path / "x.gguf", linear_weights={"encoder.layer.0.nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="codes must lie in"):
        bad = QuantBlocks(torch.full((64, 64), 8, dtype=torch.int8), torch.ones(64, 2, dtype=torch.float16), "q4_0")
        export_bert_gguf(model, tok, tmp_path / "x.gguf",
                         linear_weights={"encoder.layer.0.attention.self.query": bad})
    with pytest.raises(ValueError, match="pooling='max'"):
        export_bert_gguf(model, tok, tmp_path / "x.gguf", pooling="max")


@needs_llama
def test_llama_failure_is_reported_not_fatal(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(RuntimeError, match="llama.cpp child process failed"):
        llama_run(bogus, ["hello"])
