"""`QATLayer`: what every QAT layer shares, the embedding table included: its config, the state
rule, argument checks and the one weight quantizer (ARQ, or a learnable ULQ scale, with a host
mirror of its readiness and a cache of ŵ for forwards that do not update state).

A layer type adds its float op and how its weight maps onto output channels:
`weight_layout()` and `n_weight_scales()` here; `float_forward` for layers with an activation
quantizer (`QATModuleMixin` in base.py). State keeps AMCT's names on the module itself
(`wts_scales`, `wts_offsets`, ...), so checkpoints of any release load.

State rule: a layer changes its own state only in a *state-updating* forward, i.e. training
mode with autograd enabled, or any forward inside `amct_pytorch.calibrating()`. Eval mode,
`torch.no_grad()`, ONNX export and tracing never change state.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ....blockwise import initial_block_scale, storable_scale, weight_codes_from_float, weight_codes_learned
from ....config import QATConfig
from ....functional import (WeightLayout, arq_scale, fake_quant_weight, initial_weight_scale, int_range,
                            ulq_weight_scale)
from ....pair_grid import grid_weight, pair_mse_scale
from ....params import write_param
from ....qat_function import WeightCache, weight_fake_quant
from ....runtime import calibrating_now, exporting


def positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_dtype(dtype, what="dtype"):
    if dtype is not None and dtype != torch.float32:
        raise TypeError(f"{what}: only torch.float32 parameters are supported, got {dtype}")


def check_device(device):
    try:
        return torch.device(device) if device is not None else None
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a valid torch device ({err})") from None


class QATLayer:
    """The base of every QAT layer; put it before the float layer class in the bases.

    `isinstance(m, QATLayer)`: m is a QAT layer of any kind (EmbeddingQAT too);
    `isinstance(m, QATModuleMixin)`: it also quantizes its input activation.
    """

    _version = 1
    _FLOAT: type[nn.Module]  # the float layer this module replaces (nn.Linear, nn.Embedding, ...)
    config: QATConfig
    _switched_off = False  # disable_quantization() turned retrain_enable off (a class default: old pickles)
    _wq_cache = None

    # ---- what a layer type provides ---------------------------------------------------
    def weight_layout(self) -> WeightLayout | None:
        """How the weight maps onto output channels (see functional.WeightLayout)."""
        raise NotImplementedError

    def n_weight_scales(self) -> int:
        """How many weight scales the config asks for: 1 or one per output channel."""
        raise NotImplementedError

    def kernel_order(self) -> tuple[str, int] | None:
        """(order, groups) in which an integer kernel reduces this layer's weight (pair_grid.ORDERS),
        for the kernel-aware weight grid; None: the layer does not run an integer matmul or conv
        (retrain_weight_config.kernel_grid must then stay 'full')."""
        return None

    def describe(self) -> str:
        """The layer as messages name it: its class and float arguments."""
        return f"{type(self).__name__}({self._FLOAT.extra_repr(self)})"

    @property
    def is_calibrated(self) -> bool:
        """Whether the layer has every factor its eval forward needs (True: nothing to calibrate)."""
        return True

    # ---- the state rule ------------------------------------------------------------------
    def updates_state(self) -> bool:
        """Whether a forward call now may change this module's state (see module doc)."""
        if exporting():
            return False
        return calibrating_now() or (self.training and torch.is_grad_enabled())

    # ---- on/off switch (amct_pytorch.disable_quantization / enable_quantization) ------------
    def switch_off(self) -> bool:
        """retrain_enable=False, remembered so that `switch_on` restores exactly this; True if it changed."""
        if not self.config.retrain_enable:
            return False
        self.config = dataclasses.replace(self.config, retrain_enable=False)
        self._switched_off = True
        return True

    def switch_on(self) -> bool:
        """Undo `switch_off` (a layer configured with retrain_enable=False stays off); True if it changed."""
        if not self._switched_off:
            return False
        self.config = dataclasses.replace(self.config, retrain_enable=True)
        self._switched_off = False
        return True

    # ---- the weight quantizer: state ------------------------------------------------------
    def _build_weight_state(self, device) -> None:
        wcfg = self.config.retrain_weight_config
        if wcfg.kernel_grid != "full" and self.config.retrain_enable and self.kernel_order() is None:
            raise ValueError(
                f"retrain_weight_config.kernel_grid={wcfg.kernel_grid!r}: {type(self).__name__} does not run an "
                "integer matmul or conv in ONNX Runtime (kernel grids apply to LinearQAT and Conv1d/2d/3dQAT); "
                "give this layer kernel_grid='full' (e.g. through to_qat's overrides)"
            )
        n_scales = self.n_weight_scales()
        f32 = dict(device=device, dtype=torch.float32)
        if wcfg.learnable_scale:
            self.wts_scales = nn.Parameter(torch.ones(n_scales, **f32))
            self.register_buffer("wts_scale_ready", torch.tensor(False, device=device))
        else:
            self.register_buffer("wts_scales", torch.ones(n_scales, **f32))
        self.register_buffer("wts_offsets", torch.zeros(n_scales, device=device, dtype=torch.int8))
        self._wts_ready = False  # host mirror of wts_scale_ready (ULQ weights): no device sync per call
        self._wq_cache = None

    @torch.no_grad()
    def _reset_weight_state(self) -> None:
        self.wts_scales.fill_(1.0)
        self.wts_offsets.zero_()
        if hasattr(self, "wts_scale_ready"):
            self.wts_scale_ready.fill_(False)
        self._wts_ready = False
        self._wq_cache = None

    def __setstate__(self, state):
        # modules pickled by earlier releases lack the newer host-side flags
        state.setdefault("_wts_ready", bool(state.get("_buffers", {}).get("wts_scale_ready", False)))
        if state.pop("_amct_disabled", False):  # the switch's first name (an ad-hoc attribute)
            state["_switched_off"] = True
        super().__setstate__(state)

    def sync_host_state(self) -> None:
        """Refresh the host-side mirrors of the state buffers after those were replaced from outside
        (load_state_dict, or a loader that assigns each tensor, e.g. transformers' from_pretrained)."""
        self._wts_ready = bool(self.wts_scale_ready) if hasattr(self, "wts_scale_ready") else False
        self._wq_cache = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.sync_host_state()

    # ---- the weight quantizer: scales and ŵ ------------------------------------------------
    def _weight_2d(self) -> torch.Tensor:
        """The weight as (rows, K): the rows along which a GGUF block format runs its blocks."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def _block_scale_from_float(self) -> torch.Tensor:
        """llama-quantize's d of the current weight, flat (rows * K/32,) float32 (fp16 values)."""
        with torch.no_grad():
            return initial_block_scale(self._weight_2d(), self.config.retrain_weight_config.block_format).reshape(-1)

    def _weight_scale(self, update: bool) -> torch.Tensor:
        wcfg = self.config.retrain_weight_config
        if wcfg.block_format is not None and not wcfg.learnable_scale:
            scale = self._block_scale_from_float()
            if update:
                self.wts_scales.copy_(scale)
            return scale
        if wcfg.learnable_scale:
            if not self._wts_ready:
                init = self.weight_scale_init()
                if not update:
                    return init
                with torch.no_grad():
                    write_param(self, "wts_scales", init)  # also into this rank's FSDP2 shard
                    self.wts_scale_ready.fill_(True)
                self._wts_ready = True
            # a GGUF block scale is used as it is (signed, fp16-rounded in the quantizer); ULQ's as |s|
            return self.wts_scales if wcfg.block_format is not None else ulq_weight_scale(self.wts_scales)
        scale = arq_scale(self.weight, wcfg.grid_bits, wcfg.channel_wise, self.weight_layout())
        if update:
            self.wts_scales.copy_(scale)
        return scale

    def weight_scale_init(self) -> torch.Tensor:
        """A learnable scale's first value (retrain_weight_config.scale_init: ARQ or MSE)."""
        wcfg = self.config.retrain_weight_config
        if wcfg.block_format is not None:
            return self._block_scale_from_float()
        if wcfg.scale_init == "pair_mse":  # the pair-capped grid's best multiple of the max-abs step
            with torch.no_grad():
                base = arq_scale(self.weight, wcfg.num_bits, wcfg.channel_wise, self.weight_layout())
                return pair_mse_scale(self.weight, base, *self.kernel_order()).reshape(base.shape)
        return initial_weight_scale(self.weight, wcfg.grid_bits, wcfg.channel_wise, self.weight_layout(),
                                    wcfg.scale_init)

    def weight_qparams(self) -> torch.Tensor:
        """The weight scale the next forward would use (no state change)."""
        wcfg = self.config.retrain_weight_config
        if wcfg.block_format is not None:
            if wcfg.learnable_scale and self._wts_ready:
                return storable_scale(self.wts_scales.detach())
            return self._block_scale_from_float()
        if wcfg.learnable_scale:
            return ulq_weight_scale(self.wts_scales.detach()) if self._wts_ready else self.weight_scale_init()
        return arq_scale(self.weight, wcfg.grid_bits, wcfg.channel_wise, self.weight_layout())

    def pair_grid_spec(self) -> tuple | None:
        """(order, groups, weight_grad) of the pair-capped grid (QuantSpec.pair_grid); None on other grids."""
        wcfg = self.config.retrain_weight_config
        if wcfg.kernel_grid != "pair_cap":
            return None
        return (*self.kernel_order(), wcfg.kernel_grid_grad)

    def _fake_quant(self, weight, scale) -> torch.Tensor:
        """ŵ on this layer's weight grid (no autograd history needed by the callers)."""
        wcfg = self.config.retrain_weight_config
        if wcfg.kernel_grid == "pair_cap":
            return grid_weight(weight, scale, *self.kernel_order())
        return fake_quant_weight(weight, scale, wcfg.grid_bits, self.weight_layout())

    @torch.no_grad()
    def weight_codes(self) -> torch.Tensor:
        """The integer codes of the eval forward's ŵ, as int8 shaped like the weight (INT4 codes live in
        int8 too): round(ŵ / s), which on a kernel grid are the pair-capped or 7-bit codes; for a
        llama.cpp block format the codes its GGUF file stores (`gguf_blocks`)."""
        if self.config.retrain_weight_config.block_format is not None:
            return self.gguf_blocks()[0].reshape(self.weight.shape)
        scale = self.weight_qparams().detach()
        wq = self._fake_quant(self.weight.detach(), scale)
        layout = self.weight_layout()
        if scale.numel() > 1:
            view = wq.reshape(layout.view) / scale.reshape(layout.scale)
        else:
            view = wq / scale.reshape(())
        qmin, qmax = int_range(self.config.retrain_weight_config.grid_bits)
        return torch.round(view).clamp(qmin, qmax).reshape(self.weight.shape).to(torch.int8)

    def _cached_weight(self):
        """(scale, ŵ) for a forward that does not update state, reused while neither the weight
        nor the stored scale changed (see WeightCache; never part of state_dict)."""
        sources = (self.weight,)
        if self.config.retrain_weight_config.learnable_scale:
            sources += (self.wts_scales, self.wts_scale_ready)
        if self._wq_cache is None:
            self._wq_cache = WeightCache()
        hit = self._wq_cache.lookup(sources)
        if hit is not None:
            if self.config.retrain_weight_config.learnable_scale:  # |s| anew: its autograd node dies with a backward
                return self._weight_scale(False), hit[1]
            return hit
        w_scale = self._weight_scale(False)
        with torch.no_grad():
            wq = self.weight_fake_quant(w_scale)
        self._wq_cache.store(sources, w_scale, wq)
        return w_scale, wq

    def clear_weight_cache(self):
        """Drop the cached ŵ of non-updating forwards (needed only after an edit through `.data`)."""
        self._wq_cache = None

    def fake_quantized_weight(self) -> torch.Tensor:
        """The whole fake-quantized weight the eval forward uses (for checks)."""
        with torch.no_grad():
            return self.weight_fake_quant(self.weight_qparams())

    def weight_fake_quant(self, scale: torch.Tensor) -> torch.Tensor:
        """ŵ for the weight scale `scale` (as `_weight_scale` / `weight_qparams` return it), no history."""
        wcfg = self.config.retrain_weight_config
        if wcfg.block_format is None:  # the INT8/INT4 grids, the kernel grids included
            with torch.no_grad():
                return self._fake_quant(self.weight, scale)
        with torch.no_grad():
            return weight_fake_quant(self.weight, scale, wcfg.num_bits, self.weight_layout(), wcfg.block_format,
                                     wcfg.learnable_scale and self._wts_ready)

    def gguf_blocks(self):
        """(codes int8 (rows, K), d float16 (rows, K/32)): the weight as its GGUF file stores it, the
        trained codes and stored scales of the eval forward (retrain_weight_config.gguf_type)."""
        wcfg = self.config.retrain_weight_config
        if wcfg.block_format is None:
            raise ValueError(f"{self.describe()}: retrain_weight_config.gguf_type is None; only Q8_0/Q4_0 layers "
                             "hold GGUF blocks")
        with torch.no_grad():
            w = self._weight_2d().detach()
            if wcfg.learnable_scale and self._wts_ready:
                return weight_codes_learned(w, self.wts_scales.detach().reshape(w.shape[0], -1), wcfg.block_format)
            return weight_codes_from_float(w, wcfg.block_format)
