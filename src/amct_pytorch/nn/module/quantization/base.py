"""`QATModuleMixin`: a QAT layer with an activation quantizer (IFMR calibration, then ULQ with
learnable clip bounds) in front of its float op, on top of `QATLayer`'s weight quantizer.

A module type (LinearQAT, Conv2dQAT, ...) subclasses `QATModuleMixin` and its float layer and
adds only its float op (`float_forward`, `_qat_call`), the layout of its weight's output channels
(`weight_layout`) and its input-shape check (`_check_input_shape`). State keeps AMCT's names on
the module itself (`acts_clip_max`, `wts_scales`, ...), so checkpoints of any release load.
The state rule is `QATLayer`'s (layer.py).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ....distributed import gather_values, global_min_max, rank, sum_over_ranks
from ....blockwise import BlockActSpec, dynamic_act_spec
from ....config import LLAMA_CPP_ACTS
from ....functional import EPS, WeightLayout, act_qparams
from ....ifmr import HIST_BINS, empty_histogram, hist_update, histogram_from_counts, ifmr_exact, ifmr_histogram
from ....params import low_precision_params_error, write_param
from ....qat_function import QuantSpec
from ....runtime import (calibrating, exporting, in_reentrant_checkpoint_forward, saved_tensor_hook_kind,  # noqa: F401
                         set_strict_inputs, strict_inputs, strict_inputs_enabled, torch_exporting)
from .layer import QATLayer, check_device, check_dtype, positive_int  # noqa: F401 (public here since 0.1)
from .qdq import export_forward, module_qparams, pinned_layout

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_FLOAT32_MAX = torch.finfo(torch.float32).max
_HIST_LIMIT = 2.0**126  # the histogram spans [-R, R) with R a power of two: 2R must stay finite


class CalibrationSkippedWarning(UserWarning):
    """A forward on an uncalibrated QAT layer that neither calibrates nor quantizes."""


def _output_dtype(x):
    """The dtype the float layer would return for input x: the autocast dtype inside autocast, the
    input's own dtype for a bfloat16/float16 input outside it; None for float32."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return None if dtype == torch.float32 else dtype
    return x.dtype if x.dtype in _LOW_PRECISION else None


