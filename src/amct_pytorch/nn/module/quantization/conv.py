"""The conv family: Conv1d/2d/3dQAT and ConvTranspose1d/2d/3dQAT.

Each class adds to the shared quantizers (base.QATModuleMixin) only its float op
(torch.convolution, forward and backward) and the channel axis of its weight: dim 0 for a
conv, (group, dim 1) for a transposed conv. Activations are quantized per tensor on the
layer's input, before any padding: padding copies values (or adds zeros, which every
activation grid holds exactly), so quantize-then-pad equals pad-then-quantize, forward and
backward. AMCT's documented positional order is kept:
(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
device, dtype, config); transposed classes take `output_padding` as keyword only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ....config import QATConfig, parse_config
from ....functional import WeightLayout, rows_layout
from ....qat_function import ConvOp, qat_apply
from .base import QATModuleMixin
from .layer import check_device, check_dtype, positive_int

__all__ = ["Conv1dQAT", "Conv2dQAT", "Conv3dQAT", "ConvTranspose1dQAT", "ConvTranspose2dQAT", "ConvTranspose3dQAT"]


def _check_common(in_channels, out_channels, dtype, device, config):
    positive_int(in_channels, "in_channels")
    positive_int(out_channels, "out_channels")
    check_dtype(dtype)
    cfg = parse_config(config)
    if cfg.retrain_weight_config.group_size is not None:
        raise ValueError(
            f"retrain_weight_config.group_size={cfg.retrain_weight_config.group_size}: group-wise weight scales "
            "are supported for LinearQAT only (a conv's input features are channels x kernel positions, which no "
            "ONNX blocked DequantizeLinear groups); use channel_wise=True without group_size for convs"
        )
    return check_device(device), cfg


def _conv_kwargs(mod) -> dict:
    """The constructor arguments of a (QAT or float) conv layer, bias and device aside."""
    return dict(in_channels=mod.in_channels, out_channels=mod.out_channels, kernel_size=mod.kernel_size,
                stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups,
                padding_mode=mod.padding_mode)


class _ConvQATBase(QATModuleMixin):
    _ND: int

    @property
    def _out_channels(self) -> int:
        return self.out_channels

    def _check_input_shape(self, x):
        nd = self._ND
        if x.dim() not in (nd + 1, nd + 2) or x.shape[-(nd + 1)] != self.in_channels:
            raise ValueError(
                f"input: expected shape (N, {self.in_channels}, {', '.join('*' * nd)}) or ({self.in_channels}, "
                f"{', '.join('*' * nd)}) (dim -{nd + 1} = in_channels), got {tuple(x.shape)}"
            )

    def _qat_call(self, x, w_scale, spec, wq, act_grid, *args, **kwargs):
        unbatched = x.dim() == self._ND + 1
        if unbatched:
            x = x.unsqueeze(0)
        x, op = self._prepare(x, *args, **kwargs)
        y = qat_apply(x, self.weight, self.bias, self.acts_clip_max, self.acts_clip_min, w_scale, spec, op, wq,
                      act_grid)
        return y.squeeze(0) if unbatched else y

    @classmethod
    def from_float(cls, mod, config=None):
        """Wrap an existing float conv, sharing its weight and bias Parameters."""
        cls._check_float(mod)
        qat = cls(**cls._float_kwargs(mod), bias=mod.bias is not None, device="meta", config=config)
        return qat._adopt(mod)

    def to_float(self):
        """The float layer with the same settings, holding (sharing) the trained float master weights."""
        flt = self._FLOAT(**self._float_kwargs(self), bias=self.bias is not None, device="meta")
        flt.weight = self.weight
        flt.bias = self.bias
        flt.train(self.training)
        return flt


class _ConvNdQAT(_ConvQATBase):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", device=None, dtype=None, config=None):
        device, cfg = _check_common(in_channels, out_channels, dtype, device, config)
        self._FLOAT.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                             dilation=dilation, groups=groups, bias=bool(bias), padding_mode=padding_mode,
                             device=device, dtype=torch.float32)
        self.config: QATConfig = cfg
        self._build_quant_state(self.weight.device)

    @staticmethod
    def _float_kwargs(mod):
        return _conv_kwargs(mod)

    def weight_layout(self) -> WeightLayout:
        return rows_layout(self.weight.shape)

    def kernel_order(self):
        # QLinearConv reduces over (*kernel, in/groups), input channel fastest (pair_grid "conv")
        return ("conv", self.groups)

    def float_forward(self, x, weight):
        return self._conv_forward(x, weight, self.bias)

    def _prepare(self, x):
        """(input for the convolution, ConvOp with explicit integer padding)."""
        nd = self._ND
        padding = self.padding
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0,) * nd
        elif padding == "valid":
            padding = (0,) * nd
        elif padding == "same":
            pads = self._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
            if all(pads[i] == pads[i + 1] for i in range(0, len(pads), 2)):
                padding = tuple(pads[2 * i] for i in range(nd - 1, -1, -1))
            else:  # an even total (even kernel x dilation): torch pads one more on the right
                x, padding = F.pad(x, pads), (0,) * nd
        op = ConvOp(tuple(self.stride), tuple(padding), tuple(self.dilation), False, (0,) * nd, self.groups,
                    self.weight_layout())
        return x, op


class _ConvTransposeNdQAT(_ConvQATBase):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", device=None, dtype=None, config=None, *, output_padding=0):
        device, cfg = _check_common(in_channels, out_channels, dtype, device, config)
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode: {type(self).__name__} supports only 'zeros' (as torch's "
                             f"{self._FLOAT.__name__}), got {padding_mode!r}")
        self._FLOAT.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                             output_padding=output_padding, groups=groups, bias=bool(bias), dilation=dilation,
                             padding_mode=padding_mode, device=device, dtype=torch.float32)
        self.config: QATConfig = cfg
        self._build_quant_state(self.weight.device)

    @staticmethod
    def _float_kwargs(mod):
        return {**_conv_kwargs(mod), "output_padding": mod.output_padding}

    def weight_layout(self) -> WeightLayout:
        # weight (in, out/g, *k): output channel g*(out/g) + j is weight[g*(in/g):(g+1)*(in/g), j]
        g = self.groups
        w_in, w_out = self.weight.shape[0], self.weight.shape[1]
        return WeightLayout((g, w_in // g, w_out, -1), (g, 1, w_out, 1), (1, 3))

    def _channel_abs_sums(self, wq):
        return wq.reshape(self.weight_layout().view).abs().double().sum(dim=(1, 3)).reshape(-1)

    def _output_padding_for(self, x, output_size):
        return tuple(self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, self._ND,
                                          self.dilation))

    def float_forward(self, x, weight, output_size=None):
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self._ND - 1]
        return conv(x, weight, self.bias, self.stride, self.padding, self._output_padding_for(x, output_size),
                    self.groups, self.dilation)

    def _prepare(self, x, output_size=None):
        op = ConvOp(tuple(self.stride), tuple(self.padding), tuple(self.dilation), True,
                    self._output_padding_for(x, output_size), self.groups, self.weight_layout())
        return x, op


class Conv1dQAT(_ConvNdQAT, nn.Conv1d):
    """nn.Conv1d with AMCT QAT (extension: AMCT documents the 2d/3d classes)."""

    _FLOAT, _ND = nn.Conv1d, 1


class Conv2dQAT(_ConvNdQAT, nn.Conv2d):
    """nn.Conv2d whose input (IFMR + ULQ, per tensor) and weight (ARQ or ULQ, per tensor or per
    output channel) are fake-quantized. AMCT path: amct_pytorch.nn.module.quantization.conv2d."""

    _FLOAT, _ND = nn.Conv2d, 2


class Conv3dQAT(_ConvNdQAT, nn.Conv3d):
    """nn.Conv3d with AMCT QAT. AMCT path: amct_pytorch.nn.module.quantization.conv3d."""

    _FLOAT, _ND = nn.Conv3d, 3


class ConvTranspose1dQAT(_ConvTransposeNdQAT, nn.ConvTranspose1d):
    """nn.ConvTranspose1d with AMCT QAT (extension)."""

    _FLOAT, _ND = nn.ConvTranspose1d, 1


class ConvTranspose2dQAT(_ConvTransposeNdQAT, nn.ConvTranspose2d):
    """nn.ConvTranspose2d with AMCT QAT; per-channel weight scales are per output channel
    (weight dim 1, per group). AMCT path: amct_pytorch.nn.module.quantization.conv_transpose_2d."""

    _FLOAT, _ND = nn.ConvTranspose2d, 2


class ConvTranspose3dQAT(_ConvTransposeNdQAT, nn.ConvTranspose3d):
    """nn.ConvTranspose3d with AMCT QAT (extension)."""

    _FLOAT, _ND = nn.ConvTranspose3d, 3
