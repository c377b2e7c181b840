"""LinearQAT: a drop-in torch.nn.Linear with INT8/INT4 quantization-aware training.

The quantization itself (and the state rule) lives in `base.QATModuleMixin`, shared by
every QAT module; this class adds the linear op and its channel axis (weight rows).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ....config import QATConfig, parse_config
from ....functional import WeightLayout, rows_layout
from ....qat_function import LINEAR, LinearOp, qat_apply
from ....runtime import calibrating
from .base import QATModuleMixin
from .layer import check_device, check_dtype, positive_int

__all__ = ["LinearQAT", "calibrating"]


class LinearQAT(QATModuleMixin, nn.Linear):
    """nn.Linear whose input (IFMR + ULQ) and weight (ARQ or ULQ) are fake-quantized.

    See the README's config table; `config` is None, a dict, or a path to a JSON file.
    """

    _FLOAT = nn.Linear

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, config=None):
        positive_int(in_features, "in_features")
        positive_int(out_features, "out_features")
        check_dtype(dtype)
        device = check_device(device)
        cfg = parse_config(config)
        group = cfg.retrain_weight_config.group_size
        if group is not None and in_features % group:
            raise ValueError(f"retrain_weight_config.group_size={group} does not divide in_features={in_features}; "
                             "use a power of two >= 16 that divides it, or None")
        super().__init__(in_features, out_features, bias=bool(bias), device=device, dtype=torch.float32)
        self.config: QATConfig = cfg
        self._build_quant_state(self.weight.device)

    @classmethod
    def from_float(cls, mod, config=None):
        """Wrap an existing nn.Linear, sharing its weight and bias Parameters."""
        cls._check_float(mod)
        qat = cls(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta", config=config)
        return qat._adopt(mod)

    def to_float(self) -> nn.Linear:
        """A plain nn.Linear holding (sharing) the trained float master weights."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        lin.train(self.training)
        return lin

    # ---- what the shared machinery needs ----------------------------------------------
    @property
    def _out_channels(self) -> int:
        return self.out_features

    def weight_layout(self) -> WeightLayout:
        group = self.config.retrain_weight_config.group_size
        if group is None:
            return rows_layout(self.weight.shape)
        # group-wise: one scale per (output row, block of `group` input features)
        return WeightLayout((self.out_features, self.in_features // group, group),
                            (self.out_features, self.in_features // group, 1), (2,))

    def n_weight_scales(self) -> int:
        group = self.config.retrain_weight_config.group_size
        if group is None:
            return super().n_weight_scales()
        return self.out_features * (self.in_features // group)

    def kernel_order(self):
        # MatMul / MatMulIntegerToFloat reduce over in_features: pairs (2j, 2j + 1) of a weight row
        return ("linear", 1) if self.config.retrain_weight_config.group_size is None else None

    def _check_input_shape(self, x):
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input: expected shape (..., {self.in_features}) (last dim = in_features), got {tuple(x.shape)}"
            )

    def float_forward(self, x, weight):
        return F.linear(x, weight, self.bias)

    def _qat_call(self, x, w_scale, spec, wq, act_grid):
        op = LINEAR if self.config.retrain_weight_config.group_size is None else LinearOp(self.weight_layout())
        return qat_apply(x, self.weight, self.bias, self.acts_clip_max, self.acts_clip_min, w_scale, spec, op,
                         wq, act_grid)
