"""GGUF export of BERT-family encoders for llama.cpp (issue 20), and a subprocess runner.

`export_bert_gguf` writes a GGUF with `gguf`'s writer (llama.cpp's own package) that llama.cpp
loads as arch `bert` in embedding mode: non-causal attention, MEAN pooling, a WordPiece
tokenizer (model `bert`) spelled the way llama.cpp's converter spells it (continuation pieces
lose their "##", every other non-control token gains a leading U+2581 "phantom space"),
special tokens from the Hugging Face tokenizer.

Tensor types: each encoder Linear weight is written either from a float weight (F32, F16, or
Q8_0/Q4_0 quantized from float exactly as `llama-quantize` does: the PTQ peer) or from
precomputed `QuantBlocks` (integer codes + fp16 scales, e.g. a QAT model's trained codes),
which are packed as they are and never re-quantized. `token_embd` likewise (a float weight is
quantized from float with `token_embd_type`, as `llama-quantize` does for that file type);
position embeddings, token-type embeddings, LayerNorm weights and all biases stay F32
(llama.cpp aborts at the first embed when `token_types` is F16).

What cannot be exported is refused with a ValueError naming the layer: quantized weights whose
K is not a multiple of 32, parameters of module types llama.cpp's BERT graph does not hold,
non-BERT configs (relative position embeddings, activations other than GELU).

`export_gguf` writes a QAT model: every LinearQAT with `retrain_weight_config.gguf_type` as its
trained codes and stored fp16 scales (`QATLayer.gguf_blocks`), an EmbeddingQAT word table with a
gguf_type likewise, float linears as `float_type`, and refuses QAT layers whose grid llama.cpp
cannot hold. The llama.cpp runner and the PyTorch emulation live in `export/llama.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple, Union

import numpy as np
import torch
from torch import nn

from .. import blockwise
from ..nn.module.quantization.embedding import EmbeddingQAT
from ..nn.module.quantization.layer import QATLayer

QK = blockwise.QK
FLOAT_TYPES = ("f32", "f16")
QUANT_TYPES = ("q8_0", "q4_0")
TENSOR_TYPES = FLOAT_TYPES + QUANT_TYPES
_BLOCK_BYTES = {"q8_0": 2 + QK, "q4_0": 2 + QK // 2}
POOLING = ("mean", "cls", "none")


def _gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError("GGUF export needs the 'gguf' package (llama.cpp's writer): pip install gguf") from err
    return gguf


class QuantBlocks(NamedTuple):
    """A weight as llama.cpp stores it: codes int8 (N, K) (Q4_0: signed, in [-8, 7]), scales
    float16 (N, K/32), one per block of 32 along K; its value is codes * scale per block."""

    codes: torch.Tensor
    scales: torch.Tensor
    fmt: str

    def check(self, name: str = "weight") -> "QuantBlocks":
        qmin, qmax = blockwise.check_format(self.fmt)
        if self.codes.dim() != 2 or self.codes.dtype != torch.int8:
            raise ValueError(f"{name}: codes must be a 2-d int8 (N, K) tensor, got {self.codes.dtype} "
                             f"shape {tuple(self.codes.shape)}")
        n, k = self.codes.shape
        if k % QK:
            raise ValueError(f"{name}: K = {k} is not a multiple of {QK}, the block length of {self.fmt.upper()}")
        if self.scales.dtype != torch.float16 or tuple(self.scales.shape) != (n, k // QK):
            raise ValueError(f"{name}: scales must be float16 of shape {(n, k // QK)}, got {self.scales.dtype} "
                             f"shape {tuple(self.scales.shape)}")
        lo, hi = int(self.codes.min()), int(self.codes.max())
        if lo < qmin or hi > qmax:
            raise ValueError(f"{name}: {self.fmt.upper()} codes must lie in [{qmin}, {qmax}], got [{lo}, {hi}]")
        return self

    @classmethod
    def from_float(cls, weight: torch.Tensor, fmt: str) -> "QuantBlocks":
        """llama-quantize's blocks of a float weight (the PTQ peer)."""
        codes, scales = blockwise.weight_codes_from_float(weight, fmt)
        return cls(codes, scales, fmt)

    def dequantize(self) -> torch.Tensor:
        return blockwise.dequantize_weight_blocks(self.codes, self.scales)


Weight = Union[torch.Tensor, QuantBlocks]


