"""The deploy view: every calibrated QAT module's integer weights and factors, as an integer
runtime sees them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..convert import quantized_layers
from ..functional import WeightLayout, scale_view
from ..nn.module.quantization.qdq import module_qparams


@dataclass(frozen=True)
class DeployedLayer:
    """One QAT module as an integer runtime sees it, e.g. for a linear:
    y = (x_q - act_offset)·act_scale @ (weight·weight_scale)ᵀ + bias (a conv: the same codes in its op).

    `weight` holds the integer codes as int8 (INT4 codes, in [-8, 7], also live in int8), shaped
    like the float weight; the weight zero point is 0. `weight_scale` has shape (1,) or
    (out_channels,); `layout` says how it maps onto the weight (None: rows, dim 0).
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_bits: int
    act_scale: float
    act_offset: int
    act_bits: int
    bias: torch.Tensor | None
    layout: WeightLayout | None = None

    def dequantized_weight(self) -> torch.Tensor:
        codes = self.weight.to(torch.float32)
        if self.weight_scale.numel() == 1:
            return codes * self.weight_scale.reshape(())
        view = codes.reshape(self.layout.view) if self.layout is not None else codes.reshape(codes.shape[0], -1)
        return (view * scale_view(self.weight_scale, self.layout)).reshape(codes.shape)


DeployedLinear = DeployedLayer  # the name of the first release


@torch.no_grad()
def deploy_view(model: nn.Module) -> dict[str, DeployedLayer]:
    """The integer weights and factors of every calibrated QAT module in `model`, by module name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    view = {}
    for name, m in quantized_layers(model).items():
        q = module_qparams(m)
        layout = m.weight_layout()
        view[name] = DeployedLayer(
            weight=m.weight_codes(),  # the trained codes (on a kernel grid: pair-capped or 7-bit)
            weight_scale=q.weight_scale,
            weight_bits=q.weight_bits,
            act_scale=float(q.act_scale),
            act_offset=int(q.act_offset),
            act_bits=q.act_bits,
            bias=None if m.bias is None else m.bias.detach().clone(),
            layout=layout,
        )
    return view
