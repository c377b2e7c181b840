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

from ....config import DataQuantConfig, QATConfig, parse_config
from ....functional import arq_scale, fake_quant_weight, initial_weight_scale, int_range, rows_layout, ulq_weight_scale
from ....fsdp import low_precision_params_error, write_param
from .base import _FORCE, _exporting, _torch_exporting, check_device, check_dtype, positive_int

__all__ = ["EmbeddingQAT"]


def _weight_only(cfg: QATConfig) -> QATConfig:
    if cfg.retrain_data_config != DataQuantConfig():
        raise ValueError(
            "retrain_data_config: EmbeddingQAT quantizes its table only (its input is token ids, there is no "
            f"activation to quantize); leave retrain_data_config out, got {cfg.retrain_data_config}"
        )
    if cfg.retrain_weight_config.group_size is not None:
        raise ValueError("retrain_weight_config.group_size: EmbeddingQAT supports per-tensor or per-row "
                         "(channel_wise=True) scales, not group-wise ones")
    return cfg


class _FakeQuantRows(torch.autograd.Function):
    """ŵ = fq(rows, s) with a straight-through gradient for the rows and LSQ's for s."""

    @staticmethod
    def forward(ctx, rows, scale, bits, learnable, per_scale):
        qmin, qmax = int_range(bits)
        v = rows / scale
        wq = torch.round(v).clamp(qmin, qmax) * scale
        if learnable:
            ctx.save_for_backward(v, scale)
        ctx.bits, ctx.learnable, ctx.per_scale = bits, learnable, per_scale
        return wq

    @staticmethod
    def backward(ctx, g):
        grad_s = None
        if ctx.learnable and ctx.needs_input_grad[1]:
            v, scale = ctx.saved_tensors
            qmin, qmax = int_range(ctx.bits)
            dv = torch.where((v >= qmin) & (v <= qmax), torch.round(v) - v, v.clamp(qmin, qmax))
            # LSQ's factor 1/sqrt(values per scale * qmax), as for every QAT weight
            grad_s = (g * dv).sum_to_size(scale.shape) / (ctx.per_scale * qmax) ** 0.5
        return g, grad_s, None, None, None


class EmbeddingQAT(nn.Embedding):
    """nn.Embedding whose table is fake-quantized (weight only). `config` as for LinearQAT,
    without retrain_data_config. Not part of AMCT's API."""

    _version = 1

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
        super().__init__(num_embeddings, embedding_dim, padding_idx, None, norm_type, scale_grad_by_freq, False,
                         _weight, _freeze, device=check_device(device), dtype=torch.float32)
        self.config: QATConfig = cfg
        self._build_quant_state(self.weight.device)

    def _build_quant_state(self, device):
        wcfg = self.config.retrain_weight_config
        n = self.num_embeddings if wcfg.channel_wise else 1
        f32 = dict(device=device, dtype=torch.float32)
        if wcfg.learnable_scale:
            self.wts_scales = nn.Parameter(torch.ones(n, **f32))
            self.register_buffer("wts_scale_ready", torch.tensor(False, device=device))
        else:
            self.register_buffer("wts_scales", torch.ones(n, **f32))
        self.register_buffer("wts_offsets", torch.zeros(n, device=device, dtype=torch.int8))

    @classmethod
    def from_float(cls, mod, config=None):
        """Wrap an existing nn.Embedding, sharing its weight Parameter."""
        if not isinstance(mod, nn.Embedding) or isinstance(mod, EmbeddingQAT):
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

    @property
    def is_calibrated(self) -> bool:
        """Always True: a weight-only layer has no activation to calibrate."""
        return True

    # ---- forward --------------------------------------------------------------------
    def updates_state(self) -> bool:
        if _exporting():
            return False
        return _FORCE.on or (self.training and torch.is_grad_enabled())

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
        if _torch_exporting():
            return self._forward_for_export(ids)
        wcfg = self.config.retrain_weight_config
        update = self.updates_state()
        scale = self._scale(update)
        rows = F.embedding(ids, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq)
        if wcfg.channel_wise:
            scale = F.embedding(ids, scale.unsqueeze(-1))  # each looked-up row's own scale
        per_scale = self.embedding_dim if wcfg.channel_wise else self.weight.numel()
        return _FakeQuantRows.apply(rows, scale, wcfg.num_bits, wcfg.learnable_scale, per_scale)

    def _scale(self, update):
        wcfg = self.config.retrain_weight_config
        if wcfg.learnable_scale:
            if not bool(self.wts_scale_ready):
                init = initial_weight_scale(self.weight, wcfg.num_bits, wcfg.channel_wise,
                                            rows_layout(self.weight.shape), wcfg.scale_init)
                if not update:
                    return init
                with torch.no_grad():
                    write_param(self, "wts_scales", init)  # also into this rank's FSDP2 shard
                    self.wts_scale_ready.fill_(True)
            return ulq_weight_scale(self.wts_scales)
        scale = arq_scale(self.weight, wcfg.num_bits, wcfg.channel_wise, rows_layout(self.weight.shape))
        if update:
            with torch.no_grad():
                self.wts_scales.copy_(scale)  # a buffer (FSDP2 shards only parameters)
        return scale

    def weight_qparams(self) -> torch.Tensor:
        """The scale(s) the next forward would use (no state change)."""
        with torch.no_grad():
            return self._scale(False).detach()

    def quantized_table(self):
        """(int8 codes shaped like the table, scales (rows,) or (1,)) of the eval forward."""
        from ....functional import quantize_weight

        scale = self.weight_qparams()
        return quantize_weight(self.weight.detach(), scale, self.config.retrain_weight_config.num_bits,
                               rows_layout(self.weight.shape)), scale

    def _forward_for_export(self, ids):
        """Gather the int8 rows and their scales, then dequantize (the table is never dequantized whole)."""
        from ....export import pinned_embedding

        codes, scale = pinned_embedding(self)
        rows = F.embedding(ids, codes)
        if scale.numel() > 1:
            return rows.to(torch.float32) * F.embedding(ids, scale.unsqueeze(-1))
        return rows.to(torch.float32) * scale.reshape(())

    def extra_repr(self) -> str:
        wcfg = self.config.retrain_weight_config
        base = super().extra_repr()
        if not self.config.retrain_enable:
            return base + ", retrain_enable=False"
        return (f"{base}, weight={wcfg.dst_type} {wcfg.weights_retrain_algo} "
                f"{'per-row' if wcfg.channel_wise else 'per-tensor'} (weight only)")

    def fake_quantized_weight(self) -> torch.Tensor:
        """The whole fake-quantized table the eval forward looks rows up in (for checks)."""
        with torch.no_grad():
            return fake_quant_weight(self.weight, self.weight_qparams(), self.config.retrain_weight_config.num_bits,
                                     rows_layout(self.weight.shape))