def pack_blocks(blocks: QuantBlocks) -> np.ndarray:
    """GGUF bytes of Q8_0 / Q4_0 blocks, uint8 (N, K/32 * bytes per block): each block is its fp16
    scale (little endian) then its codes (Q8_0: 32 int8; Q4_0: 16 bytes, byte j holding
    code j + 8 in the low nibble and code j + 16 + 8 in the high one)."""
    blocks.check()
    n, k = blocks.codes.shape
    nb = k // QK
    d = blocks.scales.contiguous().numpy().astype("<f2").view(np.uint8).reshape(n, nb, 2)
    codes = blocks.codes.numpy().reshape(n, nb, QK)
    if blocks.fmt == "q8_0":
        qs = codes.view(np.uint8)
    else:
        nib = (codes.astype(np.int16) + 8).astype(np.uint8)
        qs = nib[..., :QK // 2] | (nib[..., QK // 2:] << np.uint8(4))
    return np.concatenate([d, qs], axis=-1).reshape(n, nb * _BLOCK_BYTES[blocks.fmt])


def unpack_blocks(data: np.ndarray, fmt: str, shape: tuple[int, int]) -> QuantBlocks:
    """Inverse of `pack_blocks` (e.g. for tensors read back with gguf.GGUFReader)."""
    blockwise.check_format(fmt)
    n, k = shape
    nb = k // QK
    raw = np.ascontiguousarray(np.asarray(data, dtype=np.uint8)).reshape(n, nb, _BLOCK_BYTES[fmt])
    scales = raw[..., :2].copy().view("<f2").reshape(n, nb)
    qs = raw[..., 2:]
    if fmt == "q8_0":
        codes = qs.copy().view(np.int8)
    else:
        codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1).astype(np.int8) - np.int8(8)
    return QuantBlocks(torch.from_numpy(codes.reshape(n, k).copy()), torch.from_numpy(scales.astype(np.float16)),
                       fmt)


# ----------------------------------------------------------------------------- BERT export

_LINEAR_SUFFIXES = ("attention.self.query", "attention.self.key", "attention.self.value",
                    "attention.output.dense", "intermediate.dense", "output.dense")
_SKIPPED_PREFIXES = ("pooler.",)  # llama.cpp's BERT graph pools itself; the HF pooler is not part of it


def strip_prefix(name: str) -> str:
    """A HF module name without the leading 'bert.'."""
    return name[5:] if name.startswith("bert.") else name


