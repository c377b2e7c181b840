"""EmbeddingQAT (extension): a weight-only quantized nn.Embedding.

An embedding's input is token ids, so there is no activation to quantize; its table is
quantized with `retrain_weight_config` (ARQ or a learnable ULQ scale, per tensor or per row
with `channel_wise=True`, INT8 or INT4), with the same gradients as every other QAT weight:
straight-through for the table, LSQ-style for a learnable scale. Per-row scales make
quantize-then-gather equal gather-then-quantize, so a step only fake-quantizes the rows it
looks up, and the ONNX graph gathers int8 rows and their scales before dequantizing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ....blockwise import fake_quant_weight_from_float, fake_quant_weight_learned, weight_codes_from_float
from ....config import DataQuantConfig, QATConfig, parse_config
from ....functional import WeightLayout, quantize_weight, rows_layout
from ....params import low_precision_params_error
from ....qat_function import FakeQuantRows
from ....runtime import pinned_for, torch_exporting
from .layer import QATLayer, check_device, check_dtype, positive_int

__all__ = ["EmbeddingQAT"]


def _weight_only(cfg: QATConfig) -> QATConfig:
    if cfg.retrain_data_config != DataQuantConfig():
        raise ValueError(
            "retrain_data_config: EmbeddingQAT quantizes its table only (its input is token ids, there is no "
            f"activation to quantize); leave retrain_data_config out, got {cfg.retrain_data_config}"
        )
    wcfg = cfg.retrain_weight_config
    if wcfg.gguf_type is not None:
        return cfg  # blocks of 32 along each row (the hidden dim), as llama.cpp stores token_embd
    if wcfg.group_size is not None:
        raise ValueError("retrain_weight_config.group_size: EmbeddingQAT supports per-tensor or per-row "
                         "(channel_wise=True) scales, not group-wise ones")
    return cfg


class EmbeddingQAT(QATLayer, nn.Embedding):
    """nn.Embedding whose table is fake-quantized (weight only). `config` as for LinearQAT,
    without retrain_data_config. Not part of AMCT's API."""

    _FLOAT = nn.Embedding

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, _freeze=False, device=None, dtype=None,
                 config=None):
        positive_int(num_embeddings, "num_embeddings")
        positive_int(embedding_dim, "embedding_dim")
        check_dtype(dtype)
        if max_norm is not None:
            raise ValueError("max_norm: EmbeddingQAT does not renormalise rows in place (it would edit the float "
                             f"master table behind the quantizer's back); got max_norm={max_norm!r}")
        if sparse:
            raise ValueError("sparse: EmbeddingQAT computes dense gradients (its scales need them); got sparse=True")
        cfg = _weight_only(parse_config(config))
        group = cfg.retrain_weight_config.group_size
        if cfg.retrain_weight_config.gguf_type is not None and embedding_dim % group:
            raise ValueError(f"retrain_weight_config.gguf_type={cfg.retrain_weight_config.gguf_type!r}: "
                             f"embedding_dim={embedding_dim} is not a multiple of its block length {group}")
        super().__init__(num_embeddings, embedding_dim, padding_idx, None, norm_type, scale_grad_by_freq, False,
                         _weight, _freeze, device=check_device(device), dtype=torch.float32)
        self.config: QATConfig = cfg
        self._build_quant_state(self.weight.device)

    def _build_quant_state(self, device):
        self._build_weight_state(device)

    def weight_layout(self) -> WeightLayout:
        return rows_layout(self.weight.shape)

    def n_weight_scales(self) -> int:
        wcfg = self.config.retrain_weight_config
        if wcfg.gguf_type is not None:
            return self.num_embeddings * (self.embedding_dim // wcfg.group_size)
        return self.num_embeddings if wcfg.channel_wise else 1

    @classmethod
    def from_float(cls, mod, config=None):
        """Wrap an existing nn.Embedding, sharing its weight Parameter."""
        if not isinstance(mod, nn.Embedding) or isinstance(mod, QATLayer):
            raise TypeError(f"from_float: expected a torch.nn.Embedding that is not already an EmbeddingQAT, "
                            f"got {type(mod).__name__}")
        check_dtype(mod.weight.dtype, "from_float: mod.weight.dtype")
        if mod.max_norm is not None or mod.sparse:
            raise ValueError(f"from_float: max_norm={mod.max_norm!r} / sparse={mod.sparse!r} are not supported by "
                             "EmbeddingQAT")
        qat = cls(mod.num_embeddings, mod.embedding_dim, mod.padding_idx, None, mod.norm_type,
                  mod.scale_grad_by_freq, False, device="meta", config=config)
        qat.weight = mod.weight
        qat._build_quant_state(mod.weight.device)
        qat.train(mod.training)
        return qat

    def to_float(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, None, self.norm_type,
                           self.scale_grad_by_freq, False, device="meta")
        emb.weight = self.weight
        emb.train(self.training)
        return emb

    # ---- forward --------------------------------------------------------------------
    def _check_ids(self, ids):
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"input: expected a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input: expected int64 or int32 token ids, got {ids.dtype}")
        if self.weight.dtype != torch.float32:
            raise low_precision_params_error(self, "weight", self.weight.dtype)

    def forward(self, ids):
        if not self.config.retrain_enable:
            return nn.Embedding.forward(self, ids)
        self._check_ids(ids)
        if torch_exporting():
            return self.export_forward(ids)
        wcfg = self.config.retrain_weight_config
        if wcfg.gguf_type is not None and not wcfg.learnable_scale:
            # llama-quantize's blocks of the rows looked up (a block never spans rows): no pass over the table
            rows = F.embedding(ids, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq)
            return self._gguf_rows_from_float(ids, rows)
        scale = self._weight_scale(self.updates_state())
        rows = F.embedding(ids, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq)
        if wcfg.gguf_type is not None:
            return self._gguf_rows(ids, rows, scale)
        if wcfg.channel_wise:
            scale = F.embedding(ids, scale.unsqueeze(-1))  # each looked-up row's own scale
        per_scale = self.embedding_dim if wcfg.channel_wise else self.weight.numel()
        return FakeQuantRows.apply(rows, scale, wcfg.num_bits, wcfg.learnable_scale, per_scale)

    def _gguf_rows_from_float(self, ids, rows):
        """ARQ-like GGUF rows; a state-updating forward stores those rows' d in `wts_scales`."""
        fmt = self.config.retrain_weight_config.block_format
        flat = rows.reshape(-1, self.embedding_dim)
        if self.updates_state():
            with torch.no_grad():
                d = weight_codes_from_float(flat.detach(), fmt)[1].to(torch.float32)
                self.wts_scales.view(self.num_embeddings, -1).index_copy_(0, ids.reshape(-1), d)
        return fake_quant_weight_from_float(flat, fmt).reshape(rows.shape)

    def _gguf_rows(self, ids, rows, scale):
        """The looked-up rows in the GGUF block format (blocks along each row, so quantize-then-gather
        equals gather-then-quantize): llama-quantize's blocks, or those of the learned block scales."""
        fmt = self.config.retrain_weight_config.block_format
        flat = rows.reshape(-1, self.embedding_dim)
        if self.config.retrain_weight_config.learnable_scale and self._wts_ready:
            d = F.embedding(ids.reshape(-1), scale.reshape(self.num_embeddings, -1))
            out = fake_quant_weight_learned(flat, d, fmt)
        else:
            out = fake_quant_weight_from_float(flat, fmt)
        return out.reshape(rows.shape)

    def quantized_table(self):
        """(int8 codes shaped like the table, scales (rows,) or (1,)) of the eval forward."""
        if self.config.retrain_weight_config.gguf_type is not None:
            raise ValueError(f"{self.describe()}: retrain_weight_config.gguf_type="
                             f"{self.config.retrain_weight_config.gguf_type!r} is a llama.cpp block format with no "
                             "ONNX form here; export the model with amct_pytorch.export.export_gguf")
        with torch.no_grad():
            scale = self.weight_qparams().detach()
        return quantize_weight(self.weight.detach(), scale, self.config.retrain_weight_config.num_bits,
                               rows_layout(self.weight.shape)), scale

    def export_constants(self):
        """What export_onnx pins for the export forward: `quantized_table()`."""
        return self.quantized_table()

    def export_forward(self, ids):
        """Gather the int8 rows and their scales, then dequantize (the table is never dequantized whole):
        the constants export_onnx computed from the real table, else computed now."""
        codes, scale = pinned_for(self) or self.quantized_table()
        rows = F.embedding(ids, codes)
        if scale.numel() > 1:
            return rows.to(torch.float32) * F.embedding(ids, scale.unsqueeze(-1))
        return rows.to(torch.float32) * scale.reshape(())

    def extra_repr(self) -> str:
        wcfg = self.config.retrain_weight_config
        base = super().extra_repr()
        if not self.config.retrain_enable:
            return base + ", retrain_enable=False"
        layout = "per-row" if wcfg.channel_wise else "per-tensor"
        if wcfg.gguf_type is not None:
            return f"{base}, weight={wcfg.gguf_type} {wcfg.weights_retrain_algo} blocks of {wcfg.group_size} (weight only)"
        return f"{base}, weight={wcfg.dst_type} {wcfg.weights_retrain_algo} {layout} (weight only)"