class QATModuleMixin(QATLayer):
    """A QAT layer that also quantizes its input; put it before the float layer class in the bases."""

    # ---- what a module type provides -------------------------------------------------
    @property
    def _out_channels(self) -> int:
        raise NotImplementedError

    def _check_input_shape(self, x) -> None:
        raise NotImplementedError

    def n_weight_scales(self) -> int:
        """How many weight scales the config asks for: 1, one per output channel, or (group-wise,
        LinearQAT only) one per output channel and group of input features."""
        return self._out_channels if self.config.retrain_weight_config.channel_wise else 1

    def _channel_abs_sums(self, wq):
        """sum |w| over each output channel's weights (the largest bounds any output's sum)."""
        return wq.reshape(self._out_channels, -1).abs().double().sum(dim=1)

    def float_forward(self, x, weight):
        """The float layer's computation on (x, weight) with this module's bias and settings."""
        raise NotImplementedError

    def _qat_call(self, x, w_scale, spec, wq, act_grid):
        """qat_apply with this module's float op (and any input preparation it needs)."""
        raise NotImplementedError

    # ---- construction -------------------------------------------------------------
    def _check_dynamic_config(self) -> None:
        """A GGUF weight format pairs with llama.cpp's activation quantizer (what llama.cpp computes in front
        of a Q8_0/Q4_0 linear); parse_config checks the other direction."""
        data, wcfg = self.config.retrain_data_config, self.config.retrain_weight_config
        if wcfg.gguf_type is not None and data.dynamic_act not in LLAMA_CPP_ACTS:
            raise ValueError(
                f"retrain_weight_config.gguf_type={wcfg.gguf_type!r}: llama.cpp quantizes the input of a "
                f"{wcfg.gguf_type} linear on the fly to Q8_0, so train against that: set "
                f"retrain_data_config.dynamic_act to one of {LLAMA_CPP_ACTS} (x86: 'llama.cpp-x86'), got "
                f"{data.dynamic_act!r}"
            )

    def act_block_spec(self) -> BlockActSpec | None:
        """The dynamic per-block activation quantizer (retrain_data_config.dynamic_act), or None."""
        data = self.config.retrain_data_config
        if data.dynamic_act is None:
            return None
        return dynamic_act_spec(data.dynamic_act, self.config.retrain_weight_config.group_size)

    def _build_quant_state(self, device):
        self._check_dynamic_config()
        data = self.config.retrain_data_config
        # with a dynamic activation the clip/scale state below is registered but unused (uniform state_dict keys)
        f32 = dict(device=device, dtype=torch.float32)
        # shape (1,), not 0-d: FSDP2 shards every parameter on dim 0 (0-d checkpoints still load)
        self.acts_clip_max = nn.Parameter(torch.full((1,), data.clip_max or 0.0, **f32))
        self.acts_clip_min = nn.Parameter(torch.full((1,), data.clip_min or 0.0, **f32),
                                          requires_grad=not data.fixed_min)
        self.register_buffer("acts_scale", torch.ones(1, **f32))
        self.register_buffer("acts_offset", torch.zeros(1, device=device, dtype=torch.int8))
        self._build_weight_state(device)
        needs_calib = data.needs_calibration
        self.register_buffer("calib_done", torch.tensor(not needs_calib, device=device))
        self.register_buffer("calib_batches", torch.tensor(0, device=device, dtype=torch.int64))
        if data.ifmr_search == "histogram":
            self.register_buffer("calib_hist", empty_histogram(device))
            self.register_buffer("calib_range", torch.zeros((), **f32))
            self.register_buffer("calib_minmax", torch.zeros(2, **f32))
        else:  # exact search: the values of the calibration batches before the last one
            self.register_buffer("calib_samples", torch.zeros(0, **f32))
        self._calibrated = not needs_calib  # host mirror of calib_done: no device sync per call
        self._finished_in_forward = False  # calibration ended in the last state-updating forward
        self._warned_uncalibrated = False

    def __setstate__(self, state):
        # modules pickled by earlier releases lack the newer host-side flags
        state.setdefault("_finished_in_forward", False)
        state.setdefault("_warned_uncalibrated", False)
        super().__setstate__(state)

    def reset_parameters(self) -> None:
        """The float layer's initialisation of weight and bias, and a fresh (uncalibrated)
        quantization state: what `to_empty()` after meta-device construction needs."""
        self._FLOAT.reset_parameters(self)
        if "acts_clip_max" in self._parameters:  # not yet during the float layer's __init__
            self.reset_quant_state()

    @torch.no_grad()
    def reset_quant_state(self) -> None:
        """Back to the state of a freshly built module (in place: the tensors keep their storage)."""
        data = self.config.retrain_data_config
        self.acts_clip_max.fill_(data.clip_max or 0.0)
        self.acts_clip_min.fill_(data.clip_min or 0.0)
        self.acts_scale.fill_(1.0)
        self.acts_offset.zero_()
        self._reset_weight_state()
        self.calib_done.fill_(not data.needs_calibration)
        self.calib_batches.zero_()
        if hasattr(self, "calib_hist"):
            self.calib_hist.zero_()
            self.calib_range.zero_()
            self.calib_minmax.zero_()
        else:
            self.calib_samples = self.calib_samples.new_zeros(0)
        self._calibrated = not data.needs_calibration
        self._finished_in_forward = False
        self._warned_uncalibrated = False

    @classmethod
    def _check_float(cls, mod):
        if not isinstance(mod, cls._FLOAT) or isinstance(mod, QATLayer):
            raise TypeError(f"from_float: expected a torch.nn.{cls._FLOAT.__name__} that is not already a "
                            f"{cls.__name__}, got {type(mod).__name__}")
        check_dtype(mod.weight.dtype, "from_float: mod.weight.dtype")

    def _adopt(self, mod):
        """Share `mod`'s weight and bias Parameters, then build the quantization state next to them."""
        self.weight = mod.weight
        self.bias = mod.bias
        self._build_quant_state(mod.weight.device)
        self.train(mod.training)
        return self

    # ---- forward --------------------------------------------------------------------
    def forward(self, x, *args, **kwargs):
        if not self.config.retrain_enable:
            if (isinstance(x, torch.Tensor) and x.dtype in _LOW_PRECISION and self.weight.dtype == torch.float32
                    and not torch.is_autocast_enabled(x.device.type)):
                # like an enabled layer: a bf16/fp16 input against float32 parameters (e.g. under
                # fully_shard_qat's float32 policy) is computed in float32 and returned in its dtype
                return self._FLOAT.forward(self, x.float(), *args, **kwargs).to(x.dtype)
            return self._FLOAT.forward(self, x, *args, **kwargs)
        if torch_exporting():
            return self.export_forward(x, *args, **kwargs)
        self._check_input(x)
        # mixed precision: master parameters and all quantization math stay float32, and so does
        # the op itself (x̂ and ŵ are exact on their grids only in float32: parity with the
        # float32 QDQ export); the result comes back in the dtype the float layer would return
        out_dtype = _output_dtype(x)
        if x.dtype != torch.float32:
            x = x.float()
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                y = self._forward_f32(x, *args, **kwargs)
        else:
            y = self._forward_f32(x, *args, **kwargs)
        return y if out_dtype is None else y.to(out_dtype)

    def _forward_f32(self, x, *args, **kwargs):
        ckpt = saved_tensor_hook_kind()
        recompute = ckpt == "recompute"  # non-reentrant checkpointing's second run of a forward
        update = not recompute and self.updates_state()
        if recompute:  # decide as the original forward did, change nothing
            quant_act = self._calibrated and not self._finished_in_forward
        else:
            quant_act = self._calibrated
            if update and self._finished_in_forward:
                self._finished_in_forward = False
            if not quant_act:
                if update:
                    self._observe(x)
                    if self._calibrated:
                        self._finished_in_forward = True
                elif self.config.retrain_data_config.needs_calibration:
                    self._warn_uncalibrated()
        if update:
            if self._wq_cache is not None:
                self._wq_cache = None
            w_scale, wq = self._weight_scale(True), None
        elif recompute or torch.compiler.is_compiling():
            w_scale, wq = self._weight_scale(False), None
        else:
            w_scale, wq = self._cached_weight()
        abits = self.config.retrain_data_config.num_bits
        act_grid = None
        blocks = self.act_block_spec()
        wcfg = self.config.retrain_weight_config
        if blocks is not None:  # dynamic per-block activation: nothing calibrated, nothing stored
            spec = QuantSpec(None, wcfg.num_bits, wcfg.learnable_scale, weight_format=wcfg.block_format,
                             act_blocks=blocks)
            return self._qat_call(x, w_scale, spec, wq, None, *args, **kwargs)
        if quant_act:  # the grid is computed once and shared with the autograd function
            act_grid = self.act_qparams()
            if update:
                self.acts_scale.copy_(act_grid[0].reshape(1))
                self.acts_offset.copy_(act_grid[1].reshape(1))
        wcfg = self.config.retrain_weight_config
        spec = QuantSpec(abits if quant_act else None, wcfg.grid_bits, wcfg.learnable_scale,
                         weight_format=wcfg.block_format, pair_grid=self.pair_grid_spec())
        return self._qat_call(x, w_scale, spec, wq, act_grid, *args, **kwargs)

    def _warn_uncalibrated(self):
        if self._warned_uncalibrated or exporting() or in_reentrant_checkpoint_forward():
            return
        self._warned_uncalibrated = True
        why = "eval mode" if not self.training else "autograd disabled (no_grad/inference_mode)"
        warnings.warn(
            f"{type(self).__name__}: forward on an uncalibrated layer in {why}: its input passes through "
            "unquantized and no calibration statistics are collected (the state rule). Calibrate with "
            "amct_pytorch.calibrate(model, batches), inside `with amct_pytorch.calibrating():`, or by "
            "training forwards (train mode, grad enabled). Warned once per module.",
            CalibrationSkippedWarning, stacklevel=6)

    def export_forward(self, x, *args, **kwargs):
        """The forward under ONNX export / torch.export: QuantizeLinear/DequantizeLinear on input and
        weight, then the float op (qdq.export_forward)."""
        self._check_input(x)
        return export_forward(self, x, *args, **kwargs)

    def export_constants(self):
        """What export_onnx pins for this module's export forward: its QParams (group-wise scales
        shaped (rows, blocks))."""
        return pinned_layout(self, module_qparams(self))

    def _check_input(self, x):
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32 and x.dtype not in _LOW_PRECISION:
            raise TypeError(f"input: expected dtype torch.float32 (or bfloat16/float16, computed in float32), "
                            f"got {x.dtype}")
        if self.weight.dtype != torch.float32 or self.acts_clip_max.dtype != torch.float32:
            # before any state changes; under FSDP2 the message names fully_shard_qat
            param = "weight" if self.weight.dtype != torch.float32 else "acts_clip_max"
            raise low_precision_params_error(self, param, getattr(self, param).dtype)
        self._check_input_shape(x)
        if x.numel() == 0:
            raise ValueError(f"input: empty batch of shape {tuple(x.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"input: on {x.device}, but the module lives on {self.weight.device}")
        if exporting():
            return
        # calibrating (and pass-through) forwards always check: statistics can never be poisoned;
        # after calibration only in strict mode (a host sync per call), else NaN/inf propagate as in nn.Linear
        if self._calibrated and not strict_inputs_enabled():
            return
        x = x.detach()
        # one cheap reduction; only when it is not finite do we look element by element
        if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
            raise ValueError(f"input: contains NaN or infinite values; {name} needs finite inputs")
        if not self._calibrated:
            self._check_passthrough_range(x.float())

    def _check_passthrough_range(self, x):
        """Calibration calls feed x unquantized to the float op: refuse inputs that would overflow it."""
        layout = self.weight_layout()
        with torch.no_grad():
            lo, hi = torch.aminmax(x)
            amax = torch.maximum(-lo, hi).double()
            wq = self.weight_fake_quant(self.weight_qparams())
            # every output sums at most one channel's weights times inputs: bound by the largest
            # channel's sum of |w_q| (for a transposed conv, a subset of its kernel's terms)
            bound = amax * self._channel_abs_sums(wq).amax()
            if self.bias is not None:
                bound = bound + self.bias.double().abs().amax()
            # float32 accumulation may overshoot the exact sum by about (terms per output) ulps
            terms = self.weight.numel() // self._out_channels
            bound = float(bound) * (1 + terms * 2.0**-23)
            if bound > _FLOAT32_MAX:
                raise ValueError(
                    f"input: values up to |x| = {float(amax):.3g} would overflow float32 in this layer's output "
                    f"during calibration (max|x| * max channel sum |w_q| + max|b| = {bound:.3g} > "
                    f"{_FLOAT32_MAX:.3g}); rescale the input"
                )

    # ---- activation calibration -----------------------------------------------------
    def _observe(self, x):
        """One calibration batch: accumulate statistics; IFMR on the batch_num-th call.

        Everything is computed first and stored at the end, so an error changes nothing.
        Under torch.distributed all ranks contribute to (and store) the same statistics.
        """
        data = self.config.retrain_data_config
        values = x.detach().reshape(-1)
        last = int(self.calib_batches) + 1 >= data.batch_num
        with torch.no_grad():
            if data.ifmr_search == "histogram":
                hist, hist_range, minmax = self._histogram_step(values)
                if last:
                    bounds = ifmr_histogram(hist, hist_range, minmax, data.num_bits)
            else:
                samples = torch.cat([self.calib_samples, gather_values(values)])
                if last:
                    bounds = ifmr_exact(samples, data.num_bits)
                    samples = samples.new_zeros(0)
            if data.ifmr_search == "histogram":
                self.calib_hist.copy_(hist)
                self.calib_range.copy_(hist_range)
                self.calib_minmax.copy_(minmax)
            else:
                self.calib_samples = samples
            self.calib_batches += 1
            if last:
                self._finish_calibration(*bounds)

    def _histogram_step(self, values):
        """(hist, range, minmax) after adding this batch of every rank: histograms are summed, not values sent."""
        lo, hi = global_min_max(*torch.aminmax(values))
        need = float(torch.maximum(-lo, hi))
        if need >= _HIST_LIMIT:
            raise ValueError(
                f"input: |x| up to {need:.3g} is beyond the histogram IFMR's range (|x| < 2**126 = "
                f"{_HIST_LIMIT:.3g}); use retrain_data_config.ifmr_search='exact' or rescale the input"
            )
        if int(self.calib_batches) > 0:
            lo, hi = torch.minimum(lo, self.calib_minmax[0]), torch.maximum(hi, self.calib_minmax[1])
        # rank 0 carries the histogram so far, the others only their batch; all bin on one range
        own = self.calib_hist if rank() == 0 else torch.zeros_like(self.calib_hist)
        hist, hist_range = hist_update(own, self.calib_range, values, cover=need)
        return sum_over_ranks(hist), hist_range, torch.stack([lo, hi])

    def _finish_calibration(self, clip_max, clip_min):
        data = self.config.retrain_data_config
        new_max = clip_max if data.clip_max is None else self.acts_clip_max.detach()
        if data.fixed_min:
            new_min = torch.zeros_like(clip_min)
        else:
            new_min = clip_min if data.clip_min is None else self.acts_clip_min.detach()
        step = (new_max.clamp(min=0.0) - new_min.clamp(max=0.0)) / float(2**data.num_bits - 1)
        if step < EPS:
            # values too small to resolve (all zero, or |x| ~< 1e-5) count as all-zero data, which
            # IFMR maps to a unit-size grid; the degenerate fallback (scale 1, offset qmin) is never learned from
            zero_max, zero_min = ifmr_exact(torch.zeros(1, device=clip_max.device), data.num_bits)
            clip_max = zero_max if data.clip_max is None else clip_max
            clip_min = zero_min if data.clip_min is None else clip_min
        # write_param: also into this rank's FSDP2 shard (a write to the unsharded parameter alone is lost)
        if data.clip_max is None:
            write_param(self, "acts_clip_max", clip_max.reshape(1))
        if data.fixed_min:
            write_param(self, "acts_clip_min", torch.zeros_like(self.acts_clip_min))
        elif data.clip_min is None:
            write_param(self, "acts_clip_min", clip_min.reshape(1))
        if data.ifmr_search == "histogram":
            self.calib_hist.zero_()
        self.calib_done.fill_(True)
        self._calibrated = True
        self._store_act_qparams()

    @torch.no_grad()
    def _store_act_qparams(self):
        scale, offset = act_qparams(self.acts_clip_max, self.acts_clip_min, self.config.retrain_data_config.num_bits)
        self.acts_scale.copy_(scale.reshape(1))
        self.acts_offset.copy_(offset.reshape(1))

    def act_qparams(self):
        """(scale, offset) of the activation grid for the current clip bounds (no state change)."""
        with torch.no_grad():
            return act_qparams(self.acts_clip_max, self.acts_clip_min, self.config.retrain_data_config.num_bits)

    # ---- state ----------------------------------------------------------------------
    @property
    def is_calibrated(self) -> bool:
        return self._calibrated

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "calib_samples"
        if key in state_dict and hasattr(self, "calib_samples"):
            saved = state_dict[key]
            if not isinstance(saved, torch.Tensor) or saved.dim() != 1:
                error_msgs.append(f"{key}: expected a 1-d tensor of calibration values, got "
                                  f"{tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__}")
            else:  # its length varies with the calibration progress
                self.calib_samples = self.calib_samples.new_zeros(saved.shape)
        for name in ("acts_clip_max", "acts_clip_min"):  # 0-d in checkpoints before FSDP2 support
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and saved.dim() == 0:
                state_dict[prefix + name] = saved.reshape(1)
        key = prefix + "calib_hist"
        saved = state_dict.get(key)
        if hasattr(self, "calib_hist") and isinstance(saved, torch.Tensor) and saved.shape == (2 * HIST_BINS,):
            # counts only (before per-bin sums were kept): torch's load_state_dict hands us its own copy
            state_dict[key] = histogram_from_counts(saved, state_dict.get(prefix + "calib_range", self.calib_range))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # QATLayer's: then sync_host_state()

    def sync_host_state(self) -> None:
        super().sync_host_state()
        self._calibrated = bool(self.calib_done)
        self._finished_in_forward = False

    def resize_calibration_samples(self, numel: int) -> None:
        """Give `calib_samples` (exact IFMR search) room for `numel` values, so that a loader that
        copies each saved tensor into the module's own (e.g. transformers') can restore it: its length
        varies with the calibration progress."""
        if hasattr(self, "calib_samples") and self.calib_samples.numel() != numel:
            self.calib_samples = self.calib_samples.new_empty((numel,))

    def _quant_repr(self) -> str:
        data, wcfg = self.config.retrain_data_config, self.config.retrain_weight_config
        if self._calibrated:
            status = "calibrated"
        else:
            status = f"calibrating {int(self.calib_batches)}/{data.batch_num} batches"
        if data.dynamic_act is not None:
            spec = self.act_block_spec()
            act = (f"act=INT8 dynamic {data.dynamic_act} (block {spec.block}, {spec.scale_dtype} scale, "
                   f"{spec.reciprocal}, ties {spec.rounding})")
        else:
            act = f"act={data.dst_type} ULQ (IFMR {data.ifmr_search}, batch_num={data.batch_num}"
            act += ", fixed_min" if data.fixed_min else ""
            act += f", {status})"
        layout = "per-channel" if wcfg.channel_wise else "per-tensor"
        if wcfg.group_size is not None:
            layout = f"group {wcfg.group_size}"
        grid = wcfg.dst_type if wcfg.gguf_type is None else wcfg.gguf_type
        wt = f"weight={grid} {wcfg.weights_retrain_algo} {layout}"
        rule = ("state updates: only in train mode with grad enabled or inside amct_pytorch.calibrating(); "
                "never in eval, no_grad or export")
        return f"{act}, {wt}, {rule}"

    def extra_repr(self) -> str:
        base = self._FLOAT.extra_repr(self)
        if not self.config.retrain_enable:
            return base + ", retrain_enable=False"
        return f"{base}, {self._quant_repr()}"
