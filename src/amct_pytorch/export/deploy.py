"""The deploy view: every calibrated QAT module's integer weights and factors, as an integer
runtime sees them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..convert import quantized_layers
from ..functional import WeightLayout, scale_view
from ..nn.module.quantization.qdq import module_qparams
from .storage import UINT8_ZERO_POINT, as_uint8, check_storage, choose_storage


@dataclass(frozen=True)
class DeployedLayer:
    """One QAT module as an integer runtime sees it, e.g. for a linear:
    y = (x_q - act_offset)·act_scale @ (weight·weight_scale)ᵀ + bias (a conv: the same codes in its op).

    `weight` holds the integer codes as the artifact stores them, shaped like the float weight:
    int8 with zero point 0 (INT4 codes, in [-8, 7], also live in int8), or, for an INT8 layer whose
    codes could saturate ORT's u8s8 kernel on CPUs without VNNI, uint8 codes + 128 with
    `weight_zero_point` 128 (`storage` says which and `storage_reason` why; export/storage.py).
    `codes()` gives the signed codes either way. `weight_scale` has shape (1,), (out_channels,)
    or one per group/block; `layout` says how it maps onto the weight (None: rows, dim 0).

    A layer that quantizes its input on the fly (`retrain_data_config.dynamic_act`: llama.cpp's
    Q8_0, ORT MatMulNBits level 4) has no static activation factors: `act_scale` and `act_offset`
    are None, `act_dynamic` names the quantizer and `act_block` its block length. A llama.cpp
    block-format layer (`gguf_type`) has `storage` "Q8_0"/"Q4_0" and its fp16-stored block scales.
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_bits: int
    act_scale: float | None
    act_offset: int | None
    act_bits: int
    bias: torch.Tensor | None
    layout: WeightLayout | None = None
    weight_zero_point: int = 0
    storage: str = "int8"
    storage_reason: str = ""
    act_dynamic: str | None = None
    act_block: int | None = None

    def codes(self) -> torch.Tensor:
        """The signed integer codes (int8), whatever the storage."""
        return (self.weight.to(torch.int16) - self.weight_zero_point).to(torch.int8)

    def dequantized_weight(self) -> torch.Tensor:
        codes = self.codes().to(torch.float32)
        if self.weight_scale.numel() == 1:
            return codes * self.weight_scale.reshape(())
        view = codes.reshape(self.layout.view) if self.layout is not None else codes.reshape(codes.shape[0], -1)
        return (view * scale_view(self.weight_scale, self.layout)).reshape(codes.shape)


DeployedLinear = DeployedLayer  # the name of the first release


@torch.no_grad()
def deploy_view(model: nn.Module, *, int8_storage: str = "auto") -> dict[str, DeployedLayer]:
    """The integer weights and factors of every calibrated QAT module in `model`, by module name,
    stored as `export_onnx(..., int8_storage=...)` stores them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    check_storage(int8_storage)
    view = {}
    for name, m in quantized_layers(model).items():
        q = module_qparams(m)
        layout = m.weight_layout()
        codes = m.weight_codes()  # the trained codes (on a kernel grid: pair-capped or 7-bit)
        storage, why, zero_point = _storage(m, codes, q.weight_bits, int8_storage)
        if storage == "uint8":
            codes = torch.from_numpy(as_uint8(codes.cpu().numpy())).to(codes.device)
        dynamic = m.act_block_spec()
        view[name] = DeployedLayer(
            weight=codes,
            weight_scale=q.weight_scale,
            weight_bits=q.weight_bits,
            act_scale=None if dynamic else float(q.act_scale),
            act_offset=None if dynamic else int(q.act_offset),
            act_bits=q.act_bits,
            bias=None if m.bias is None else m.bias.detach().clone(),
            layout=layout,
            weight_zero_point=zero_point,
            storage=storage,
            storage_reason=why,
            act_dynamic=m.config.retrain_data_config.dynamic_act,
            act_block=dynamic.block if dynamic else None,
        )
    return view


def _storage(m, codes, bits, int8_storage):
    """(storage, why, zero point) of a module's codes, as the export's fold pass decides it."""
    gguf_type = m.config.retrain_weight_config.gguf_type
    if gguf_type is not None:
        return gguf_type, "llama.cpp block format: export_gguf stores these codes with an fp16 d per 32 weights along K", 0
    if bits == 4:
        return "int4", "INT4 codes (|q| <= 8) cannot saturate", 0
    if m.config.retrain_weight_config.group_size is not None:
        return "int8", "blocked codes behind a DequantizeLinear: ORT dequantizes, then a float MatMul", 0
    if getattr(m, "transposed", False):
        order, groups = None, 1
    elif getattr(m, "onnx_weight_axis", 0) == 1:  # transformers' Conv1D: the stored (in, out) weight is MatMul's B
        order, groups = "matmul", 1
    elif hasattr(m, "in_channels"):
        order, groups = "conv", m.groups
    else:
        order, groups = "linear", 1
    storage, why = choose_storage(codes.cpu().numpy(), order, groups, int8_storage)
    return storage, why, UINT8_ZERO_POINT if storage == "uint8" else 0