def _check_config(config):
    model_type = getattr(config, "model_type", None)
    if model_type != "bert":
        raise ValueError(f"model.config.model_type={model_type!r}: only 'bert' encoders are exported to GGUF")
    pos = getattr(config, "position_embedding_type", "absolute")
    if pos != "absolute":
        raise ValueError(f"model.config.position_embedding_type={pos!r}: llama.cpp's BERT holds only 'absolute'")
    act = getattr(config, "hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"model.config.hidden_act={act!r}: llama.cpp's BERT FFN computes GELU only")


def _vocab(tokenizer, gguf):
    """(tokens in llama.cpp's phantom-space spelling, token types, special ids) of a WordPiece tokenizer."""
    vocab = tokenizer.get_vocab()
    if not vocab:
        raise ValueError("tokenizer: empty vocabulary")
    size = max(vocab.values()) + 1
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    tokens, types = [], []
    for i in range(size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(tok[2:] if tok.startswith("##") else "\u2581" + tok)
            types.append(gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    return tokens, types


def _tensor_data(name: str, weight: Weight, ttype: str, what: str):
    """(numpy data, raw_dtype or None, type name) for one weight."""
    gguf = _gguf()
    if isinstance(weight, QuantBlocks):
        weight.check(what)
        return pack_blocks(weight), gguf.GGMLQuantizationType[weight.fmt.upper()], weight.fmt
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"{what}: expected a float tensor or QuantBlocks, got {type(weight).__name__}")
    w = weight.detach().to(torch.float32).cpu()
    if ttype == "f32":
        return w.numpy().copy(), None, "f32"
    if ttype == "f16":
        return w.to(torch.float16).numpy().copy(), None, "f16"
    if w.dim() != 2 or w.shape[1] % QK:
        raise ValueError(f"{what}: {ttype.upper()} needs K (the last dim) to be a multiple of {QK}, "
                         f"got shape {tuple(w.shape)}")
    blocks = QuantBlocks.from_float(w, ttype)
    return pack_blocks(blocks), gguf.GGMLQuantizationType[ttype.upper()], ttype


class GGUFExport(NamedTuple):
    path: Path
    file_bytes: int
    tensor_types: dict  # GGUF tensor name -> "f32" | "f16" | "q8_0" | "q4_0"
    tensor_bytes: dict  # GGUF tensor name -> bytes of its data


def export_bert_gguf(model: nn.Module, tokenizer, path, *, linear_weights: Mapping[str, Weight] | None = None,
                     linear_type: str = "f32", token_embd: Weight | None = None, token_embd_type: str | None = None,
                     pooling: str = "mean", name: str | None = None) -> GGUFExport:
    """Write a BERT encoder (transformers BertModel, or a model whose `.bert` is one) as GGUF.

    linear_weights: optional {HF module name of an encoder Linear (e.g.
        "encoder.layer.0.attention.self.query"): float weight or QuantBlocks}; a QuantBlocks entry
        is stored exactly (trained codes and scales); a float entry, and every Linear not listed
        (its module's weight), is stored as `linear_type`.
    linear_type: "f32" | "f16" | "q8_0" | "q4_0" for float Linear weights (quantized ones from
        float as llama-quantize does).
    token_embd: optional word-embedding weight (float or QuantBlocks) replacing the module's;
        token_embd_type: its type when float (default: linear_type, as llama-quantize does).
    pooling: "mean" (sentence-transformers MEAN pooling), "cls" or "none".
    Returns the file's path, size and per-tensor types and byte counts.
    """
    gguf = _gguf()
    if linear_type not in TENSOR_TYPES:
        raise ValueError(f"linear_type={linear_type!r}: expected one of {TENSOR_TYPES}")
    token_embd_type = linear_type if token_embd_type is None else token_embd_type
    if token_embd_type not in TENSOR_TYPES:
        raise ValueError(f"token_embd_type={token_embd_type!r}: expected one of {TENSOR_TYPES}")
    if pooling not in POOLING:
        raise ValueError(f"pooling={pooling!r}: expected one of {POOLING}")
    bert = getattr(model, "bert", model)
    config = getattr(bert, "config", None)
    if config is None:
        raise ValueError(f"model: {type(model).__name__} has no .config; expected a transformers BertModel")
    _check_config(config)
    linear_weights = dict(linear_weights or {})
    modules = dict(bert.named_modules())
    unknown = [k for k in linear_weights if strip_prefix(k) not in modules or not isinstance(modules[strip_prefix(k)], nn.Linear)]
    if unknown:
        raise ValueError(f"linear_weights: {unknown} are not Linear modules of the encoder")
    linear_weights = {strip_prefix(k): v for k, v in linear_weights.items()}

    n_layers = config.num_hidden_layers
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)
    tensors = []  # (gguf name, data, raw_dtype, type)
    for mod_name, module in bert.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if isinstance(module, QATLayer):  # its quantizer state is not part of the file
            params = {k: v for k, v in params.items() if k in ("weight", "bias")}
        if not params or mod_name.startswith(_SKIPPED_PREFIXES) or mod_name == "pooler":
            continue
        kind = _module_kind(mod_name, module)
        for pname, p in params.items():
            full = f"{mod_name}.{pname}"
            gname = tmap.get_name(full, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ValueError(f"{full} ({type(module).__name__}): no tensor of llama.cpp's BERT graph holds it")
            if kind == "linear" and pname == "weight":
                w = linear_weights.get(mod_name, p)
                tensors.append((gname, *_tensor_data(gname, w, linear_type, full)))
            elif kind == "embedding" and gname.startswith("token_embd.") and pname == "weight":
                w = p if token_embd is None else token_embd
                if isinstance(w, torch.Tensor) and tuple(w.shape) != tuple(p.shape):
                    raise ValueError(f"token_embd: shape {tuple(w.shape)} != {tuple(p.shape)} of {full}")
                tensors.append((gname, *_tensor_data(gname, w, token_embd_type, full)))
            else:  # position / token-type embeddings, norms, biases: F32
                tensors.append((gname, *_tensor_data(gname, p, "f32", full)))

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    writer.add_name(name or getattr(config, "_name_or_path", "") or "bert")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_causal_attention(False)
    writer.add_pooling_type({"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS,
                             "none": gguf.PoolingType.NONE}[pooling])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    linear_kinds = {t for g, _, _, t in tensors if g.startswith("blk.") and g.endswith(".weight") and t != "f32"}
    writer.add_file_type(file_type[sorted(linear_kinds)[0]] if len(linear_kinds) == 1 else file_type["f32"])
    writer.add_token_type_count(getattr(config, "type_vocab_size", 1))
    tokens, types = _vocab(tokenizer, gguf)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = {"add_bos_token_id": tokenizer.cls_token_id, "add_sep_token_id": tokenizer.sep_token_id,
               "add_unk_token_id": tokenizer.unk_token_id, "add_pad_token_id": tokenizer.pad_token_id,
               "add_mask_token_id": tokenizer.mask_token_id}
    for method, tid in special.items():
        if tid is None:
            raise ValueError(f"tokenizer: no {method[4:-3]} (a WordPiece BERT tokenizer has [CLS], [SEP], [UNK], "
                             f"[PAD], [MASK])")
        getattr(writer, method)(int(tid))
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)
    writer.add_add_eos_token(False)
    types_out, bytes_out = {}, {}
    for gname, data, raw_dtype, ttype in tensors:
        writer.add_tensor(gname, data, raw_dtype=raw_dtype)
        types_out[gname] = ttype
        bytes_out[gname] = int(data.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFExport(path, path.stat().st_size, types_out, bytes_out)


def _module_kind(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        if not name.endswith(_LINEAR_SUFFIXES):
            raise ValueError(f"{name} (Linear): not a Linear of llama.cpp's BERT graph")
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.LayerNorm):
        return "norm"
    raise ValueError(f"{name} ({type(module).__name__}): llama.cpp's BERT graph holds only Linear, Embedding "
                     f"and LayerNorm parameters")




def _qat_blocks(name: str, module: QATLayer) -> QuantBlocks | None:
    """The GGUF blocks a QAT layer trained (None: quantization is switched off, the weight is float)."""
    if not module.config.retrain_enable:
        return None
    wcfg = module.config.retrain_weight_config
    if wcfg.gguf_type is None:
        layout = f"group_size={wcfg.group_size}" if wcfg.group_size else f"channel_wise={wcfg.channel_wise}"
        raise ValueError(
            f"{name}: {module.describe()} is quantized to {wcfg.dst_type} ({layout}), a grid llama.cpp does not "
            "hold; a GGUF stores Q8_0/Q4_0 blocks of 32 with fp16 scales: train it with "
            "retrain_weight_config.gguf_type='Q8_0' or 'Q4_0' (and dynamic_act='llama.cpp-x86')"
        )
    codes, scales = module.gguf_blocks()
    return QuantBlocks(codes, scales, wcfg.block_format)


def export_gguf(model: nn.Module, path, *, tokenizer, float_type: str = "f32", token_embd_type: str | None = None,
                pooling: str = "mean", name: str | None = None) -> GGUFExport:
    """Write a QAT BERT encoder (a transformers BertModel, or a model whose `.bert` is one) as a GGUF
    file llama.cpp runs in embedding mode.

    Each encoder LinearQAT with `retrain_weight_config.gguf_type` is stored as its trained integer
    codes and fp16 block scales (never re-quantized from float); a float (or switched-off) Linear
    as `float_type` ("f32" or "f16"). The word-embedding table: an EmbeddingQAT with a gguf_type as
    its trained blocks; a float table quantized from float the way llama-quantize does for
    `token_embd_type` (default: the linears' type when they all share one, else F32). Position and
    token-type embeddings, norms and biases are F32. Refused (ValueError naming the layer): QAT
    layers on an INT8/INT4 grid (no GGUF form), a model in training mode, QAT layers outside the
    encoder's Linears and word embeddings, non-BERT configs. `tokenizer`: the model's Hugging Face
    WordPiece tokenizer (its vocabulary goes into the file).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type={float_type!r}: expected one of {FLOAT_TYPES}")
    if model.training:
        raise RuntimeError("model: is in training mode; call model.eval() before export_gguf (the file holds the "
                           "eval forward's codes and scales)")
    bert = getattr(model, "bert", model)
    word = getattr(getattr(bert, "embeddings", None), "word_embeddings", None)
    linear_weights, token_embd, types = {}, None, set()
    for mod_name, module in bert.named_modules():
        if not isinstance(module, QATLayer):
            continue
        if module is word and isinstance(module, EmbeddingQAT):
            token_embd = _qat_blocks(mod_name, module)
            continue
        if isinstance(module, EmbeddingQAT):
            raise ValueError(f"{mod_name}: {module.describe()}: llama.cpp's BERT holds only the word-embedding "
                             "table (token_embd) quantized; position and token-type embeddings must stay float")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{mod_name}: {module.describe()}: llama.cpp's BERT graph holds Linear, Embedding "
                             "and LayerNorm parameters only")
        blocks = _qat_blocks(mod_name, module)
        if blocks is not None:
            linear_weights[mod_name] = blocks
            types.add(blocks.fmt)
    if token_embd_type is None:
        token_embd_type = types.pop() if len(types) == 1 else "f32"
    return export_bert_gguf(model, tokenizer, path, linear_weights=linear_weights, linear_type=float_type,
                            token_embd=token_embd, token_embd_type=token_embd_type, pooling=pooling, name=name)
