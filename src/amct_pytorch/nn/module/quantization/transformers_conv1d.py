"""Conv1DQAT: transformers' `Conv1D` (GPT-2's projections: a linear whose weight is stored
(in, out)) with INT8/INT4 quantization-aware training, without importing transformers.

The numerics are LinearQAT's (same activation and weight quantizers, same gradients); only the
layout differs: the weight keeps transformers' (in, out) shape and state-dict keys (`weight`,
`bias`, plus AMCT's QAT state), so checkpoints, tied weights and `save_pretrained` /
`from_pretrained` keep working, and per-channel weight scales run along dim 1 (the output
channels), which is also the DequantizeLinear axis in the exported graph (a MatMul on the stored
weight). transformers' class is found by identity in `sys.modules` when transformers is already
imported (a model holding a Conv1D has imported it), so `import amct_pytorch` never imports it.
"""
from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

import torch
import torch.nn as nn

from ....config import QATConfig, parse_config
from ....functional import WeightLayout
from ....qat_function import qat_apply
from .base import QATModuleMixin
from .layer import QATLayer, check_device, check_dtype, positive_int

__all__ = ["Conv1DFloat", "Conv1DQAT", "MatMulOp", "transformers_conv1d"]

TRANSFORMERS_MODULE = "transformers.pytorch_utils"


def transformers_conv1d(load: bool = False) -> type | None:
    """transformers' `Conv1D` class if transformers is already imported (or, with `load`, importable),
    else None. Never imports transformers unless `load` is True."""
    module = sys.modules.get(TRANSFORMERS_MODULE)
    if module is None and load:
        try:
            module = importlib.import_module(TRANSFORMERS_MODULE)
        except ImportError:
            return None
    return getattr(module, "Conv1D", None) if module is not None else None


class Conv1DFloat(nn.Module):
    """The float computation of transformers' `Conv1D` (nf outputs, nx inputs, weight (nx, nf)),
    for Conv1DQAT's float half and for building one without transformers."""

    def __init__(self, nf, nx, device=None, dtype=None):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)  # transformers' initialisation
        nn.init.zeros_(self.bias)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


class MatMulOp(NamedTuple):
    """y = x @ w + b over the last dim with w stored (in, out) (QATFunction's op protocol)."""

    layout: WeightLayout

    def forward(self, xq, wq, bias):
        y = torch.matmul(xq, wq)
        return y if bias is None else y + bias

    def grad_weight_bias(self, g, xq, weight, need_w, need_b):
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = xq.reshape(-1, xq.shape[-1]).t().mm(g2) if need_w else None
        return grad_w, (g2.sum(0) if need_b else None)

    def grad_input(self, g, x, wq):
        return g.reshape(-1, g.shape[-1]).mm(wq.t()).reshape(x.shape)


class Conv1DQAT(QATModuleMixin, Conv1DFloat):
    """transformers' Conv1D whose input (IFMR + ULQ) and weight (ARQ or ULQ) are fake-quantized,
    with LinearQAT's numerics on the (in, out) weight. `config`: as LinearQAT's (no group_size)."""

    _FLOAT = Conv1DFloat
    onnx_weight_axis = 1  # the output channels of the stored (in, out) weight (qdq.weight_axis)

    def __init__(self, nf, nx, device=None, dtype=None, config=None):
        positive_int(nf, "nf")
        positive_int(nx, "nx")
        check_dtype(dtype)
        device = check_device(device)
        cfg = parse_config(config)
        if cfg.retrain_weight_config.group_size is not None:
            raise ValueError(f"retrain_weight_config.group_size={cfg.retrain_weight_config.group_size}: group-wise "
                             "weight scales are not supported for Conv1DQAT (transformers' Conv1D) yet; use "
                             "group_size=None (per-channel or per-tensor)")
        super().__init__(nf, nx, device=device, dtype=torch.float32)
        self.config: QATConfig = cfg
        self._build_quant_state(self.weight.device)

    @classmethod
    def _check_float(cls, mod):
        floats = tuple(t for t in (transformers_conv1d(), Conv1DFloat) if t is not None)
        if type(mod) not in floats or isinstance(mod, QATLayer):
            raise TypeError(f"from_float: expected a transformers.pytorch_utils.Conv1D that is not already a "
                            f"{cls.__name__}, got {type(mod).__name__}")
        check_dtype(mod.weight.dtype, "from_float: mod.weight.dtype")

    @classmethod
    def from_float(cls, mod, config=None):
        """Wrap an existing transformers Conv1D, sharing its weight and bias Parameters."""
        cls._check_float(mod)
        qat = cls(mod.nf, mod.nx, device="meta", config=config)
        return qat._adopt(mod)

    def to_float(self) -> nn.Module:
        """A plain transformers Conv1D (Conv1DFloat without transformers) sharing the trained weights."""
        float_cls = transformers_conv1d(load=True) or Conv1DFloat
        with torch.device("meta"):
            mod = float_cls(self.nf, self.nx)
        mod.weight = self.weight
        mod.bias = self.bias
        mod.train(self.training)
        return mod

    # ---- what the shared machinery needs ----------------------------------------------
    @property
    def _out_channels(self) -> int:
        return self.nf

    def weight_layout(self) -> WeightLayout:
        # the output channels are the columns: one scale per column, reduced over the rows
        return WeightLayout((self.nx, self.nf), (1, self.nf), (0,))

    def _channel_abs_sums(self, wq):
        return wq.abs().double().sum(dim=0)

    def _check_input_shape(self, x):
        if x.dim() == 0 or x.shape[-1] != self.nx:
            raise ValueError(f"input: expected shape (..., {self.nx}) (last dim = nx, the input features), "
                             f"got {tuple(x.shape)}")

    def float_forward(self, x, weight):
        y = torch.matmul(x, weight)
        return y if self.bias is None else y + self.bias

    def _qat_call(self, x, w_scale, spec, wq, act_grid):
        return qat_apply(x, self.weight, self.bias, self.acts_clip_max, self.acts_clip_min, w_scale, spec,
                         MatMulOp(self.weight_layout()), wq, act_grid)
